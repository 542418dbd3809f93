#!/usr/bin/env python3
"""promptlaunch entry point: ``python3 main.py [group=option ...] [key=value ...]``.

Composes ``conf/config.yaml`` with Hydra (once) and hands it to ``launcher.app.run``. NeMo's spellings on the
command line (``cluster_type=bcm``, ``prompt_learning=gpt3/squad``, ...) are first rewritten through the alias
table in ``launcher/aliases.py``. Mistakes in the command line or the config come back as one ``error:`` line and
exit code 2, before anything runs.

Under ``-m`` (a Hydra sweep) each job runs the launcher in its own folder (launcher/sweep.py); a failed job does
not stop the sweep (main.py exits with the worst code at the end), a stop signal does.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from launcher import aliases, sweep
from launcher.app import fail, run
from cluster.render import join
from launcher.validate import check_key_path
from stages.common.errors import UserError

ROOT = Path(__file__).resolve().parent
ARGV = sys.argv[1:]                              # as typed: recorded in each stage's launcher_cmd.log
USER_FULL_ERROR = os.environ.get("HYDRA_FULL_ERROR")
_composed = False                                # set once Hydra hands over a composed config
_sweep_codes: list[int] = []                     # exit codes of the jobs of a -m sweep

if not OmegaConf.has_resolver("launcher_root"):
    OmegaConf.register_new_resolver("launcher_root", lambda: str(ROOT))
sweep.register_resolvers()


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    global _composed
    _composed = True
    if USER_FULL_ERROR is None:                  # the jobs inherit this environment: leave it as the user had it
        os.environ.pop("HYDRA_FULL_ERROR", None)
    else:
        os.environ["HYDRA_FULL_ERROR"] = USER_FULL_ERROR
    job = sweep.current_job(sys.argv[1:], join(["python3", "main.py", *ARGV]))
    try:
        code = run(cfg, ARGV, sweep=job)
    except UserError as exc:
        code = fail(exc)
    if job is not None and code < 128:          # 128 + signal: stopped, the sweep stops too
        _sweep_codes.append(code)
    elif code:
        sys.exit(code)


if __name__ == "__main__":
    sys.argv[1:] = [aliases.override(a) for a in ARGV]
    # Hydra re-raises what goes wrong while composing instead of printing its own report, so a bad override (or a
    # missing config under --config-dir, or in a -m sweep) becomes the one line below; errors after composition are
    # the launcher's own (one line) or a bug (Hydra's report, as before).
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except Exception as exc:
        if _composed:
            raise
        try:   # Hydra's advice for an unknown key is to add it with +, which the launcher then refuses: say what it is
            override = re.match(r"Could not override '([^']+)'", str(exc))
            if override:
                check_key_path(override.group(1))
            raise UserError(" ".join(str(exc).split()))
        except UserError as err:
            sys.exit(fail(UserError(f"command line: {err}")))
    sys.exit(max(_sweep_codes, default=0))
