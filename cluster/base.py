"""The executor interface shared by the local, Slurm and BCP executors."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
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


class Stopped(Exception):
    """SIGTERM/SIGINT reached the launcher while it ran stages here; raised once the running stage has exited."""

    def __init__(self, signum: int, stage: str, code: int | None, checkpoint: str | None) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum, self.stage, self.code, self.checkpoint = signum, stage, code, checkpoint

    def line(self) -> str:
        """The one line the user sees, after the lock is released."""
        name = signal.Signals(self.signum).name
        if self.code is None:
            return f"stopped by {name} before {self.stage} started; rerun the same command to continue"
        if self.checkpoint:
            return (f"stopped by {name}: {self.stage} saved its checkpoint {self.checkpoint}; "
                    f"rerun the same command to resume")
        return (f"stopped by {name}: {self.stage} exited with code {self.code} and saved no checkpoint; "
                f"rerun the same command to run it again")


# the line a stage prints when a stop signal made it checkpoint (stages/prompt_learning/fault/last_checkpoint.py)
_SAVED = re.compile(rb"checkpoint saved at step \d+ to (\S+?);")


class StopSignals:
    """While the launcher runs stages on this machine, SIGTERM and SIGINT are not its own death: they are passed on
    to the running stage's whole process group (its torchrun and workers too), the launcher waits until that group
    has exited (the training stage checkpoints at its next step boundary) and starts no further stage."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.group: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._forward)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)   # type: ignore[arg-type]
        self._old = {}

    def _forward(self, signum: int, frame: object) -> None:
        self.signum = self.signum or signum
        if self.group is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.group, signum)   # a second Ctrl-C goes on too: the stage then stops at once

    def wait_group(self, group: int) -> None:
        """Until no process of ``group`` is left (orphaned workers included)."""
        while True:
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def stream(cmd: Sequence[str], log: BinaryIO | None, cwd: str | None = None, env: dict[str, str] | None = None,
           stop: StopSignals | None = None) -> tuple[int, str | None]:
    """Run ``cmd`` in its own process group, copying its combined output to the terminal and to ``log`` as it comes
    (progress bars too; ``log=None``: the output goes straight to the terminal); return its exit code and the
    checkpoint it reported saving on a stop signal, if any. With ``stop``, the stop signals reach the group."""
    pipe = subprocess.PIPE if log is not None else None
    proc = subprocess.Popen(list(cmd), stdout=pipe, stderr=subprocess.STDOUT if pipe else None, cwd=cwd, env=env,
                            process_group=0)
    saved = None
    if stop is not None:
        stop.group = proc.pid
        if stop.signum:   # arrived between the fork and here
            os.killpg(proc.pid, stop.signum)
    try:
        if log is not None:
            assert proc.stdout is not None
            out, tail = sys.stdout.buffer, b""
            while True:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                out.write(chunk)
                out.flush()
                log.write(chunk)
                log.flush()
                found = _SAVED.findall(tail + chunk)
                saved = found[-1].decode(errors="replace") if found else saved
                tail = chunk[-512:]
        code = proc.wait()
        if stop is not None and stop.signum:
            stop.wait_group(proc.pid)
    finally:
        if stop is not None:
            stop.group = None
    return code, saved


def run_in_order(jobs: Sequence[JobSpec], executor: str, run_one: Callable[[JobSpec, StopSignals], tuple[int, str | None]]) -> int:
    """Run each stage's script with ``run_one`` in order, stopping at the first failure with one line naming the
    stage, its log and the stages not run (the local and BCP executors run their scripts this way). A stop signal
    is passed on to the running stage; once it has exited, ``Stopped`` is raised (the caller releases the lock and
    prints ``Stopped.line``)."""
    with StopSignals() as stop:
        for i, job in enumerate(jobs, 1):
            if stop.signum:
                raise Stopped(stop.signum, job.stage, None, None)
            print(f"[{i}/{len(jobs)}] {job.stage}: {job.script_path(executor)} (log: {job.log_path})", flush=True)
            rc, saved = run_one(job, stop)
            if stop.signum:
                raise Stopped(stop.signum, job.stage, rc, saved)
            if rc != 0:
                break
        else:
            print(f"done: {len(jobs)} stage(s) finished: {', '.join(j.stage for j in jobs)}", flush=True)
            return 0
    left = ", ".join(j.stage for j in jobs[i:]) or "none"
    print(f"error: stage '{job.stage}' failed with exit code {rc}; see {job.log_path}. Not run: {left}",
          file=sys.stderr, flush=True)
    return rc
