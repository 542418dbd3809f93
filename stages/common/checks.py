"""What every stage's config check returns, and the checks more than one stage shares. Torch-free.

Each stage owns ``stages/<stage>/config.py`` with ``check(cfg, stage, in_job) -> StageCheck``. The launcher calls it
before anything is written or submitted (``in_job=False``) and learns from the result what it plans with: the
resources, the files the stage reads and writes (so a file an earlier stage will write need not exist yet), the
checks that only make sense on the machine that runs the job, and the warnings. The stage calls the same function
again inside the job (``in_job=True``) on the config it was handed. One rule, one function, one wording: messages
name the full key path (``<stage>.trainer.devices``).
"""
from __future__ import annotations

import difflib
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from stages.common import precision as precision_rules
from stages.common.errors import UserError


@dataclass(frozen=True)
class Resources:
    """What one job of the stage asks the cluster for."""

    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0


@dataclass(frozen=True)
class Need:
    """An input the stage reads: ``key`` names the config key, ``fix`` what to do when it is missing; a file unless
    ``folder``."""

    path: str
    key: str
    fix: str
    folder: bool = False

    def fault(self) -> str | None:
        """None when the input is there, else the one line that says what is wrong (:meth:`problem`)."""
        return Need.problem(self.path, self.key, self.fix, self.folder)

    @staticmethod
    def problem(path: str, key: str, fix: str, folder: bool = False) -> str | None:
        """None when ``path`` is there as the kind of entry expected (a file, or a folder with ``folder=True``); else
        the one line: it does not exist, or it is a folder where a file is expected (or the other way round)."""
        p = os.path.expanduser(path)
        if not os.path.exists(p):
            return f"{key}: '{path}' does not exist; {fix}"
        if os.path.isdir(p) and not folder:
            return f"{key}: '{path}' is a folder, not a file; name the file itself"
        if folder and not os.path.isdir(p):
            return f"{key}: '{path}' is a file, not a folder; name the folder"
        return None


def is_nemo_file(path: str | os.PathLike[str]) -> bool:
    """A prompt input given as a NeMo prompt-learning ``.nemo`` file (read as a file, not as an artifact folder)."""
    return str(path).endswith(".nemo") and os.path.isfile(os.path.expanduser(str(path)))


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
            fault = need.fault()
            if fault:
                raise UserError(fault)


def positive_int(value: Any, key: str) -> int:
    """An integer >= 1 (``True`` is not one)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{key}: must be a positive integer, got {value!r}")
    return value


def number(value: Any, key: str, low: float, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> float:
    """A number (not a boolean) in a range: ``>= low`` (``> low`` with ``low_open``), and up to ``high`` if given."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value > low if low_open else value >= low)
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        span = (f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}" if high is not None
                else f"{'>' if low_open else '>='} {low}")
        raise UserError(f"{key}: must be a number {span}, got {value!r}")
    return float(value)


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

    def precision_check(self, stage: str) -> list:
        """The here-check of ``precision`` (``auto`` and bf16 are decided by the device: precision.py), or none."""
        if self.precision != "auto" and self.precision not in precision_rules.BF16:
            return []
        return [lambda: precision_rules.resolve(self.precision, self.accelerator, f"{stage}.trainer.precision")]


PRECISIONS = precision_rules.CHOICES + precision_rules.GPU_ONLY


def check_trainer(sc: Any, stage: str) -> Trainer:
    """``<stage>.trainer``: devices, nodes, accelerator, precision and host-memory reuse. Whether bf16 is native
    is a fact of the machine that runs the job: :meth:`Trainer.precision_check` is a check to run there."""
    t = sc.get("trainer")
    if t is None:
        raise UserError(f"{stage}.trainer: missing; the stage config must have a trainer block")
    devices = positive_int(t.get("devices", 1), f"{stage}.trainer.devices")
    nodes = positive_int(t.get("num_nodes", 1), f"{stage}.trainer.num_nodes")
    accel = t.get("accelerator", "cpu")
    if accel not in ("cpu", "gpu"):
        raise UserError(f"{stage}.trainer.accelerator: '{accel}' is not one of cpu, gpu")
    precision = str(t.get("precision", "32"))
    if precision not in PRECISIONS:
        raise UserError(f"{stage}.trainer.precision: '{precision}' is not one of {', '.join(PRECISIONS)}; "
                        f"set e.g. {stage}.trainer.precision=32")
    if accel == "cpu" and precision.startswith("16"):
        raise UserError(f"{stage}.trainer.precision: {precision} is not supported on CPU; set {stage}.trainer.precision=32")
    reuse = boolean(t.get("reuse_host_memory", True), f"{stage}.trainer.reuse_host_memory")
    return Trainer(devices, nodes, str(accel), precision, reuse)


def require_gpu(key: str) -> None:
    """The job asks for a GPU: there must be one where it runs (checked on that machine only)."""
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"{key}: gpu, but no CUDA device is visible; set {key}=cpu")


# ---- strict keys: a key nothing reads is a mistake (a typo is otherwise silently ignored) ----------------------
CONF = Path(__file__).resolve().parents[2] / "conf"
FREE = "*"   # ``a.b.*`` in a known-key set: the keys under ``a.b`` are free (e.g. logger keyword arguments)
RUN_KEYS = ("name", "results_dir", "time_limit", "dependency", "nodes")   # what the launcher reads of every run block


def key_paths(node: Any, base: str = "") -> set[str]:
    """Every dotted key path of a mapping, the inner ones too (``a``, ``a.b``); lists are values, not looked into."""
    paths: set[str] = set()
    for k, v in _mapping(node).items():
        path = f"{base}.{k}" if base else str(k)
        paths.add(path)
        if isinstance(v, Mapping):
            paths |= key_paths(v, path)
    return paths


def _mapping(node: Any) -> Mapping[str, Any]:
    """A config node's keys and values as plain containers, interpolations unresolved (only keys matter here)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=False)
    return node if isinstance(node, Mapping) else {}


@functools.lru_cache(maxsize=None)
def shipped_keys(group: str) -> frozenset[str]:
    """The key paths of every shipped config of ``conf/<group>/`` (read, not composed: each file's own keys; a file
    that builds on another through ``defaults`` adds to the union), without ``defaults``."""
    import yaml

    keys: set[str] = set()
    for path in sorted((CONF / group).rglob("*.yaml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        keys |= key_paths({k: v for k, v in data.items() if k != "defaults"})
    return frozenset(keys)


def stage_keys(stage: str, optional: Iterable[str]) -> frozenset[str]:
    """A stage's known keys: its shipped configs' (``conf/<stage>/``), the ``run`` keys the launcher reads and the
    optional keys the stage reads with a default (listed in ``stages/<stage>/keys.py``)."""
    return shipped_keys(stage) | {"run", *(f"run.{k}" for k in RUN_KEYS)} | set(optional)


def check_keys(node: Any, known: Iterable[str], prefix: str) -> None:
    """Refuse the first key of ``node`` that is not in ``known`` (dotted paths relative to ``node``), with the one
    line that names its full path (``prefix.path``) and the nearest known key. Only mappings whose keys ``known``
    lists are looked into: a known key with no known keys under it (or with ``<key>.*``) takes any value."""
    known = frozenset(known)
    parents = {k.rpartition(".")[0] for k in known}

    def walk(n: Any, base: str) -> None:
        for k, v in _mapping(n).items():
            path = f"{base}.{k}" if base else str(k)
            if path not in known:
                raise unknown_key(path, known, prefix)
            if path in parents and f"{path}.{FREE}" not in known:
                walk(v, path)

    walk(node, "")


def unknown_key(path: str, known: Iterable[str], prefix: str = "") -> UserError:
    """The one wording of "unknown key": the full path, then the nearest known key (difflib) or the known keys there."""
    known = sorted(k for k in known if not k.endswith(f".{FREE}"))
    full = (lambda p: f"{prefix}.{p}" if prefix else p)
    parent, _, leaf = path.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent]
    near = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
    if near:
        best = f"{parent}.{near[0]}" if parent else near[0]
    else:   # the right name at the wrong level, or a close full path
        best = next((k for k in known if k.rpartition(".")[2] == leaf), None) or \
            next(iter(difflib.get_close_matches(path, known, n=1, cutoff=0.8)), None)
    if best:
        return UserError(f"{full(path)}: unknown key (nothing reads it); did you mean {full(best)}?")
    where = f"under {full(parent)}" if parent else (f"in {prefix}" if prefix else "at the top level")
    return UserError(f"{full(path)}: unknown key (nothing reads it); remove it (known keys {where}: {', '.join(siblings)})")
