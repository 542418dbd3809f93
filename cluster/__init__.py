"""Executors: the only code that knows about clusters. Each renders a script per JobSpec and runs or submits it.

One word per executor, used for ``cluster_type``, the module, the settings file ``conf/cluster/<word>.yaml`` (Slurm
only) and the rendered script's suffix ``<name>_<word>.sh``: ``local`` (this machine), ``slurm``, ``bcp`` (NVIDIA Base
Command Platform). NeMo's spellings (``interactive``, ``bcm``) are mapped to these by ``launcher/aliases.py``.

Import rule: this package imports ``stages.common`` only (and third-party code); the launcher imports it.
"""
from __future__ import annotations

from typing import Any

from cluster.base import Executor

CLUSTER_TYPES = ("local", "slurm", "bcp")


def get_executor(cluster_type: str, cluster_cfg: Any) -> Executor:
    """The executor for ``cluster_type`` (one of CLUSTER_TYPES: the launcher maps the aliases first)."""
    if cluster_type == "local":
        from cluster.local import LocalExecutor

        return LocalExecutor()
    if cluster_type == "slurm":
        from cluster.slurm import SlurmExecutor

        return SlurmExecutor(cluster_cfg)
    if cluster_type == "bcp":
        from cluster.bcp import BCPExecutor

        return BCPExecutor()
    raise ValueError(f"unknown cluster_type {cluster_type!r}; one of {', '.join(CLUSTER_TYPES)}")
