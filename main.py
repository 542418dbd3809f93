#!/usr/bin/env python3
"""promptlaunch entry point: ``python3 main.py [group=option ...] [key=value ...]``.

Composes ``conf/config.yaml`` with Hydra and hands it to ``launcher.app.run``. Mistakes in the
command line or the config come back as one ``error:`` line and exit code 2, before anything runs.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from launcher.app import fail, run  # noqa: E402
from stages.common.errors import UserError  # noqa: E402

if not OmegaConf.has_resolver("launcher_root"):
    OmegaConf.register_new_resolver("launcher_root", lambda: str(ROOT))


def _precheck(overrides: list[str]) -> None:
    """Compose once without running, so a bad override becomes one line instead of Hydra's report."""
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
            compose(config_name="config", overrides=overrides)
    except Exception as exc:  # Hydra, OmegaConf and YAML errors alike: the message names the file or key
        text = " ".join(str(exc).split())
        raise UserError(f"command line: {text}") from None


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        code = run(cfg, sys.argv[1:])
    except UserError as exc:
        code = fail(exc)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    args = sys.argv[1:]
    if not any(a.startswith("-") for a in args):  # Hydra's own flags (--help, --cfg, -m) go straight to Hydra
        try:
            _precheck(args)
        except UserError as exc:
            sys.exit(fail(exc))
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    main()
