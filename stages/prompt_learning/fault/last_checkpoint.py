"""``last.ckpt``, the file a rerun resumes from: every N steps, after each validation, at the end of training
and on the preemption signal, always at an optimizer-step boundary."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.trainer.states import TrainerFn

from .checkpoint_io import LAST
from .preemption import REQUEUE_ENV, Preempted, PreemptionFlag

log = logging.getLogger("promptlaunch.prompt_learning")


class LastCheckpoint(Checkpoint):
    """Owns ``last.ckpt``, the file a rerun resumes from; ``ModelCheckpoint`` keeps only the top-k by val_loss.

    Written at optimizer-step boundaries only (never between the micro-batches of one step): every
    ``every_n_train_steps`` steps (if set), after every validation, when training ends, and when the preemption
    signal arrived. A save due at a step that triggers validation waits until after it, so a resumed run does not
    have to repeat that validation. (``ModelCheckpoint`` cannot do this job: with a monitored metric it writes
    ``last.ckpt`` only when the metric is fresh and improved, so a run could go many steps without one.)
    Being a ``Checkpoint``, Lightning runs it after ``ModelCheckpoint``, so the top-k bookkeeping of a
    validation is in the file.
    """

    def __init__(self, ckpt_dir: Path, every_n_train_steps: int | None, flag: PreemptionFlag) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.every = int(every_n_train_steps) if every_n_train_steps else None
        self.flag = flag
        self.resumed_step = 0
        self._saved_step = -1
        self._after_validation = False

    @property
    def state_key(self) -> str:
        return "promptlaunch.LastCheckpoint"

    def _agreed(self, trainer: Any) -> bool:
        if trainer.world_size > 1:   # every rank reaches the same boundaries, so this collective is symmetric
            return bool(trainer.strategy.reduce_boolean_decision(self.flag.requested, all=False))
        return self.flag.requested

    def save(self, trainer: Any) -> None:
        trainer.save_checkpoint(str(self.ckpt_dir / LAST))
        self._saved_step = int(trainer.global_step)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._saved_step = int(trainer.global_step)   # the step resumed from (or 0) is on disk already
        if self._agreed(trainer):
            self._stop(trainer, saved=False)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        should_acc = getattr(trainer.fit_loop, "_should_accumulate", None)
        if should_acc is not None and should_acc():
            return          # between micro-batches of one optimizer step: gradients are not in checkpoints
        step = int(trainer.global_step)
        preempt = self._agreed(trainer)
        periodic = self.every is not None and step % self.every == 0
        if not (preempt or periodic) or step == self._saved_step:
            return
        if trainer.fit_loop.epoch_loop._is_training_done:
            return          # the last step: on_train_end saves, and finishing beats a requeue
        if _validation_follows(trainer):
            self._after_validation = True      # on_validation_end saves (and stops, if preempted)
            return
        self.save(trainer)
        if preempt:
            self._stop(trainer)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        self._after_validation = False
        preempt = self._agreed(trainer)
        if int(trainer.global_step) != self._saved_step:
            self.save(trainer)
        if preempt and not trainer.fit_loop.epoch_loop._is_training_done:
            self._stop(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if int(trainer.global_step) != self._saved_step:
            self.save(trainer)   # a kill while the artifact is written then costs no training at all

    def _stop(self, trainer: Any, saved: bool = True) -> None:
        step = int(trainer.global_step)
        name = (self.flag.received or self.flag.signum).name
        marker = os.environ.get(REQUEUE_ENV) if self.flag.requeue else None
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if trainer.is_global_zero:
            what = f"checkpoint saved at step {step} to {self.ckpt_dir / LAST}" if saved else "nothing new to save"
            if marker and step == self.resumed_step and restarts > 0:
                log.error("%s: %s, and no step completed since the job was requeued; not requeueing again (that "
                          "loop would make no progress): raise run.time_limit or lower the lead time in "
                          "cluster.signal", name, what)
            elif marker:
                from stages.common.io import write_text

                write_text(marker, f"{step}\n")
                log.warning("%s: %s; the job script requeues the job, which resumes from it", name, what)
            else:
                log.warning("%s: %s; rerun the same command to resume", name, what)
        raise Preempted()


def _validation_follows(trainer: Any) -> bool:
    """Whether Lightning runs validation right after the current training batch (private loop API)."""
    try:
        n_val = trainer.num_val_batches
        n_val = sum(n_val) if isinstance(n_val, list) else n_val
        el = trainer.fit_loop.epoch_loop
        return bool(n_val) and bool(el._should_check_val_fx(trainer.fit_loop._data_fetcher))
    except Exception:  # a Lightning without these internals: save right away
        return False
