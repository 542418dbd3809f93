"""The prompt_learning stage on several processes: tensor, pipeline and data parallel, exact.

``train.py`` uses this path whenever the job has more than one process or
``model.tensor_model_parallel_size x model.pipeline_model_parallel_size > 1``; a single process with TP = PP = 1
keeps the plain automatic-optimisation module of ``module.py``.

What is the same as the single-process engine: examples, templates, truncation, answer-only labels, the
``PromptStore`` (per-task tables, restored frozen tasks, prompt tuning or P-tuning), the optimizer and LR
schedule from ``model.optim``, gradient clipping, ``val_loss``, checkpoints holding only the prompt state (same
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
* **TP x PP > 1** (Llama architecture only): :class:`stages.prompt_learning.parallel.ParallelPromptTrainer`
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

import dataclasses
import logging
import math
from typing import Any, Callable, Iterator, Sequence

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn

from stages.common.errors import UserError

from stages.engine import examples as D
from .config import check_p_tuning_dropout
from .module import PromptLearningModule, ResumableBatchSampler
from .parallel.layout import ParallelLayout, check_model_for_layout
from stages.engine.prompts import PromptStore

log = logging.getLogger("promptlaunch.prompt_learning")
REAL_ROWS = "row_is_real"   # batch key added by PadCollate: False for the filler rows


# ----------------------------------------------------------------------------------------------------------
# config -> layout, and the checks that need the model config
# ----------------------------------------------------------------------------------------------------------
def use_parallel_path(layout: ParallelLayout) -> bool:
    return layout.world_size > 1 or layout.is_model_parallel


def check_parallel_config(cfg: Any, layout: ParallelLayout, model_config: Any, style: str) -> None:
    """Everything about the config that must fail before the process group exists."""
    import os

    env_world = os.environ.get("WORLD_SIZE")
    if env_world is not None and int(env_world) != layout.world_size:
        raise UserError(
            f"trainer.devices x trainer.num_nodes = {layout.world_size} but {env_world} processes were started; "
            f"start the stage through the launcher (it runs devices x num_nodes processes)"
        )
    precision = str(cfg.trainer.get("precision", "32"))
    if precision.startswith("16"):
        raise UserError(
            f"trainer.precision={precision}: fp16 loss scaling is not supported with several processes or "
            f"tensor/pipeline parallelism; use bf16-mixed (GPU) or 32"
        )
    if not layout.is_model_parallel:
        return
    if model_config is not None:   # else ParallelPromptTrainer checks the loaded model's config
        check_model_for_layout(model_config, layout, prefix="")
    check_p_tuning_dropout(cfg.model, style, layout.is_model_parallel)


# ----------------------------------------------------------------------------------------------------------
# the engine's per-task PromptStore as the library's single prompt table
# ----------------------------------------------------------------------------------------------------------
class StoreTable(nn.Module):
    """``forward()`` = every task's table stacked in ``store.tasks`` order ([sum of rows, hidden]).

    Restored tasks are frozen buffers, new tasks trainable tables or P-tuning encoders; gradients reach only the
    trainable ones. :meth:`library_batch` rewrites an engine batch (``virtual_index`` + ``task_ids``) into the
    library's ids: virtual row ``k`` of task ``t`` -> ``-(offset[t] + k + 1)``.
    """

    def __init__(self, store: PromptStore) -> None:
        super().__init__()
        self.store = store
        counts = [int(store.counts[t]) for t in store.tasks]
        self.register_buffer("offsets", torch.tensor([0, *counts[:-1]], dtype=torch.long).cumsum(0), persistent=False)
        self.n_rows = sum(counts)

    def forward(self) -> torch.Tensor:
        parts = [self.store.table(t) for t in self.store.tasks]
        if self.n_rows == 0:  # no virtual tokens at all: one unused row keeps the lookup well defined
            return torch.zeros(1, self.store.hidden, device=self.offsets.device)
        return torch.cat([p.float() for p in parts], dim=0)

    def library_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        vidx = batch["virtual_index"]
        off = self.offsets.to(vidx.device)[batch["task_ids"].to(vidx.device)][:, None]
        ids = torch.where(vidx >= 0, -(off + vidx + 1), batch["input_ids"])
        return {"input_ids": ids, "attention_mask": batch["attention_mask"], "labels": batch["labels"]}


def _count(labels: torch.Tensor) -> torch.Tensor:
    """Tokens the decoder-only loss scores (labels are shifted inside the loss)."""
    return (labels[:, 1:] != D.IGNORE).sum()


# ----------------------------------------------------------------------------------------------------------
# engines: one optimiser step's forward + backward + reduction on this rank
# ----------------------------------------------------------------------------------------------------------
class ModelParallelEngine:
    """TP x PP (x DP) through the library; the store is trained in place."""

    def __init__(self, model: Any, store: PromptStore, layout: ParallelLayout, device: torch.device,
                 pad_to: int | None) -> None:
        from .parallel.trainer import ParallelPromptTrainer

        self.table = StoreTable(store)
        self.trainer = ParallelPromptTrainer(model, self.table, layout, device=device, pad_to=pad_to, prefix="")
        self.layout = layout
        mesh = self.trainer.mesh
        self._dp_group = mesh["dp"].get_group() if (mesh is not None and layout.dp > 1) else None

    @property
    def data_parallel_rank(self) -> int:
        return self.trainer.data_parallel_rank

    def train_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.trainer.train_step(self.table.library_batch(batch))

    def eval_sums(self, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        """(sum of token CE, token count) over the global batch; same on every rank."""
        b = self.table.library_batch(batch)
        loss = self.trainer.eval_step(b)
        n = _count(b["labels"]).to(self.trainer.device)
        if self._dp_group is not None:
            dist.all_reduce(n, group=self._dp_group)
        return float(loss) * int(n), int(n)


class DataParallelEngine:
    """TP = PP = 1: the family's own forward/loss (any architecture) on this rank's rows, micro batch by
    micro batch, then ONE sum-all-reduce of (loss sum, gradients) and of the token count over the world, so the
    result is the global token mean exactly as one process on the whole batch computes it."""

    def __init__(self, model: Any, store: PromptStore, family: Any, layout: ParallelLayout, device: torch.device) -> None:
        self.model = model.to(device).eval()
        self.store = store.to(device)
        self.family = family
        self.layout = layout
        self.device = device
        self.distributed = dist.is_initialized() and dist.get_world_size() > 1
        if self.distributed and dist.get_world_size() != layout.world_size:
            raise UserError(f"the layout needs {layout.world_size} processes but {dist.get_world_size()} were started")
        self.rank = dist.get_rank() if self.distributed else 0
        if self.distributed:  # like DDP at wrap time: every rank starts from rank 0's prompt state
            with torch.no_grad():
                for t in list(store.parameters()) + list(store.buffers()):
                    dist.broadcast(t.data, src=0)

    @property
    def data_parallel_rank(self) -> int:
        return self.rank

    def _micro_batches(self, batch: dict[str, Any]) -> Iterator[dict[str, Any]]:
        n = self.layout.n_microbatches
        rows = next(v.shape[0] for v in batch.values() if torch.is_tensor(v))
        size = math.ceil(rows / n)
        for s in range(0, rows, size):
            yield {k: (v[s:s + size].to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def _params(self) -> list[nn.Parameter]:
        return [p for p in self.store.parameters() if p.requires_grad]

    def train_step(self, batch: dict[str, Any]) -> torch.Tensor:
        self.store.train()
        params = self._params()
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        count = torch.zeros((), dtype=torch.long, device=self.device)
        for mb in self._micro_batches(batch):
            s, n = self.family.loss(self.model, self.store, mb)
            if s.requires_grad:
                s.backward()   # un-normalised: divided by the GLOBAL token count after the reduction
            total += s.detach().float()
            count += n.to(count.device)
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = torch.cat([total.reshape(1)] + [g.reshape(-1) for g in grads])
        if self.distributed:
            dist.all_reduce(flat)
            dist.all_reduce(count)
        denom = count.clamp_min(1).to(torch.float32)
        off = 1
        for g in grads:
            g.copy_(flat[off:off + g.numel()].view_as(g) / denom)
            off += g.numel()
        return flat[0] / denom

    @torch.no_grad()
    def eval_sums(self, batch: dict[str, Any]) -> tuple[float, int]:
        self.store.eval()
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        count = torch.zeros((), dtype=torch.long, device=self.device)
        for mb in self._micro_batches(batch):
            s, n = self.family.loss(self.model, self.store, mb)
            total += s.float()
            count += n.to(count.device)
        if self.distributed:
            dist.all_reduce(total)
            dist.all_reduce(count)
        return float(total), int(count)


# ----------------------------------------------------------------------------------------------------------
# data: a global batch per step, sharded by data-parallel rank; every rank gets the same number of batches
# ----------------------------------------------------------------------------------------------------------
class GlobalBatchSampler(ResumableBatchSampler):
    """The single-process engine's shuffled global batches (``batch_size = global_batch_size``); this
    data-parallel rank takes rows ``dp_rank::dp`` of each. TP/PP ranks of one data-parallel group get the same
    rows. Resume skipping (``skip`` / ``skip_epoch``) is inherited and counts global batches."""

    def __init__(self, n: int, global_batch_size: int, *, dp: int, dp_rank: int, shuffle: bool, seed: int,
                 epoch_fn: Callable[[], int]) -> None:
        super().__init__(n, global_batch_size, shuffle=shuffle, seed=seed, epoch_fn=epoch_fn, rank=0, world=1)
        self.dp, self.dp_rank = dp, dp_rank

    def __iter__(self):
        for batch in super().__iter__():
            yield batch[self.dp_rank::self.dp]


class EvalBatchSampler:
    """Validation in file order, global batches of ``global_batch_size`` sharded like the training batches."""

    def __init__(self, n: int, global_batch_size: int, *, dp: int, dp_rank: int) -> None:
        self.n, self.gbs, self.dp, self.dp_rank = n, global_batch_size, dp, dp_rank

    def __iter__(self):
        for s in range(0, self.n, self.gbs):
            yield list(range(s, min(s + self.gbs, self.n)))[self.dp_rank::self.dp]

    def __len__(self) -> int:
        return math.ceil(self.n / self.gbs)


class PadCollate:
    """The family's collate, then filled up to ``rows`` rows with copies of ``filler`` whose labels are all
    ignored (the library needs a fixed row count; DP ranks need equal step counts)."""

    def __init__(self, collate: Callable[[list], dict], rows: int, filler: Any) -> None:
        self.collate, self.rows, self.filler = collate, rows, filler

    def __call__(self, examples: Sequence[Any]) -> dict[str, Any]:
        examples = list(examples)
        real = len(examples)
        if real > self.rows:
            raise RuntimeError(f"batch of {real} rows, expected at most {self.rows}")
        fill = examples[0] if examples else self.filler
        batch = self.collate(examples + [dataclasses.replace(fill)] * (self.rows - real))
        if real < self.rows:
            batch["labels"][real:] = D.IGNORE
        batch[REAL_ROWS] = torch.arange(self.rows) < real
        return batch


# ----------------------------------------------------------------------------------------------------------
# Lightning: strategy (process group, no wrapping, plain rank-0 checkpoints) and the module
# ----------------------------------------------------------------------------------------------------------
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


class ParallelPromptModule(PromptLearningModule):
    """The single-process module's history, LR schedule, checkpoint hooks and logging, with manual
    optimisation around an engine built in ``configure_model`` (after the process group exists). The frozen
    model is never a registered submodule: checkpoints hold the prompt store only."""

    def __init__(self, base_model: Any, store: PromptStore, family: Any, optim: dict[str, Any], *,
                 layout: ParallelLayout, pad_to: int | None, clip_val: float | None, clip_algorithm: str = "norm",
                 micro_batch_size: int) -> None:
        super().__init__(None, store, family, optim)
        self.__dict__["_pending_model"] = base_model    # plain attribute, not a submodule
        self.automatic_optimization = False
        self.layout = layout
        self.pad_to = pad_to
        self.clip_val = clip_val
        self.clip_algorithm = clip_algorithm
        self.expected_dp_rank: int | None = None
        # checkpoints count batches like the single-process engine with the same config (micro batches)
        self.batches_per_step = max(1, layout.global_batch_size // micro_batch_size)
        self.engine: ModelParallelEngine | DataParallelEngine | None = None

    def train(self, mode: bool = True) -> "ParallelPromptModule":
        pl.LightningModule.train(self, mode)
        return self

    def configure_model(self) -> None:
        if self.engine is not None:
            return
        device = self.trainer.strategy.root_device
        model = self.__dict__.pop("_pending_model")
        if self.layout.is_model_parallel:
            self.engine = ModelParallelEngine(model, self.prompts, self.layout, device, self.pad_to)
        else:
            self.engine = DataParallelEngine(model, self.prompts, self.family, self.layout, device)
        if self.expected_dp_rank is not None and self.engine.data_parallel_rank != self.expected_dp_rank:
            raise RuntimeError(f"sampler shard {self.expected_dp_rank} != mesh data-parallel rank {self.engine.data_parallel_rank}")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        assert self.engine is not None
        opt = self.optimizers()
        sched = self.lr_schedulers()
        opt.zero_grad()
        loss = self.engine.train_step(batch)
        self._drop_unused_task_grads(batch)
        if self.clip_val:
            self.clip_gradients(opt, gradient_clip_val=self.clip_val, gradient_clip_algorithm=self.clip_algorithm)
        opt.step()
        if sched is not None:
            sched.step()
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=self.layout.global_batch_size)
        self._acc.append(float(loss))
        return loss.detach()

    def _drop_unused_task_grads(self, batch: dict[str, Any]) -> None:
        """Parameters of a task absent from the whole global batch get ``grad = None`` (the engines hand back
        zeros), so AdamW skips them exactly as in the single-process engine, where that task's table or encoder
        is never touched (no weight decay, no moment update)."""
        store = self.prompts
        task_params = []
        for task in store.tasks:
            key = store._key(task)
            if key in store.tables:
                task_params.append([store.tables[key]])
            elif key in store.encoders:
                task_params.append([p for p in store.encoders[key].parameters() if p.requires_grad])
            else:
                task_params.append([])
        if sum(1 for ps in task_params if ps) <= 0:
            return
        device = next(p for ps in task_params for p in ps).device
        present = torch.zeros(len(store.tasks), dtype=torch.int32, device=device)
        real = batch.get(REAL_ROWS)
        tids = batch["task_ids"] if real is None else batch["task_ids"][real.bool()]
        present[tids.unique().to(device)] = 1
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(present, op=dist.ReduceOp.MAX)
        for i, params in enumerate(task_params):
            if not int(present[i]):
                for p in params:
                    p.grad = None

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        assert self.engine is not None
        total, n = self.engine.eval_sums(batch)
        self._val_sum += total
        self._val_n += n

    # ---- checkpoints: same keys and counters as the single-process module ------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        extra = checkpoint.get("promptlaunch")
        if isinstance(extra, dict) and "epoch_batches" in extra:
            extra["epoch_steps"] = int(self.epoch_batches)
            extra["epoch_batches"] = int(self.epoch_batches) * self.batches_per_step
        sync_step_counters(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        sync_step_counters(checkpoint)
        extra = checkpoint.get("promptlaunch")
        if isinstance(extra, dict) and "epoch_batches" in extra:
            steps = extra.get("epoch_steps")
            if steps is None:
                steps = int(extra["epoch_batches"]) // self.batches_per_step
            extra = dict(extra, epoch_batches=int(steps))
            checkpoint = dict(checkpoint, promptlaunch=extra)
        super().on_load_checkpoint(checkpoint)


# ----------------------------------------------------------------------------------------------------------
# wiring used by train.py
# ----------------------------------------------------------------------------------------------------------
def setup_parallel(*, layout: ParallelLayout, model: Any, store: PromptStore, family: Any, optim: dict[str, Any],
                   train_ex: Sequence[Any], val_ex: Sequence[Any], collate: Callable, trainer_kwargs: dict[str, Any],
                   micro_batch_size: int, shuffle: bool, seed: int, num_workers: int = 0):
    """(module, trainer, train_dataloader, val_dataloader) of the parallel path."""
    from torch.utils.data import DataLoader

    kwargs = dict(trainer_kwargs)
    clip = kwargs.pop("gradient_clip_val", None)
    algorithm = kwargs.pop("gradient_clip_algorithm", None) or "norm"
    kwargs.update(strategy=PromptParallelStrategy(layout.world_size), accumulate_grad_batches=1,
                  use_distributed_sampler=False)
    # pipeline stages exchange fixed-shape activations: pad every batch to the longest example of the run
    pad_to = max(len(e.input_ids) for e in [*train_ex, *val_ex]) if layout.pp > 1 else None
    module = ParallelPromptModule(model, store, family, optim, layout=layout, pad_to=pad_to,
                                  clip_val=float(clip) if clip else None, clip_algorithm=str(algorithm),
                                  micro_batch_size=micro_batch_size)
    trainer = pl.Trainer(**kwargs)
    if trainer.world_size != layout.world_size:
        raise UserError(f"trainer.devices x trainer.num_nodes = {layout.world_size} but Lightning sees {trainer.world_size} processes")
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
             f"; sequences padded to {pad_to}" if pad_to else "")
    return module, trainer, train_dl, val_dl


def precheck(cfg: Any, layout: ParallelLayout, location: str, style: str) -> None:
    """:func:`check_parallel_config` with the model's ``config.json`` only (before any weights are loaded)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(location)
    except Exception as exc:  # the weights load below reports a broken folder in detail
        log.debug("AutoConfig.from_pretrained(%s) failed: %s", location, exc)
        config = None
    check_parallel_config(cfg, layout, config, style)
