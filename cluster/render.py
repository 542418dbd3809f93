"""Pieces shared by every executor's script renderer. All pure: no clock, no environment, no I/O.

Every user-controlled value goes through ``q`` (shlex.quote), so a path like ``/x/$(rm -rf ~); y``
stays a literal string in the rendered script.
"""
from __future__ import annotations

import re
import shlex
from typing import Iterable, Sequence

from cluster.jobspec import JobSpec

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def q(value: object) -> str:
    """Shell-quote one value."""
    return shlex.quote(str(value))


def join(argv: Sequence[object]) -> str:
    """Shell-quote and join a command line."""
    return " ".join(q(a) for a in argv)


def comment(text: str) -> str:
    """A single-line ``#`` comment: newlines in user text must not end the comment."""
    return "# " + " ".join(str(text).split())


def env_lines(job: JobSpec) -> list[str]:
    """``export`` lines, sorted, then secrets read from their files at job time (the value never appears)."""
    lines = [f"export {k}={q(v)}" for k, v in sorted(job.env)]
    for name, path in sorted(job.secret_files):
        lines.append(f"export {name}=\"$(cat {q(path)})\"  # secret read at job time")
    return lines


def env_names(job: JobSpec) -> list[str]:
    """The variables ``env_lines`` exports, in the same order (for launchers that forward them by name)."""
    return [k for k, _ in sorted(job.env)] + [name for name, _ in sorted(job.secret_files)]


def check_env_names(names: Iterable[str]) -> list[str]:
    """Return the names that are not valid shell variable names."""
    return [n for n in names if not _ENV_NAME.match(n)]


def header(job: JobSpec, executor: str, rerun: str) -> list[str]:
    """Opening lines every script shares: what it is and how to run it again by hand."""
    return [
        "#!/usr/bin/env bash",
        comment(f"promptlaunch stage '{job.stage}', job '{job.name}', executor '{executor}'."),
        comment(f"Config: {job.config_path}"),
        comment(f"Rerun by hand: {rerun}"),
    ]
