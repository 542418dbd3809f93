"""Typed schema of the keys the launcher itself reads (globals, cluster, each stage's ``run`` block).

Stage bodies (trainer/model/data) belong to the stage programs; the launcher only types what it plans
with, and checks the rest in ``validate``. Types are enforced by merging into OmegaConf structured
configs, so a wrong type names its key (``run.nodes: Value 'x' could not be converted to Integer``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from stages.common.errors import UserError

CLUSTER_TYPES = ("interactive", "bcm", "bcp")


@dataclass
class ClusterSchema:
    """Slurm settings (``conf/cluster/bcm.yaml``)."""

    partition: Optional[str] = None
    account: Optional[str] = None
    exclusive: bool = True
    gpus_per_task: Optional[int] = None
    gpus_per_node: Optional[int] = None
    mem: Optional[str] = "0"
    overcommit: bool = False
    job_name_prefix: str = "promptlaunch-"
    srun_args: list[str] = field(default_factory=list)
    signal: Optional[str] = None
    wait: bool = False
    poll_seconds: float = 10.0


@dataclass
class GlobalSchema:
    """Top-level keys of ``conf/config.yaml``."""

    stages: list[str] = field(default_factory=list)
    cluster_type: str = "interactive"
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


def typed(schema: type, cfg: Any, key: str) -> Any:
    """Merge ``cfg`` (only the keys ``schema`` declares) into ``schema``; a type error names ``key.sub``."""
    fields = schema.__dataclass_fields__  # type: ignore[attr-defined]
    data = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k in fields}  # type: ignore[union-attr]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), data)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        sub = getattr(exc, "full_key", "") or ""
        msg = str(exc).splitlines()[0]
        raise UserError(f"{key}.{sub}: {msg}; fix the value in the config or on the command line") from None
    return obj


def resolve_all(cfg: DictConfig) -> None:
    """Resolve every interpolation now so a broken ``${...}`` is reported before anything is written."""
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        where = getattr(exc, "full_key", "") or "config"
        msg = str(exc).splitlines()[0]
        raise UserError(f"{where}: cannot resolve interpolation ({msg}); fix or override that key") from None
