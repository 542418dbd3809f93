"""Atomic checkpoint files: every checkpoint is written whole or not at all, and ``last.ckpt`` keeps a fallback.

Lightning's own writer is not enough: it goes through an fsspec transaction that writes the temporary file into
the *system* temp folder and then moves it, which across filesystems (``/tmp`` vs. a results mount) is a copy
into the final path, so a kill mid-copy leaves a truncated ``last.ckpt``; it never fsyncs either.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins import TorchCheckpointIO

from stages.common.io import atomic_path

LAST = "last.ckpt"
PREV = "last.prev.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file next to the target, fsync, rename; keep the previous last.ckpt."""

    def __init__(self) -> None:
        super().__init__()
        # last.ckpt files known to be good: written by this process, or checked by select_resume. Only those
        # become last.prev.ckpt, so a corrupt or foreign last.ckpt never replaces a good fallback.
        self.trusted: set[str] = set()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint does not take storage_options")
        target = Path(os.path.abspath(str(path)))
        if target.name == LAST and str(target) in self.trusted and target.is_file():
            keep_previous(target)
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as fh:
                torch.save(checkpoint, fh)
        if target.name == LAST:
            self.trusted.add(str(target))


def keep_previous(last: Path) -> Path:
    """Make ``last.prev.ckpt`` a copy of the current ``last.ckpt`` (copy to a temporary name, fsync, rename).

    A copy, not a hard link: a link would share the file's data, so damage done to ``last.ckpt`` in place (a
    truncating copy over it, a bad block) would take the fallback with it. Prompt-only checkpoints are small.
    """
    prev = last.with_name(PREV)
    with atomic_path(prev) as tmp:
        shutil.copyfile(last, tmp)
    return prev
