"""Typed schema of the keys the launcher itself reads (globals and each stage's ``run`` block; the executors type
their own ``cluster`` settings, e.g. ``cluster.slurm.SlurmConfig``).

Stage bodies (trainer/model/data) belong to the stage programs; the launcher only types what it plans
with, and checks the rest in ``validate``. Types are enforced by merging into OmegaConf structured
configs, so a wrong type names its key (``run.nodes: Value 'x' could not be converted to Integer``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from stages.common.errors import UserError


@dataclass
class GlobalSchema:
    """Top-level keys of ``conf/config.yaml``."""

    stages: list[str] = field(default_factory=list)
    cluster_type: str = "local"
    dry_run: bool = False
    launcher_scripts_path: str = "."
    data_dir: str = "data"
    base_results_dir: str = "results"
    python: str = "python3"
    container: Optional[str] = None
    container_mounts: list[str] = field(default_factory=list)
    wandb_api_key_file: Optional[str] = None
    env_vars: dict[str, Optional[str]] = field(default_factory=dict)


@dataclass
class RunSchema:
    """The ``run:`` block every stage config has, kept apart from its trainer/model/data."""

    name: str = "???"
    results_dir: str = "???"
    time_limit: str = "01:00:00"
    dependency: Optional[str] = None
    nodes: int = 1


def resolve_all(cfg: DictConfig) -> None:
    """Resolve every interpolation now so a broken ``${...}`` is reported before anything is written."""
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        where = getattr(exc, "full_key", "") or "config"
        msg = str(exc).splitlines()[0]
        raise UserError(f"{where}: cannot resolve interpolation ({msg}); fix or override that key") from None
