"""One launch per results folder at a time: ``launch.lock`` in each stage's results folder.

A launch takes the lock of every stage folder it writes before it writes anything there, and holds it for the whole
local (or BCP) run, or for the submitted chain on Slurm. The file is JSON: the owner's host, pid (and the pid's
start time, so a reused pid is not mistaken for the owner), the command line, the folder it was launched from,
the executor, when, and on Slurm the chain's job ids once submitted.

A lock is stale, and taken over, when its owner is gone: the pid is no longer running on this host (a killed
``main.py``), or, once Slurm job ids are recorded, none of them is in ``squeue`` any more (the chain has ended).
A lock from another host without job ids cannot be checked and counts as held (the refusal says how to clear it).
Every check-and-take happens under ``flock`` on the folder itself (never deleted, so all contenders lock the same
inode) and the file is written atomically (temporary file, rename), so two launches can never both win.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from stages.common import io
from stages.common.errors import UserError

NAME = "launch.lock"


def _start_time(pid: int) -> str | None:
    """The pid's start time in clock ticks since boot (field 22 of /proc/<pid>/stat); None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _start_time(pid)
    return start is None or now is None or now == start


def slurm_jobs_alive(job_ids: Sequence[str]) -> bool | None:
    """Whether any of ``job_ids`` is still in ``squeue`` (pending, running, requeued); None when squeue cannot tell."""
    try:
        proc = subprocess.run(["squeue", "--noheader", f"--jobs={','.join(job_ids)}", "--format=%i"],
                              capture_output=True, text=True, timeout=60)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return False if "Invalid job id" in proc.stderr else None
    return any(line.strip() in job_ids for line in proc.stdout.splitlines())


@dataclass
class Owner:
    """What a lock file says about the launch holding it."""

    token: str
    host: str
    pid: int
    pid_start: str | None
    command: str
    cwd: str
    executor: str
    since: str
    slurm_jobs: list[str] = field(default_factory=list)

    @classmethod
    def me(cls, command: str, executor: str) -> "Owner":
        return cls(token=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid(), pid_start=_start_time(os.getpid()),
                   command=command, cwd=os.getcwd(), executor=executor,
                   since=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    @classmethod
    def read(cls, path: Path) -> "Owner | None":
        try:
            data = json.loads(path.read_text())
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError):   # not ours or damaged: an owner nobody can be
            return cls(token="?", host="?", pid=0, pid_start=None, command="?", cwd="?", executor="?", since="?")

    def alive(self) -> bool | None:
        """True/False when it can be told, None when not (another host without Slurm job ids, squeue unreachable)."""
        if self.slurm_jobs:
            return slurm_jobs_alive(self.slurm_jobs)
        if self.host != socket.gethostname():
            return None
        return self.pid > 0 and _pid_alive(self.pid, self.pid_start)

    def describe(self) -> str:
        who = (f"Slurm jobs {','.join(self.slurm_jobs)}" if self.slurm_jobs else f"pid {self.pid} on {self.host}")
        return f"{who}, since {self.since}: {self.command}"

    def fix(self, lock: Path) -> str:
        if self.slurm_jobs:
            stop = f"scancel {' '.join(self.slurm_jobs)}"
        elif self.host == socket.gethostname():
            stop = f"kill {self.pid}"
        else:
            stop = f"stop it on {self.host} (or delete {lock} if it is not running)"
        return f"wait for it to finish, {stop}, or launch into another folder (base_results_dir=...)"


@contextlib.contextmanager
def _guard(folder: Path) -> Iterator[None]:
    """Exclusive flock on the folder itself for one check-and-take (or release)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)   # closing drops the flock


def holder(folder: str | os.PathLike[str]) -> Owner | None:
    """The live (or unverifiable) owner of ``folder``'s lock, None when free or stale."""
    owner = Owner.read(Path(folder) / NAME)
    return owner if owner is not None and owner.alive() is not False else None


def _refuse_if_held(folder: Path, owner: Owner | None) -> None:
    if owner is not None:
        raise UserError(f"{folder} is in use by another launch ({owner.describe()}); {owner.fix(folder / NAME)}")


class LaunchLock:
    """The locks of one launch: ``acquire`` all folders or none, ``record_jobs`` on Slurm, ``release`` at the end."""

    def __init__(self, folders: Sequence[str], command: str, executor: str) -> None:
        self.folders = [Path(f) for f in sorted(dict.fromkeys(os.path.abspath(f) for f in folders))]
        self.me = Owner.me(command, executor)
        self.held: list[Path] = []

    def _write(self, folder: Path) -> None:
        io.write_json(folder / NAME, self.me.__dict__)

    def acquire(self) -> "LaunchLock":
        """Take every folder's lock; on a live owner release what was taken and raise the one-line refusal (a first
        pass without taking anything, so a plain refusal creates no folder)."""
        for folder in self.folders:
            _refuse_if_held(folder, holder(folder))
        for folder in self.folders:
            folder.mkdir(parents=True, exist_ok=True)
            with _guard(folder):
                owner = Owner.read(folder / NAME)
                try:
                    _refuse_if_held(folder, owner if owner is not None and owner.alive() is not False else None)
                except UserError:
                    self.release()
                    raise
                if owner is not None and not owner.slurm_jobs:   # a chain that ended is the normal end, not news
                    print(f"note: {folder / NAME}: taking over the stale lock of {owner.describe()} (no longer running)",
                          file=sys.stderr, flush=True)
                self._write(folder)
            self.held.append(folder)
        return self

    def record_jobs(self, job_ids: Sequence[str]) -> None:
        """On Slurm: the lock now lasts as long as these jobs are in squeue, whatever happens to this process."""
        self.me.slurm_jobs = list(job_ids)
        for folder in self.held:
            with _guard(folder):
                self._write(folder)

    def release(self) -> None:
        """Remove the lock files that are still ours."""
        for folder in reversed(self.held):
            if not folder.is_dir():   # removed with the rest of a launch that failed to write its files
                continue
            with _guard(folder):
                owner = Owner.read(folder / NAME)
                if owner is not None and owner.token == self.me.token:
                    (folder / NAME).unlink()
        self.held = []


def warn_if_held(folders: Sequence[str]) -> list[str]:
    """For a dry run, which takes no lock: one warning per folder another launch holds."""
    out = []
    for folder in sorted(dict.fromkeys(folders)):
        owner = holder(folder)
        if owner is not None:
            out.append(f"{folder} is in use by another launch ({owner.describe()}); this dry run's scripts and "
                       f"configs are written beside it (each running stage reads its own config snapshot)")
    return out
