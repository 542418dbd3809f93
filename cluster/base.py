"""The executor interface shared by the local, Slurm and BCP executors."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import BinaryIO, Callable, Protocol, Sequence

from cluster.jobspec import JobSpec


class Executor(Protocol):
    """Turns job specs into scripts (pure) and runs or submits them (side effects)."""

    name: str

    def check(self, job: JobSpec) -> None:
        """Raise UserError if this executor cannot run ``job`` (called before anything is written)."""

    def render(self, job: JobSpec) -> str:
        """The job script text: a pure function of ``job``."""

    def launch(self, jobs: Sequence[JobSpec]) -> int:
        """Run or submit the written scripts in order; return a process exit code."""


def stream(cmd: Sequence[str], log: BinaryIO, cwd: str | None = None, env: dict[str, str] | None = None) -> int:
    """Run ``cmd``, copying its combined output to the terminal and to ``log`` as it comes (progress bars too)."""
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    assert proc.stdout is not None
    out = sys.stdout.buffer
    try:
        while True:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            out.write(chunk)
            out.flush()
            log.write(chunk)
            log.flush()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        raise
    return proc.wait()


def run_in_order(jobs: Sequence[JobSpec], executor: str, run_one: Callable[[JobSpec], int]) -> int:
    """Run each stage's script with ``run_one`` in order, stopping at the first failure with one line naming the
    stage, its log and the stages not run (the local and BCP executors run their scripts this way)."""
    for i, job in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] {job.stage}: {job.script_path(executor)} (log: {job.log_path})", flush=True)
        rc = run_one(job)
        if rc != 0:
            left = ", ".join(j.stage for j in jobs[i:]) or "none"
            print(f"error: stage '{job.stage}' failed with exit code {rc}; see {job.log_path}. Not run: {left}",
                  file=sys.stderr, flush=True)
            return rc
    print(f"done: {len(jobs)} stage(s) finished: {', '.join(j.stage for j in jobs)}", flush=True)
    return 0
