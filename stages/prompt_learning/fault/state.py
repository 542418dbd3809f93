"""RNG states and the data position in every checkpoint, so a resumed run draws the same random numbers and
sees the same batches as an uninterrupted one."""
from __future__ import annotations

import random
from typing import Any

import pytorch_lightning as pl
import torch

STATE_KEY = "promptlaunch.ResumeState"


def capture_rng() -> dict[str, Any]:
    """All RNG states a training step may draw from, in types ``torch.load(weights_only=True)`` accepts."""
    import numpy as np

    version, py_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _dist_world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1


class ResumeState(pl.Callback):
    """RNG states (one per rank) and the data position in every checkpoint; RNG restored before the first
    resumed batch, so nothing that runs between the restore and that batch can shift the random stream."""

    def __init__(self, identity: dict[str, Any]) -> None:
        self.identity = dict(identity)
        self._pending: dict[str, Any] | None = None
        self._trainer: Any = None

    @property
    def state_key(self) -> str:
        return STATE_KEY

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        rng = capture_rng()
        if _dist_world() > 1:   # every rank dumps the checkpoint; rank 0 writes what all of them gathered
            ranks: list[Any] = [None] * _dist_world()
            torch.distributed.all_gather_object(ranks, rng)
        else:
            ranks = [rng]
        t = self._trainer
        module = t.lightning_module if t is not None else None
        position = {
            "epoch": int(t.current_epoch) if t is not None else 0,
            "batches_in_epoch": int(getattr(module, "epoch_batches", 0)),
            "global_step": int(t.global_step) if t is not None else 0,
        }
        return {"rng": ranks, "identity": dict(self.identity), "position": position}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict.get("rng") or []
        rank = int(self._trainer.global_rank) if self._trainer is not None else 0
        self._pending = ranks[rank] if rank < len(ranks) else (ranks[0] if ranks else None)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._pending is not None:
            restore_rng(self._pending)
            self._pending = None
