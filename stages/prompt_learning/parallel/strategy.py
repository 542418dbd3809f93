"""The Lightning strategy of a parallel run (process group and device mesh, no wrapping, plain rank-0
checkpoints) and the step counters that let a checkpoint resume under either module."""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.strategies import ModelParallelStrategy


class PromptParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` for the process group and device mesh (no DDP wrapping: the frozen model is
    not a registered submodule and the prompt gradient is reduced by the engine), with ordinary checkpoints:
    the registered state is only the prompt store, full and identical on every rank, so rank 0 writes the
    same file the single-process engine writes (``state_dict`` = ``prompts.*``, integer-keyed optimizer
    state) and every rank reads it back -- a checkpoint resumes under any layout."""

    def __init__(self, world_size: int, **kwargs: Any) -> None:
        super().__init__(data_parallel_size=world_size, tensor_parallel_size=1, save_distributed_checkpoint=False,
                         **kwargs)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        assert self.lightning_module is not None
        return self.lightning_module.state_dict()

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        return pl.strategies.Strategy.optimizer_state(self, optimizer)

    @property
    def lightning_restore_optimizer(self) -> bool:
        return True

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = self.broadcast(checkpoint_path)
        return self.checkpoint_io.load_checkpoint(path, weights_only=weights_only)   # the trainer's CheckpointIO

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        pl.strategies.Strategy.load_model_state_dict(self, checkpoint, strict=strict)

    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        pl.strategies.Strategy.load_optimizer_state_dict(self, checkpoint)


_AUTO = "epoch_loop.automatic_optimization.optim_progress"
_MANUAL = "epoch_loop.manual_optimization.optim_step_progress"


def sync_step_counters(checkpoint: dict[str, Any]) -> None:
    """Make a checkpoint's optimiser-step counters readable by both modules: Lightning derives ``global_step``
    from the automatic-optimisation counters in the single-process module and from the manual ones here."""
    fit = (checkpoint.get("loops") or {}).get("fit_loop")
    if not isinstance(fit, dict) or _AUTO not in fit or _MANUAL not in fit:
        return
    auto_step, manual = fit[_AUTO]["optimizer"]["step"], fit[_MANUAL]
    steps = {part: max(int(auto_step[part]["completed"]), int(manual[part]["completed"])) for part in ("total", "current")}
    for part, n in steps.items():
        auto_step[part].update(ready=n, completed=n)
        manual[part].update(ready=n, completed=n)
        zero = fit[_AUTO]["optimizer"].get("zero_grad", {}).get(part)
        if isinstance(zero, dict):
            zero.update(ready=n, started=n, completed=n)
