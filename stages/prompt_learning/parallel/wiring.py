"""The prompt_learning stage on several processes: tensor, pipeline and data parallel, exact.

The recipe (``train.py``) uses this path whenever the job has more than one process or
``model.tensor_model_parallel_size x model.pipeline_model_parallel_size > 1``; a single process with TP = PP = 1
keeps the plain automatic-optimisation module of ``stages/prompt_learning/module.py``. This module wires the path
(:func:`parallel_module`, :func:`parallel_trainer`, :func:`parallel_dataloaders`); the pieces: ``checks.py``
(config checks before the process group exists), ``engines.py`` (one optimiser step on this rank), ``data.py``
(samplers, ``PadCollate``), ``strategy.py`` (the Lightning strategy, checkpoint step counters) and
``lightning_module.py`` (``ParallelPromptModule``).

What is the same as the single-process engine: examples, templates, truncation, answer-only labels, the
``PromptStore`` (per-task tables, restored frozen tasks, prompt tuning or P-tuning), the optimizer and LR
schedule from ``prompt_learning.model.optim``, gradient clipping, ``val_loss``, checkpoints holding only the prompt state (same
keys as the single-process engine: ``prompts.*``), the artifact and loss curve written by rank 0.

What is different (and why):

* **Manual optimisation.** One Lightning "batch" is this data-parallel rank's share of a GLOBAL batch
  (``global_batch_size / DP`` rows); the engine splits it into micro batches itself (pipeline micro batches
  under PP, gradient accumulation otherwise), reduces the prompt gradient and the optimiser steps once.
  ``trainer.val_check_interval`` / ``limit_val_batches`` given as integers therefore count optimiser steps /
  global batches (as in NeMo), not micro batches.
* **Loss = token mean over the global batch** (sum of the cross entropy of every answer token of the global
  batch / their number), whatever TP, PP, DP and the micro batch size. The single-process engine computes the
  same quantity when ``micro_batch_size == global_batch_size`` (with Lightning gradient accumulation it averages
  micro-batch means instead), so that is the run the parallel layouts reproduce exactly.
* **TP x PP > 1** (Llama architecture only): :class:`stages.prompt_learning.parallel.ShardedPromptModel`
  shards/splits the frozen model on a (pp, dp, tp) ``DeviceMesh``. The engine's batch format is mapped to the
  library's: virtual row ``k`` of task ``t`` becomes id ``-(offset_t + k + 1)`` of ONE table that is the
  concatenation of every task's table (:class:`StoreTable`), so several tasks, restored frozen tasks and P-tuning
  encoders all work. P-tuning needs ``model.p_tuning.dropout=0`` there (TP ranks recompute the encoder output
  independently and must agree).
* **TP = PP = 1, DP > 1** (any architecture, including T5/mT5): :class:`DataParallelEngine` runs the family's own
  loss on each rank and SUM-all-reduces loss, token count and gradients (plain DDP would average per-rank means).
* Every data-parallel rank runs the same number of steps: the last, short global batch and the validation tail
  are filled with copies of an example whose labels are all ignored (they add nothing to loss or gradient).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import pytorch_lightning as pl

from stages.common.errors import UserError
from stages.engine.prompts import PromptStore

from .data import EvalBatchSampler, GlobalBatchSampler, PadCollate
from .layout import ParallelLayout
from .lightning_module import ParallelPromptModule
from .strategy import PromptParallelStrategy

log = logging.getLogger("promptlaunch.prompt_learning")


def parallel_module(*, layout: ParallelLayout, model: Any, store: PromptStore, family: Any, optim: dict[str, Any],
                    examples: Sequence[Any], clip_val: Any, micro_batch_size: int) -> ParallelPromptModule:
    """The module of the parallel path; it clips gradients itself (manual optimisation), so ``clip_val`` is
    ``trainer.gradient_clip_val`` and :func:`parallel_trainer` keeps it away from the Trainer."""
    # pipeline stages exchange fixed-shape activations: pad every batch to the longest example of the run
    pad_to = max(len(e.input_ids) for e in examples) if layout.pp > 1 else None
    return ParallelPromptModule(model, store, family, optim, layout=layout, pad_to=pad_to,
                                clip_val=float(clip_val) if clip_val else None, micro_batch_size=micro_batch_size)


def parallel_trainer(trainer_kwargs: dict[str, Any], layout: ParallelLayout) -> pl.Trainer:
    """``pl.Trainer`` with :class:`PromptParallelStrategy`: one Lightning batch is one optimiser step, and
    gradient clipping is the module's."""
    kwargs = dict(trainer_kwargs)
    kwargs.pop("gradient_clip_val", None)
    kwargs.update(strategy=PromptParallelStrategy(layout.world_size), accumulate_grad_batches=1,
                  use_distributed_sampler=False)
    trainer = pl.Trainer(**kwargs)
    if trainer.world_size != layout.world_size:
        raise UserError(f"prompt_learning.trainer.devices x prompt_learning.trainer.num_nodes = {layout.world_size} but Lightning sees {trainer.world_size} processes")
    return trainer


def parallel_dataloaders(module: ParallelPromptModule, trainer: pl.Trainer, layout: ParallelLayout, *,
                         train_ex: Sequence[Any], val_ex: Sequence[Any], collate: Callable, shuffle: bool, seed: int,
                         num_workers: int = 0) -> tuple[Any, Any]:
    """(train_dataloader, val_dataloader): global batches sharded by this process's data-parallel rank."""
    from torch.utils.data import DataLoader

    dp_rank = (trainer.global_rank // layout.tp) % layout.dp      # mesh order (pp, dp, tp), tp innermost
    module.expected_dp_rank = dp_rank
    rows = layout.rows_per_dp_rank
    sampler = GlobalBatchSampler(len(train_ex), layout.global_batch_size, dp=layout.dp, dp_rank=dp_rank,
                                 shuffle=shuffle, seed=seed, epoch_fn=lambda: trainer.current_epoch)
    module.sampler = sampler
    train_dl = DataLoader(train_ex, batch_sampler=sampler, collate_fn=PadCollate(collate, rows, train_ex[0]),
                          num_workers=num_workers)
    val_dl = None
    if val_ex:
        val_dl = DataLoader(val_ex, batch_sampler=EvalBatchSampler(len(val_ex), layout.global_batch_size, dp=layout.dp,
                                                                   dp_rank=dp_rank),
                            collate_fn=PadCollate(collate, rows, val_ex[0]), num_workers=num_workers)
    log.info("parallel layout: TP %d x PP %d (%s) x DP %d = %d processes; global batch %d = %d rows per data-parallel "
             "rank in %d micro batches of %d%s", layout.tp, layout.pp, layout.schedule if layout.pp > 1 else "-", layout.dp,
             layout.world_size, layout.global_batch_size, rows, layout.n_microbatches, layout.micro_batch_size,
             f"; sequences padded to {module.pad_to}" if module.pad_to else "")
    return train_dl, val_dl
