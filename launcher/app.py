"""The launcher's one job: composed config -> validated -> planned -> locked -> written -> run or submitted.

Everything is checked before the first file is written, and every file is written atomically, so a
rejected config leaves nothing behind and a written script is always complete. Each stage folder's
``launch.lock`` (cluster/lock.py) keeps a second launch out of it while this one runs (locally) or its chain is
in Slurm; a dry run takes no lock and only warns about one. In a ``-m`` sweep (launcher/sweep.py) the job's own
folder becomes ``base_results_dir``.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig

from cluster import get_executor
from cluster.base import Stopped
from cluster.lock import LaunchLock, warn_if_held
from cluster.render import join
from stages.common import io
from stages.common.errors import UserError
from launcher import aliases
from launcher.plan import PlannedJob, plan
from launcher.schema import resolve_all
from launcher.sweep import SweepJob
from launcher.validate import validate


def _write(job: PlannedJob, executor_name: str, script: str, command_line: str) -> None:
    spec = job.spec
    io.write_text(spec.config_path, job.config_yaml)
    io.write_text(spec.script_path(executor_name), script, mode=0o755)
    io.write_text(f"{spec.results_dir}/launcher_cmd.log", command_line + "\n")


def _new_folders(jobs: list[PlannedJob]) -> list[Path]:
    """The top-most folders of the jobs' results folders that do not exist yet (what this launch creates)."""
    fresh = []
    for job in jobs:
        folder = Path(job.spec.results_dir)
        while not folder.parent.exists():
            folder = folder.parent
        if not folder.exists() and folder not in fresh:
            fresh.append(folder)
    return fresh


def _write_all(jobs: list[PlannedJob], executor_name: str, scripts: list[str], command_line: str,
               fresh: list[Path]) -> None:
    """Every job's files, or none: a failure (a full disk) removes the folders this launch created (``fresh``,
    found before the lock made them), so a rerun never finds the scripts of a run that was not launched."""
    try:
        for job, script in zip(jobs, scripts):
            _write(job, executor_name, script, command_line)
    except BaseException:
        for folder in fresh:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def _into_sweep_job(cfg: DictConfig, job: SweepJob) -> None:
    """Move the whole pipeline into the sweep job's folder, and give its Slurm jobs their own names (the scripts use
    ``--dependency=singleton``, which would chain the sweep's jobs one after another)."""
    cfg.base_results_dir = job.folder
    if cfg.get("cluster") is not None:
        cfg.cluster.job_name_prefix = f"{cfg.cluster.get('job_name_prefix') or ''}{job.name}-"


def _check_inside(cfg: DictConfig, stages: Sequence[str], job: SweepJob) -> None:
    for stage in stages:
        folder = os.path.abspath(str(cfg[stage].run.results_dir))
        if not (folder + "/").startswith(job.folder + "/"):
            raise UserError(f"{stage}.run.results_dir: '{folder}' is outside this sweep job's folder {job.folder}, so "
                            f"every job of the sweep would write there; in a -m sweep let it follow base_results_dir")


def run(cfg: DictConfig, argv: Sequence[str], sweep: SweepJob | None = None) -> int:
    """Run the launcher on a composed config; ``argv`` is the command line, recorded next to each job; ``sweep``:
    the job of a ``-m`` sweep this is."""
    if sweep is not None:
        _into_sweep_job(cfg, sweep)
    resolve_all(cfg)
    cfg.cluster_type = aliases.value("cluster_type", str(cfg.cluster_type))  # a config file may still say bcm
    checked = validate(cfg)
    if sweep is not None:
        _check_inside(cfg, checked.stages, sweep)
    jobs = plan(cfg, checked.checks)
    wait = bool((cfg.get("cluster") or {}).get("wait"))
    if sweep is not None and wait:
        cfg.cluster.wait = False   # every chain is submitted first; the sweep's end waits for them all
    executor = get_executor(str(cfg.cluster_type), cfg.get("cluster"))
    for job in jobs:
        executor.check(job.spec)
    scripts = [executor.render(job.spec) for job in jobs]
    folders = [job.spec.results_dir for job in jobs]
    command_line = join(["python3", "main.py", *argv])
    if cfg.dry_run:
        checked.warnings.extend(warn_if_held(folders))
    for w in checked.warnings:
        print(f"warning: {w}", file=sys.stderr)
    fresh = _new_folders(jobs)
    lock = None if cfg.dry_run else LaunchLock(folders, command_line, executor.name).acquire()
    try:
        _write_all(jobs, executor.name, scripts, command_line, fresh)
        if sweep is not None:
            sweep.write(cluster_type=executor.name, dry_run=bool(cfg.dry_run), wait=wait,
                        poll_seconds=float((cfg.get("cluster") or {}).get("poll_seconds") or 10),
                        stages={j.spec.stage: j.spec.results_dir for j in jobs})
        if cfg.dry_run:
            print(f"dry run ({executor.name}): {len(jobs)} stage(s) written, nothing run")
            for job in jobs:
                print(f"  {job.spec.stage:17s} {job.spec.script_path(executor.name)}")
                print(f"  {'':17s} config: {job.spec.config_path}")
            return 0
        assert lock is not None
        if hasattr(executor, "on_submit"):
            executor.on_submit = lock.record_jobs   # from then on the lock lasts as long as the chain is in squeue
        try:
            code = executor.launch([j.spec for j in jobs])
        except Stopped as stop:
            lock.release()
            print(stop.line(), file=sys.stderr, flush=True)
            code = 128 + stop.signum
        if sweep is not None and executor.name != "slurm":
            sweep.write(exit_code=code)
        return code
    finally:
        if lock is not None and not lock.me.slurm_jobs:
            lock.release()


def fail(exc: UserError) -> int:
    """Print a UserError as the line users see (one ``error:`` line per mismatch it holds); return the exit code."""
    for line in exc.lines:
        print(f"error: {line}", file=sys.stderr, flush=True)
    return 2
