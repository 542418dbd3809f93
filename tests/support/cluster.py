"""Executor tests without the ML stages: a job spec whose program is a small Python file, the scripts written as the
launcher writes them, fake cluster commands on PATH, and the fake bcprun."""
from __future__ import annotations

import stat
import sys
from pathlib import Path
from typing import Any

from cluster.jobspec import JobSpec
from stages.common import io
from tests.support.paths import ROOT, SUPPORT

FAKE_BIN = SUPPORT / "fake_bcprun"   # holds ``bcprun``, the test double of NVIDIA's (put it first on PATH)


def tiny_job(tmp: Path, name: str, code: str, **fields: Any) -> JobSpec:
    """A JobSpec whose program is ``code`` (a small Python file), independent of the ML stages."""
    results = Path(fields.pop("results_dir", tmp / "results" / name))
    results.mkdir(parents=True, exist_ok=True)
    entry = Path(fields.pop("entry", tmp / f"{name}.py"))
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.write_text(code)
    config = results / f"{name}_hydra.yaml"
    config.write_text("{}\n")
    fields.setdefault("env", (("PYTHONPATH", str(ROOT)), ("PYTHONUNBUFFERED", "1")))
    return JobSpec(stage=fields.pop("stage", name), name=name, results_dir=str(results),
                   launcher_scripts_path=fields.pop("launcher_scripts_path", str(ROOT)),
                   python=fields.pop("python", sys.executable), entry=str(entry), config_path=str(config),
                   time_limit=fields.pop("time_limit", "00:05:00"), **fields)


def write_scripts(executor: Any, jobs: list[JobSpec]) -> list[str]:
    """What launcher.app does between render and launch: write each script, executable."""
    paths = []
    for job in jobs:
        executor.check(job)
        paths.append(str(io.write_text(job.script_path(executor.name), executor.render(job), mode=0o755)))
    return paths


def fake_command(bin_dir: Path, name: str, body: str) -> None:
    """An executable bash script ``name`` in ``bin_dir`` (put it first on PATH)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
