"""Which checkpoint a rerun resumes from: ``last.ckpt`` if it is complete and written for this configuration,
else ``last.prev.ckpt`` (with a warning naming both), else a one-line error saying what to delete or set."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stages.common.errors import UserError
from stages.common.io import remove_stale_tmp

from .checkpoint_io import LAST, PREV
from .state import STATE_KEY

log = logging.getLogger("promptlaunch.prompt_learning")

FIX = "delete {dir} to start over, or set prompt_learning.exp_manager.resume_if_exists=false"
LAYOUT_DEFAULTS: dict[str, Any] = {"batching": None}   # layout keys written only when not plain (batching.batching_layout)


@dataclass
class Resume:
    path: str | None = None
    step: int = 0
    fallback_from: str | None = None   # the unusable last.ckpt, when resuming from last.prev.ckpt


def load_checkpoint_file(path: Path) -> tuple[dict[str, Any] | None, str]:
    """(checkpoint, '') or (None, why it cannot be used); read the way Lightning reads it (weights_only)."""
    try:
        ck = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, unreadable file, ...
        first = " ".join(str(exc).split()).split(". ")[0]
        return None, f"{type(exc).__name__}: {first[:120]}"
    if not isinstance(ck, dict):
        return None, f"holds a {type(ck).__name__}, not a Lightning checkpoint"
    missing = [k for k in ("state_dict", "optimizer_states", "loops", "global_step", "callbacks") if k not in ck]
    if missing:
        return None, f"incomplete Lightning checkpoint (no {', '.join(missing)})"
    return ck, ""


def check_compatible(ck: dict[str, Any], path: Path, layout: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
    """A readable checkpoint of another configuration: one line naming the difference (no fallback helps)."""
    fix = FIX.format(dir=path.parent)
    got = {k: tuple(v.shape) for k, v in ck["state_dict"].items() if hasattr(v, "shape")}
    if set(got) != set(shapes) or any(got[k] != shapes[k] for k in shapes):
        diff = sorted(set(got) ^ set(shapes)) or [k for k in shapes if got[k] != shapes[k]]
        k = diff[0]
        raise UserError(f"{path}: checkpoint does not match this config (prompt parameter {k}: checkpoint "
                        f"{got.get(k, 'absent')}, config {shapes.get(k, 'absent')}); {fix}")
    saved = (ck["callbacks"].get(STATE_KEY) or {}).get("layout")
    if saved is None:   # written before checkpoints carried it: the batch position is restored, the RNG is not
        log.warning("%s has no data layout or RNG state (an older promptlaunch wrote it); resuming anyway, but the result "
                    "may differ slightly from an uninterrupted run if training draws random numbers (dropout)", path)
        return
    for key in [*layout, *(k for k in saved if k not in layout)]:   # a key absent on one side: its default
        want = layout.get(key, LAYOUT_DEFAULTS.get(key))
        if saved.get(key, LAYOUT_DEFAULTS.get(key)) != want:
            raise UserError(f"{path}: checkpoint was written with {key}={saved.get(key)!r}, this config gives "
                            f"{want!r}, so the resumed run would not see the same batches; {fix}")


def select_resume(ckpt_dir: Path, layout: dict[str, Any], shapes: dict[str, tuple[int, ...]], rank: int = 0) -> Resume:
    """The checkpoint to resume from (None: start from scratch); see the module docstring."""
    if rank == 0:
        for p in remove_stale_tmp(ckpt_dir):
            log.info("removed %s, left by a write that was interrupted", p)
    last = ckpt_dir / LAST
    if not last.is_file():
        return Resume()
    bad: list[tuple[Path, str]] = []
    for cand in (last, ckpt_dir / PREV):
        if cand == last or cand.is_file():
            ck, why = load_checkpoint_file(cand)
            if ck is None:
                bad.append((cand, why))
                continue
            check_compatible(ck, cand, layout, shapes)
            step = int(ck.get("global_step", 0))
            if bad:
                log.warning("%s is unusable (%s); resuming from the previous good checkpoint %s (step %d)",
                            bad[0][0], bad[0][1], cand, step)
            return Resume(str(cand), step, str(bad[0][0]) if bad else None)
    detail = "; ".join(f"{p.name}: {why}" for p, why in bad)
    prev_note = "" if len(bad) > 1 else f" and there is no {PREV} to fall back to"
    raise UserError(f"{last}: checkpoint is corrupt or truncated ({detail}){prev_note}; {FIX.format(dir=ckpt_dir)}")
