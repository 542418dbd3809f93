"""``ParallelPromptModule``: the single-process module with manual optimisation around an engine
(``engines.py``) built once the process group exists."""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from stages.engine.prompts import PromptStore

from ..module import PromptLearningModule
from .data import REAL_ROWS
from .engines import DataParallelEngine, ModelParallelEngine
from .layout import ParallelLayout
from .strategy import sync_step_counters


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
