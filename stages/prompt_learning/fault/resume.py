"""Which checkpoint a rerun resumes from: ``last.ckpt`` if it is complete and written by this run (the same run
identity, ``identity.py``), else ``last.prev.ckpt`` (with a warning naming both), else a one-line error saying what
to delete or set."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from stages.common.errors import UserError
from stages.common.io import remove_stale_tmp

from .checkpoint_io import LAST, PREV
from ..identity import IGNORE_KEY, changed_keys, matches_ignored
from .state import STATE_KEY

log = logging.getLogger("promptlaunch.prompt_learning")

FIX = "delete {dir} to start over, or set prompt_learning.exp_manager.resume_if_exists=false"


@dataclass
class Resume:
    path: str | None = None
    step: int = 0
    fallback_from: str | None = None   # the unusable last.ckpt, when resuming from last.prev.ckpt
    changed: list[str] = field(default_factory=list)   # identity keys let through by resume_ignore_changes


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


def check_compatible(ck: dict[str, Any], path: Path, identity: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                     ignore: Sequence[str] = ()) -> list[str]:
    """A readable checkpoint of another run: one line naming what differs and the three ways on. Returns the changed
    keys that ``ignore`` (``exp_manager.resume_ignore_changes``) lets through."""
    got = {k: tuple(v.shape) for k, v in ck["state_dict"].items() if hasattr(v, "shape")}
    if set(got) != set(shapes) or any(got[k] != shapes[k] for k in shapes):
        diff = sorted(set(got) ^ set(shapes)) or [k for k in shapes if got[k] != shapes[k]]
        k = diff[0]
        raise UserError(f"{path}: checkpoint does not match this config (prompt parameter {k}: checkpoint "
                        f"{got.get(k, 'absent')}, config {shapes.get(k, 'absent')}); {FIX.format(dir=path.parent)}")
    saved = (ck["callbacks"].get(STATE_KEY) or {}).get("identity")
    if saved is None:
        raise UserError(f"{path}: checkpoint has no run identity (an older promptlaunch wrote it), so it cannot be "
                        f"told apart from another run's; {FIX.format(dir=path.parent)}")
    changed = changed_keys(saved, identity)
    blocking = [k for k in changed if not matches_ignored(k, ignore)]
    if blocking:
        shown = ", ".join(blocking[:6]) + (f" and {len(blocking) - 6} more" if len(blocking) > 6 else "")
        names = ",".join(k.split(" (")[0].removeprefix("prompt_learning.") for k in blocking)
        raise UserError(f"{path}: checkpoint was written by a run with other settings ({shown}); choose a new "
                        f"prompt_learning.run.name (a new folder), start over with "
                        f"prompt_learning.exp_manager.resume_if_exists=false (the previous outputs are moved aside), or "
                        f"continue it anyway with {IGNORE_KEY}=[{names}]")
    return changed


def select_resume(ckpt_dir: Path, identity: dict[str, Any], shapes: dict[str, tuple[int, ...]], rank: int = 0,
                  ignore: Sequence[str] = ()) -> Resume:
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
            changed = check_compatible(ck, cand, identity, shapes, ignore)
            step = int(ck.get("global_step", 0))
            if changed:
                log.warning("resuming %s although these settings changed (%s): %s", cand, IGNORE_KEY, ", ".join(changed))
            if bad:
                log.warning("%s is unusable (%s); resuming from the previous good checkpoint %s (step %d)",
                            bad[0][0], bad[0][1], cand, step)
            return Resume(str(cand), step, str(bad[0][0]) if bad else None, changed)
    detail = "; ".join(f"{p.name}: {why}" for p, why in bad)
    prev_note = "" if len(bad) > 1 else f" and there is no {PREV} to fall back to"
    raise UserError(f"{last}: checkpoint is corrupt or truncated ({detail}){prev_note}; {FIX.format(dir=ckpt_dir)}")
