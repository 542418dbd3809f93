"""Executors: the only code that knows about clusters. Each renders a script per JobSpec and runs or submits it."""
from __future__ import annotations

from typing import Any

from cluster.base import Executor


def get_executor(cluster_type: str, cluster_cfg: Any) -> Executor:
    """The executor for ``cluster_type`` (imported lazily: a local run never loads the Slurm code)."""
    if cluster_type == "interactive":
        from cluster.local import LocalExecutor

        return LocalExecutor()
    if cluster_type == "bcm":
        from cluster.slurm import SlurmExecutor

        return SlurmExecutor(cluster_cfg)
    if cluster_type == "bcp":
        from cluster.bcp import BCPExecutor

        return BCPExecutor()
    raise ValueError(f"unknown cluster_type {cluster_type!r}")
