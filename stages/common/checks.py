"""What every stage's config check returns, and the checks more than one stage shares. Torch-free.

Each stage owns ``stages/<stage>/config.py`` with ``check(cfg, stage, in_job) -> StageCheck``. The launcher calls it
before anything is written or submitted (``in_job=False``) and learns from the result what it plans with: the
resources, the files the stage reads and writes (so a file an earlier stage will write need not exist yet), the
checks that only make sense on the machine that runs the job, and the warnings. The stage calls the same function
again inside the job (``in_job=True``) on the config it was handed. One rule, one function, one wording: messages
name the full key path (``<stage>.trainer.devices``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from stages.common.errors import UserError


@dataclass(frozen=True)
class Resources:
    """What one job of the stage asks the cluster for."""

    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0


@dataclass(frozen=True)
class Need:
    """An input file the stage reads: ``key`` names the config key, ``fix`` what to do when it is missing."""

    path: str
    key: str
    fix: str

    def missing(self) -> str:
        """The one line that says the file is not there."""
        return f"{self.key}: '{self.path}' does not exist; {self.fix}"


@dataclass
class StageCheck:
    """A checked stage config, as far as anyone outside the stage needs to know it."""

    resources: Resources = field(default_factory=Resources)
    reads: list[Need] = field(default_factory=list)
    writes: list[str] = field(default_factory=list)
    here: list[Callable[[], None]] = field(default_factory=list)   # checks of the machine that runs the job
    warnings: list[str] = field(default_factory=list)
    takes_signal: bool = False          # checkpoints and requeues on the cluster's preemption signal
    signal_warning: str | None = None   # printed when the cluster will send that signal

    def check_reads_exist(self) -> None:
        """Inside the job every input must be there now (the launcher allowed ones an earlier stage writes)."""
        for need in self.reads:
            if not os.path.exists(os.path.expanduser(need.path)):
                raise UserError(need.missing())


def positive_int(value: Any, key: str) -> int:
    """An integer >= 1 (``True`` is not one)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{key}: must be a positive integer, got {value!r}")
    return value


def boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{key}: must be true or false, got {value!r}")
    return value


def check_writable(path: str, key: str) -> None:
    """The nearest existing ancestor must be a writable folder (a file in the way is the usual mistake)."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        raise UserError(f"{key}: '{path}' must be an absolute path")
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise UserError(f"{key}: cannot create '{path}' because '{p}' is a file; choose another folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"{key}: '{p}' is not writable; choose a folder you can write to")


@dataclass(frozen=True)
class Trainer:
    """The ``trainer`` keys every stage that runs a model shares."""

    devices: int
    num_nodes: int
    accelerator: str
    precision: str
    reuse_host_memory: bool

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    def resources(self) -> Resources:
        return Resources(self.num_nodes, self.devices, self.devices if self.accelerator == "gpu" else 0)


def check_trainer(sc: Any, stage: str) -> Trainer:
    """``<stage>.trainer``: devices, nodes, accelerator, precision and host-memory reuse."""
    t = sc.get("trainer")
    if t is None:
        raise UserError(f"{stage}.trainer: missing; the stage config must have a trainer block")
    devices = positive_int(t.get("devices", 1), f"{stage}.trainer.devices")
    nodes = positive_int(t.get("num_nodes", 1), f"{stage}.trainer.num_nodes")
    accel = t.get("accelerator", "cpu")
    if accel not in ("cpu", "gpu"):
        raise UserError(f"{stage}.trainer.accelerator: '{accel}' is not one of cpu, gpu")
    precision = str(t.get("precision", "32"))
    if accel == "cpu" and precision.startswith("bf16"):
        raise UserError(f"{stage}.trainer.precision: {precision} on CPU is emulated and ~300x slower; set {stage}.trainer.precision=32")
    if accel == "cpu" and precision.startswith("16"):
        raise UserError(f"{stage}.trainer.precision: {precision} is not supported on CPU; set {stage}.trainer.precision=32")
    reuse = boolean(t.get("reuse_host_memory", True), f"{stage}.trainer.reuse_host_memory")
    return Trainer(devices, nodes, str(accel), precision, reuse)


def require_gpu(key: str) -> None:
    """The job asks for a GPU: there must be one where it runs (checked on that machine only)."""
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"{key}: gpu, but no CUDA device is visible; set {key}=cpu")
