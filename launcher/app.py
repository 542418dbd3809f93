"""The launcher's one job: composed config -> validated -> planned -> written -> run or submitted.

Everything is checked before the first file is written, and every file is written atomically, so a
rejected config leaves nothing behind and a written script is always complete.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig

from cluster import get_executor
from cluster.render import join
from stages.common import io
from stages.common.errors import UserError
from launcher import aliases
from launcher.plan import PlannedJob, plan
from launcher.schema import resolve_all
from launcher.validate import validate


def _write(job: PlannedJob, executor_name: str, script: str, command_line: str) -> None:
    spec = job.spec
    io.write_text(spec.config_path, job.config_yaml)
    io.write_text(spec.script_path(executor_name), script, mode=0o755)
    io.write_text(f"{spec.results_dir}/launcher_cmd.log", command_line + "\n")


def _write_all(jobs: list[PlannedJob], executor_name: str, scripts: list[str], command_line: str) -> None:
    """Every job's files, or none: a failure (a full disk) removes the folders this call created, so a rerun never
    finds the scripts of a run that was not launched."""
    fresh = []
    for job in jobs:
        folder = Path(job.spec.results_dir)
        while not folder.parent.exists():
            folder = folder.parent
        if not folder.exists():
            fresh.append(folder)
    try:
        for job, script in zip(jobs, scripts):
            _write(job, executor_name, script, command_line)
    except BaseException:
        for folder in fresh:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def run(cfg: DictConfig, argv: Sequence[str]) -> int:
    """Run the launcher on a composed config; ``argv`` is the command line, recorded next to each job."""
    resolve_all(cfg)
    cfg.cluster_type = aliases.value("cluster_type", str(cfg.cluster_type))  # a config file may still say bcm
    checked = validate(cfg)
    jobs = plan(cfg, checked.checks)
    executor = get_executor(str(cfg.cluster_type), cfg.get("cluster"))
    for job in jobs:
        executor.check(job.spec)
    scripts = [executor.render(job.spec) for job in jobs]
    for w in checked.warnings:
        print(f"warning: {w}", file=sys.stderr)
    command_line = join(["python3", "main.py", *argv])
    _write_all(jobs, executor.name, scripts, command_line)
    if cfg.dry_run:
        print(f"dry run ({executor.name}): {len(jobs)} stage(s) written, nothing run")
        for job in jobs:
            print(f"  {job.spec.stage:17s} {job.spec.script_path(executor.name)}")
            print(f"  {'':17s} config: {job.spec.config_path}")
        return 0
    return executor.launch([j.spec for j in jobs])


def fail(exc: UserError) -> int:
    """Print a UserError as the single line users see; return the exit code."""
    print(f"error: {exc}", file=sys.stderr, flush=True)
    return 2
