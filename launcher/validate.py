"""The launcher's checks, run before anything is written or submitted: the stage list, the global keys, each
stage's ``run`` block and the cluster's settings; every stage's own keys through its check in the registry.

Each check raises UserError with one line: the key (or file) at fault and the fix. Input files are required to
exist unless an earlier stage of the same pipeline writes them; in a dry run, missing inputs are reported as
warnings, since nothing will read them.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, ListConfig

from cluster import CLUSTER_TYPES
from cluster.render import check_env_names
from cluster.slurm import SlurmConfig
from launcher.registry import STAGE_NAMES, check_stage, known_keys
from launcher.schema import GlobalSchema, RunSchema
from stages.common.checks import RUN_KEYS, Need, StageCheck, check_keys, check_writable, positive_int
from stages.common.errors import UserError
from stages.common.typed import typed

TOP_KEYS = frozenset({*GlobalSchema.__dataclass_fields__, "cluster", *STAGE_NAMES})   # the stages' and cluster's: their owners'
_TIME = re.compile(r"^(\d+-)?\d{1,3}:\d{2}:\d{2}$")


@dataclass
class Checked:
    """What validation learned: the stages in order, each stage's own check, and warnings to print."""

    stages: list[str]
    checks: dict[str, StageCheck] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def normalize_stages(raw: Any) -> list[str]:
    """``stages=prompt_learning`` (a bare string) and ``stages=[a,b]`` both become a list."""
    if isinstance(raw, str):
        items = [s.strip() for s in raw.strip("[]").split(",") if s.strip()]
    elif isinstance(raw, (list, ListConfig)):
        items = [str(s) for s in raw]
    else:
        raise UserError(f"stages: expected a list such as stages=[data_preparation,prompt_learning], got {raw!r}")
    if not items:
        raise UserError("stages: empty; name at least one of " + ", ".join(STAGE_NAMES))
    for s in items:
        if s not in STAGE_NAMES:
            raise UserError(f"stages: unknown stage '{s}'; known stages are {', '.join(STAGE_NAMES)}")
    dup = {s for s in items if items.count(s) > 1}
    if dup:
        raise UserError(f"stages: '{sorted(dup)[0]}' listed twice; list each stage once")
    return items


def check_key_path(path: str) -> None:
    """Refuse one dotted key path (``prompt_learning.trainer.max_step``) if no config has it, with the line the
    composed config would get: Hydra refuses such an override itself, advising ``+key``, which would only move the
    mistake; main.py calls this to say the nearest known key instead."""
    head, *rest = path.split(".")
    node: Any = None
    for part in reversed(rest):
        node = {part: node}
    if head in STAGE_NAMES and node is not None:
        check_keys(node, known_keys(head), head)
    elif head == "cluster" and node is not None:
        check_keys(node, SlurmConfig.__dataclass_fields__, "cluster")
    else:
        check_keys({head: node}, TOP_KEYS, "")


class _Inputs:
    """Existence checks for input files, aware of what earlier stages will produce."""

    def __init__(self, dry_run: bool) -> None:
        self.dry_run = dry_run
        self.produced: set[str] = set()
        self.warnings: list[str] = []

    def need(self, need: Need) -> None:
        fault = need.fault()
        if fault is None or os.path.normpath(os.path.expanduser(need.path)) in self.produced:
            return
        if self.dry_run:
            self.warnings.append(fault)
        else:
            raise UserError(fault)


_SIGNAL = re.compile(r"^(?:SIG)?(USR1|USR2)@(\d+)$")


def _seconds(time_limit: str) -> int:
    days, _, hms = time_limit.rpartition("-")
    h, m, sec = (int(x) for x in hms.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + sec


def _check_signal(value: Any) -> int | None:
    """``cluster.signal``: ``USR1@<seconds>`` (or USR2); returns the lead time in seconds, None when off."""
    if value is None or value == "":
        return None
    text = str(value)
    if text.upper().startswith("B:"):
        raise UserError(f"cluster.signal: '{text}' would signal only the batch shell, but the checkpoint is written by "
                        f"the srun tasks; use '{text[2:]}' (Slurm then signals every task)")
    match = _SIGNAL.match(text.upper())
    if not match or int(match.group(2)) < 1:
        raise UserError(f"cluster.signal: '{text}' is not USR1@<seconds> or USR2@<seconds> (e.g. USR1@120: SIGUSR1 120 s "
                        f"before the time limit); set it so, or to null to turn preemption handling off")
    return int(match.group(2))


def _check_run(stage: str, sc: Any) -> RunSchema:
    """``<stage>.run``: the block the launcher plans with (name, results_dir, time_limit, nodes)."""
    if not isinstance(sc, DictConfig):
        raise UserError(f"{stage}: listed in stages but no config is selected; add e.g. {stage}=<option> (see conf/{stage}/)")
    if "run" not in sc:
        raise UserError(f"{stage}.run: missing; every stage config needs a run block (name, results_dir, time_limit)")
    run: RunSchema = typed(RunSchema, {k: v for k, v in sc.run.items() if k in RUN_KEYS}, f"{stage}.run")  # the rest: the stage's
    if not _TIME.match(run.time_limit):
        raise UserError(f"{stage}.run.time_limit: '{run.time_limit}' is not HH:MM:SS or D-HH:MM:SS")
    positive_int(run.nodes, f"{stage}.run.nodes")
    if not re.match(r"^[A-Za-z0-9_.-]+$", run.name):
        raise UserError(f"{stage}.run.name: '{run.name}' may only use letters, digits, '.', '_' and '-'")
    check_writable(run.results_dir, f"{stage}.run.results_dir")
    return run


def validate(cfg: DictConfig) -> Checked:
    """Check the composed, resolved config; return the stages, their checks and the warnings."""
    stages = normalize_stages(cfg.get("stages"))
    if cfg.get("cluster_type") not in CLUSTER_TYPES:
        raise UserError(f"cluster_type: '{cfg.get('cluster_type')}' is not one of {', '.join(CLUSTER_TYPES)}")
    check_keys(cfg, TOP_KEYS, "")
    for name in STAGE_NAMES:   # the stages not run too: a key nothing reads is a mistake wherever it is
        if isinstance(cfg.get(name), DictConfig):
            check_keys(cfg[name], known_keys(name), name)
    g: GlobalSchema = typed(GlobalSchema, {k: v for k, v in cfg.items() if k != "cluster" and k not in STAGE_NAMES}
                            | {"stages": stages}, "config")
    typed(SlurmConfig, cfg.get("cluster") or {}, "cluster")
    signal_lead = _check_signal((cfg.get("cluster") or {}).get("signal")) if g.cluster_type == "slurm" else None
    bad_env = check_env_names(g.env_vars)
    if bad_env:
        raise UserError(f"env_vars.{bad_env[0]}: not a valid environment variable name; use letters, digits and _")
    check_writable(g.base_results_dir, "base_results_dir")
    runs_here = g.cluster_type == "local" and not g.dry_run
    if g.wandb_api_key_file and g.cluster_type == "local":
        problem = Need.problem(g.wandb_api_key_file, "wandb_api_key_file", "create it or set wandb_api_key_file=null")
        if problem:
            raise UserError(problem)
    inputs = _Inputs(g.dry_run)
    checked = Checked(stages=stages, warnings=inputs.warnings)
    for stage in stages:
        sc = cfg.get(stage)
        run = _check_run(stage, sc)
        result = check_stage(stage, sc)
        if signal_lead and result.takes_signal:
            if signal_lead >= _seconds(run.time_limit):
                raise UserError(f"cluster.signal: {cfg.cluster.signal} asks for the signal {signal_lead} s before the time "
                                f"limit, but {stage}.run.time_limit is {run.time_limit}, so the job would be told to "
                                f"checkpoint and requeue at once, again and again; lower the lead time or raise the limit")
            if result.signal_warning:
                inputs.warnings.append(result.signal_warning)
        if runs_here:   # the job runs on this machine: what it needs of the machine can be checked now
            for here in result.here:
                here()
        for need in result.reads:
            inputs.need(need)
        inputs.produced.update(os.path.normpath(os.path.expanduser(path)) for path in result.writes)
        inputs.warnings.extend(result.warnings)
        checked.checks[stage] = result
    return checked
