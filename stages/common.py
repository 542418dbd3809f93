"""What every stage entry file shares: reading its resolved config and turning UserError into one line.

A stage is started by its job script as ``python3 -u stages/<stage>/run.py --config <name>_hydra.yaml``
(through torchrun/srun/bcprun when it needs several processes). The YAML is the fully resolved
stage config the launcher wrote next to the job script, so a stage never re-composes Hydra.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from omegaconf import DictConfig, OmegaConf

from launcher.errors import UserError

log = logging.getLogger("promptlaunch")


def load_stage_config(argv: Sequence[str] | None = None) -> DictConfig:
    """Parse ``--config PATH`` (plus optional ``key=value`` dotlist overrides) into a DictConfig."""
    parser = argparse.ArgumentParser(description="Run one promptlaunch stage from its resolved config.")
    parser.add_argument("--config", required=True, help="path to the <name>_hydra.yaml the launcher wrote")
    parser.add_argument("overrides", nargs="*", help="optional key=value overrides (OmegaConf dotlist)")
    args = parser.parse_args(argv)
    path = Path(args.config)
    if not path.is_file():
        raise UserError(f"--config {path}: no such file; pass the <name>_hydra.yaml written next to the job script")
    try:
        cfg = OmegaConf.load(path)
        if args.overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(args.overrides)))
    except Exception as exc:  # yaml / dotlist syntax
        raise UserError(f"{path}: cannot read config ({exc}); fix the YAML or the override syntax") from None
    assert isinstance(cfg, DictConfig)
    return cfg


def setup_logging() -> None:
    """Plain timestamped log lines on stdout; only rank 0 logs at INFO so multi-process logs stay readable."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
        force=True,
    )


def run_stage(main: Callable[[DictConfig], None], argv: Sequence[str] | None = None) -> int:
    """Load the config, run ``main``; a UserError becomes one ``error:`` line and exit code 2."""
    setup_logging()
    try:
        cfg = load_stage_config(argv)
        main(cfg)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0
