"""Helpers for launcher tests: compose configs in-process and run main.py as a user would."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]

if not OmegaConf.has_resolver("launcher_root"):
    OmegaConf.register_new_resolver("launcher_root", lambda: str(ROOT))


def compose_cfg(overrides: list[str]) -> DictConfig:
    """Compose conf/config.yaml with overrides, as main.py does."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(config_name="config", overrides=overrides)


def run_main(args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python3 main.py args`` in a subprocess and capture its output."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
