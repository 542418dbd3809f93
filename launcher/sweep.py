"""Sweeps: ``python3 main.py -m key=a,b ...`` (Hydra's basic sweeper and launcher), one results folder per job.

Names come from the swept keys only, each by its shortest dotted suffix that tells the swept keys apart
(``prompt_learning.model.optim.lr=0.01,0.03`` -> ``lr``), values reduced to file-name characters:

- the sweep's folder, ``hydra.sweep.dir = <base_results_dir>/sweeps/<name>``, e.g. ``sweeps/lr=0.01~0.03``
  (several keys joined by ``+``; a digest is added when a value had to be changed or the name grew long);
- each job's folder in it, ``hydra.sweep.subdir``, e.g. ``lr=0.01``; the launcher makes it the job's
  ``base_results_dir``, so the job's whole pipeline (every stage's ``run.results_dir``, and evaluation's artifact,
  which follows prompt_learning's folder by interpolation) moves there together, and records ``sweep.json``.

The same command line gives the same folders, so rerunning a sweep resumes its jobs. Hydra itself writes only
``multirun.yaml`` into the sweep's folder. When the sweep ends (Hydra callback ``SummaryCallback``), or on
``python3 -m launcher.sweep <sweep folder>``, ``sweep_summary.{md,json,png}`` compare the jobs: final val_loss
(``prompt_learning_summary.json``) and EM/F1 (evaluation's ``metrics.json``) against the swept values, and on Slurm
each job's state.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from launcher.registry import STAGE_NAMES
from stages.common import io

RECORD = "sweep.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_LONG = 80


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _safe(value: str) -> str:
    return _UNSAFE.sub("-", value).strip("-") or "_"


def _short_keys(keys: Sequence[str]) -> list[str]:
    """Each key's shortest dotted suffix that no other swept key shares."""
    parts = [k.split(".") for k in keys]
    n = [1] * len(keys)
    while True:
        names = [".".join(p[-i:]) for p, i in zip(parts, n)]
        dup = {x for x in names if names.count(x) > 1}
        if not dup:
            return names
        grown = False
        for j, x in enumerate(names):
            if x in dup and n[j] < len(parts[j]):
                n[j] += 1
                grown = True
        if not grown:   # the same key swept twice: Hydra keeps the last; keep the names apart anyway
            return [f"{x}{j}" if x in dup else x for j, x in enumerate(names)]


def _bounded(name: str, raw: str) -> str:
    return name if len(name) <= _LONG else f"{name[:_LONG - 9]}-{_digest(raw)}"


@dataclass(frozen=True)
class Sweep:
    """A sweep as its command line defines it: the swept keys, their values, the jobs in Hydra's order."""

    keys: tuple[str, ...]            # as Hydra writes them into a job's overrides (``+`` prefix, ``@package`` kept)
    names: tuple[str, ...]           # the short names
    values: tuple[tuple[str, ...], ...]
    name: str                        # the sweep's folder name
    folders: tuple[str, ...]         # one per job, in job order

    @classmethod
    def from_argv(cls, argv: Sequence[str]) -> "Sweep":
        from hydra._internal.utils import get_args_parser
        from hydra.core.override_parser.overrides_parser import OverridesParser

        overrides = OverridesParser.create().parse_overrides(get_args_parser().parse_args(list(argv)).overrides)
        swept = [o for o in overrides if o.is_sweep_override() and o.is_discrete_sweep()
                 and not o.key_or_group.startswith("hydra.")]
        keys = tuple(o.get_key_element() for o in swept)
        names = tuple(_short_keys([o.key_or_group for o in swept]))
        values = tuple(tuple(o.sweep_string_iterator()) for o in swept)
        raw = json.dumps([keys, values])
        lossy = any(_safe(v) != v for vs in values for v in vs)
        name = "+".join(f"{n}={'~'.join(_safe(v) for v in vs)}" for n, vs in zip(names, values)) or "sweep"
        name = _bounded(f"{name}-{_digest(raw)}" if lossy else name, raw)
        folders: list[str] = []
        for combo in itertools.product(*values):      # BasicSweeper's order, so job i is hydra.job.num i
            base = _bounded("+".join(f"{n}={_safe(v)}" for n, v in zip(names, combo)) or "job", json.dumps(combo))
            folder, n = base, 1
            while folder in folders:                  # two values that read the same once made safe: -2, -3, ...
                n += 1
                folder = f"{base}-{n}"
            folders.append(folder)
        return cls(keys, names, values, name, tuple(folders))

    def job_of(self, task_overrides: Sequence[str]) -> int:
        """The job number whose swept values are among ``task_overrides`` (a job's ``hydra.overrides.task``)."""
        given = set(task_overrides)
        for i, combo in enumerate(itertools.product(*self.values)):
            if all(f"{k}={v}" in given for k, v in zip(self.keys, combo)):
                return i
        raise ValueError(f"no job of this sweep has the overrides {list(task_overrides)}")


def register_resolvers() -> None:
    """``${promptlaunch_sweep:}`` and ``${promptlaunch_sweep_job:${hydra.overrides.task}}`` for conf/config.yaml's
    ``hydra.sweep``: the names above, from the command line Hydra was given (main.py rewrites aliases first)."""
    def job_folder(task: Sequence[str]) -> str:
        sweep = Sweep.from_argv(sys.argv[1:])
        return sweep.folders[sweep.job_of(list(task))]

    if not OmegaConf.has_resolver("promptlaunch_sweep"):
        OmegaConf.register_new_resolver("promptlaunch_sweep", lambda: Sweep.from_argv(sys.argv[1:]).name)
        OmegaConf.register_new_resolver("promptlaunch_sweep_job", job_folder)


@dataclass
class SweepJob:
    """One job of a running sweep, as the launcher needs it."""

    sweep_dir: str
    folder: str                      # absolute: the job's base_results_dir
    number: int
    sweep: Sweep
    overrides: list[str]
    command: str
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return os.path.basename(self.folder)

    def write(self, **fields: Any) -> None:
        """``sweep.json`` in the job's folder: the sweep it belongs to, this job's values and full overrides, and
        ``fields`` (what ran and where, later the exit code)."""
        self.record.update(fields)
        io.write_json(Path(self.folder) / RECORD, {
            "sweep": {"name": self.sweep.name, "dir": self.sweep_dir, "command": self.command,
                      "swept": {k: list(v) for k, v in zip(self.sweep.keys, self.sweep.values)},
                      "jobs": len(self.sweep.folders)},
            "job": {"number": self.number, "folder": self.name,
                    "values": dict(zip(self.sweep.keys, self.values())), "overrides": self.overrides},
            **self.record,
        })

    def values(self) -> tuple[str, ...]:
        return next(itertools.islice(itertools.product(*self.sweep.values), self.number, None))


def current_job(argv: Sequence[str], command: str) -> SweepJob | None:
    """The sweep job Hydra is running now, None outside ``-m``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    task = list(hc.overrides.task)
    sweep = Sweep.from_argv(argv)
    return SweepJob(sweep_dir=os.path.abspath(hc.sweep.dir), folder=os.path.abspath(hc.runtime.output_dir),
                    number=sweep.job_of(task), sweep=sweep, overrides=task, command=command)


# ---- the comparison ------------------------------------------------------------------------------------------------
METRICS = (("final_val_loss", "final val_loss"), ("exact_match", "EM"), ("f1", "F1"))


def _newest(folder: Path, name: str) -> dict[str, Any] | None:
    """The run's own ``name`` under ``folder`` (not one set aside under ``previous/``)."""
    found = [p for p in folder.rglob(name) if "previous" not in p.relative_to(folder).parts]
    if not found:
        return None
    return json.loads(max(found, key=lambda p: p.stat().st_mtime).read_text())


def _states(record: dict[str, Any]) -> str:
    """What each stage of a job is doing or did."""
    if record.get("dry_run"):
        return "dry run"
    if record.get("cluster_type") != "slurm":
        code = record.get("exit_code")
        return "running" if code is None else "completed" if code == 0 else f"failed (exit {code})"
    from cluster.slurm import query_states

    ids = {}
    stages = record.get("stages", {})
    for stage in [s for s in STAGE_NAMES if s in stages]:       # pipeline order (the JSON keys are sorted)
        path = Path(stages[stage]) / "job_id"
        if path.is_file():
            ids[stage] = path.read_text().strip()
    try:
        states = query_states(list(ids.values())) if ids else {}
    except Exception as exc:   # no Slurm here, or slurmctld busy
        return f"unknown ({' '.join(str(exc).split())[:80]})"
    return ", ".join(f"{s} {ids[s]} {states[ids[s]].describe() if ids[s] in states else 'UNKNOWN'}" for s in ids) or "not submitted"


def summarize(sweep_dir: str | os.PathLike[str]) -> Path:
    """Write ``sweep_summary.{json,md,png}`` in the sweep's folder from its jobs' ``sweep.json``; return the .md."""
    root = Path(sweep_dir)
    rows = []
    records = sorted((json.loads(p.read_text()) for p in root.glob(f"*/{RECORD}")), key=lambda r: r["job"]["number"])
    for rec in records:
        folder = root / rec["job"]["folder"]
        pl = _newest(folder, "prompt_learning_summary.json") or {}
        ev = _newest(folder, "metrics.json") or {}
        rows.append({"job": rec["job"]["number"], "folder": str(folder), "values": rec["job"]["values"],
                     "state": _states(rec), "final_val_loss": pl.get("final_val_loss"), "lr": pl.get("lr"),
                     "steps": pl.get("steps"), "exact_match": ev.get("exact_match"), "f1": ev.get("f1")})
    swept = records[0]["sweep"]["swept"] if records else {}
    io.write_json(root / "sweep_summary.json", {"sweep_dir": str(root), "swept": swept, "jobs": rows})
    png = _plot(root / "sweep_summary.png", rows)
    refresh = f"python3 -m launcher.sweep {root}"
    lines = [f"# Sweep {root.name}", "", f"Swept: {', '.join(f'`{k}` = {v}' for k, v in swept.items())}", "",
             "| job | " + " | ".join(swept) + " | state | " + " | ".join(t for _, t in METRICS) + " | folder |",
             "|---" * (len(swept) + len(METRICS) + 3) + "|"]
    for r in rows:
        cells = [str(r["job"]), *(str(r["values"].get(k, "")) for k in swept), r["state"],
                 *("" if r[m] is None else f"{r[m]:.4g}" for m, _ in METRICS), Path(r["folder"]).name]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Plot: {png.name}" if png else "No metrics yet (nothing has finished).",
              f"Refresh (e.g. while Slurm jobs run): `{refresh}`", ""]
    return io.write_text(root / "sweep_summary.md", "\n".join(lines))


def _plot(path: Path, rows: list[dict[str, Any]]) -> Path | None:
    metrics = [(m, t) for m, t in METRICS if any(r[m] is not None for r in rows)]
    if not metrics:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [Path(r["folder"]).name for r in rows]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 + 2.5 * len(metrics), 3.8), squeeze=False)
    for ax, (m, title) in zip(axes[0], metrics):
        ax.bar(range(len(rows)), [float("nan") if r[m] is None else r[m] for r in rows], color="tab:blue")
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
    fig.suptitle(path.parent.name, fontsize=9)
    fig.tight_layout()
    with io.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def finish(sweep_dir: str | os.PathLike[str]) -> Path:
    """At the end of a sweep: on Slurm with ``cluster.wait=true``, wait for every job's chain; then the summary."""
    from cluster.slurm import wait_for_chain

    root = Path(sweep_dir)
    for rec in sorted((json.loads(p.read_text()) for p in root.glob(f"*/{RECORD}")), key=lambda r: r["job"]["number"]):
        if rec.get("cluster_type") == "slurm" and rec.get("wait") and not rec.get("dry_run"):
            ids = [(Path(f) / "job_id").read_text().strip() for f in rec.get("stages", {}).values()
                   if (Path(f) / "job_id").is_file()]
            if ids:
                wait_for_chain(ids, poll_seconds=float(rec.get("poll_seconds", 10)))
    return summarize(root)


class SummaryCallback(Callback):
    """Hydra callback (conf/config.yaml ``hydra.callbacks``): the sweep's comparison when the last job is done."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        root = Path(str(config.hydra.sweep.dir))
        if not any(root.glob(f"*/{RECORD}")):
            return
        try:
            md = finish(root)
        except Exception as exc:   # Hydra would swallow it silently
            print(f"warning: sweep summary not written: {type(exc).__name__}: {' '.join(str(exc).split())}; "
                  f"retry with: python3 -m launcher.sweep {root}", file=sys.stderr, flush=True)
            return
        print(f"sweep summary: {md} (refresh: python3 -m launcher.sweep {root})", flush=True)


def main(argv: Sequence[str]) -> int:
    """``python3 -m launcher.sweep <sweep folder>``: rewrite the summary with the jobs' current states and results."""
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python3 -m launcher.sweep <base_results_dir>/sweeps/<name>", file=sys.stderr)
        return 2
    md = summarize(argv[0])
    print(md.read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
