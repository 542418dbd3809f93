"""``exp_manager.resume_if_exists=false`` starts over without mixing or silently replacing anything: the previous
run's outputs (its log folder with checkpoints, metrics, summary and loss curve, and its artifact) move to
``previous/<UTC time>/`` beside the log folder before this run writes its first file."""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Iterable

from stages.common.io import fsync_dir

log = logging.getLogger("promptlaunch.prompt_learning")


def _has_outputs(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def set_aside(log_dir: Path, others: Iterable[Path] = (), now: float | None = None) -> Path | None:
    """Move ``log_dir`` and ``others`` (outputs outside it, e.g. an artifact elsewhere) that hold anything to
    ``<log_dir parent>/previous/<UTC time>/``; returns that folder, or None when there was nothing to move. Rank 0
    only: the other ranks write nothing before training starts."""
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return None
    log_dir = Path(log_dir)
    moving = [p for p in [log_dir, *(Path(o) for o in others)]
              if _has_outputs(p) and (p == log_dir or log_dir not in p.parents)]
    if not moving:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    target = log_dir.parent / "previous" / stamp
    n = 1
    while target.exists():                       # two restarts within one second
        n += 1
        target = log_dir.parent / "previous" / f"{stamp}-{n}"
    target.mkdir(parents=True)
    for p in moving:
        shutil.move(str(p), str(target / p.name))
        fsync_dir(p.parent)
    fsync_dir(target)
    log.warning("prompt_learning.exp_manager.resume_if_exists=false: the previous run's outputs (%s) moved to %s",
                ", ".join(p.name for p in moving), target)
    return target
