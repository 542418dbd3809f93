"""LightningModule around a frozen base model and the trainable PromptStore, plus a resumable batch sampler."""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from stages.engine.samplers import ResumableBatchSampler


from stages.engine.family import DecoderOnlyFamily
from stages.engine.prompts import PromptStore

BASE_PREFIX = "base_model."
log = logging.getLogger("promptlaunch.prompt_learning")


def lr_lambda(name: str, warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    total = max(int(total), 1)
    warmup = max(int(warmup), 0)

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if name == "cosine":
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if name == "linear":
            return min_ratio + (1 - min_ratio) * (1 - progress)
        raise ValueError(f"lr_lambda: unknown schedule {name!r}")   # the user-facing rule: config._check_optim

    return f


class PromptLearningModule(pl.LightningModule):
    def __init__(self, base_model: Any, store: PromptStore, family: DecoderOnlyFamily, optim: dict[str, Any]) -> None:
        super().__init__()
        self.base_model = base_model     # frozen; filtered out of checkpoints, never in the optimizer
        self.prompts = store
        self.family = family
        self.optim_cfg = optim
        self.strict_loading = False      # checkpoints hold only the prompt state
        self.history: dict[str, list[list[float]]] = {"train": [], "val": []}
        self.epoch_batches = 0
        self.resume_skip = 0
        self._resuming = False
        self._resume_epoch = -1
        self._val_sum = 0.0
        self._val_n = 0
        self._acc: list[float] = []
        self.sampler: ResumableBatchSampler | None = None   # set by the recipe (stages/engine/samplers.py)
        self._t_last = 0.0
        self._step_last = 0

    # the base model stays in eval mode (no dropout) whatever Lightning does
    def train(self, mode: bool = True) -> "PromptLearningModule":
        super().train(mode)
        self.base_model.eval()
        return self

    def forward_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.family.loss(self.base_model, self.prompts, batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        total, n = self.forward_loss(batch)
        loss = total / n.clamp(min=1)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=int(batch["input_ids"].shape[0]))
        self._acc.append(float(loss.detach()))
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.epoch_batches += 1

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        acc = self.trainer.accumulate_grad_batches
        if len(self._acc) >= acc:
            loss = sum(self._acc) / len(self._acc)
            self.history["train"].append([int(self.global_step), loss])
            self._acc = []
            every = max(1, int(self.trainer.log_every_n_steps or 1))
            if self.global_step % every == 0 and self.trainer.is_global_zero:
                now = time.monotonic()
                rate = (now - self._t_last) / max(1, self.global_step - self._step_last) if self._t_last else float("nan")
                self._t_last, self._step_last = now, int(self.global_step)
                total = self.trainer.max_steps if self.trainer.max_steps > 0 else "?"
                log.info("step %d/%s train_loss %.4f lr %.3g (%.1f s/step)", self.global_step, total, loss,
                         self.trainer.optimizers[0].param_groups[0]["lr"], rate)

    def on_train_epoch_start(self) -> None:
        if not (self._resuming and int(self.current_epoch) == self._resume_epoch):
            self.epoch_batches = 0
        self._resuming = False

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        total, n = self.forward_loss(batch)
        self._val_sum += float(total)
        self._val_n += int(n)

    def on_validation_epoch_end(self) -> None:
        val = self._val_sum / max(self._val_n, 1)
        self._val_sum, self._val_n = 0.0, 0
        self.log("val_loss", val, prog_bar=True, sync_dist=True)
        if not self.trainer.sanity_checking:
            self.history["val"].append([int(self.global_step), val])
            if self.trainer.is_global_zero:
                log.info("step %d val_loss %.4f", self.global_step, val)

    def configure_optimizers(self) -> Any:
        o = self.optim_cfg
        params = [p for p in self.prompts.parameters() if p.requires_grad]
        name = str(o.get("name", "adamw")).lower()
        betas = tuple(o.get("betas", (0.9, 0.999)))
        if name == "adamw":
            opt = torch.optim.AdamW(params, lr=float(o["lr"]), weight_decay=float(o.get("weight_decay", 0.0)), betas=betas)
        elif name == "adam":
            opt = torch.optim.Adam(params, lr=float(o["lr"]), weight_decay=float(o.get("weight_decay", 0.0)), betas=betas)
        else:
            raise ValueError(f"configure_optimizers: unknown optimizer {name!r}")   # the user-facing rule: config._check_optim
        sched = o.get("sched") or {}
        total = self.trainer.estimated_stepping_batches
        min_ratio = float(sched.get("min_lr", 0.0)) / float(o["lr"]) if float(o["lr"]) else 0.0
        f = lr_lambda(str(sched.get("name", "constant")), int(sched.get("warmup_steps", 0) or 0), int(total), min_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, f), "interval": "step"}}

    # ---- checkpoints: prompt state only -----------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(BASE_PREFIX)}
        history = self.history
        acc = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        if self._acc and len(self._acc) >= acc:   # saved at train-batch end, before on_train_batch_end records the step
            history = {**history, "train": [*history["train"], [int(self.global_step), sum(self._acc) / len(self._acc)]]}
        checkpoint["promptlaunch"] = {"history": history, "epoch_batches": self.epoch_batches,
                                      "epoch": int(self.current_epoch)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra = checkpoint.get("promptlaunch") or {}
        self.history = extra.get("history", self.history)
        self.epoch_batches = int(extra.get("epoch_batches", 0))
        self._resuming = True
        self._resume_epoch = int(extra.get("epoch", -1))
        if self.sampler is not None:
            self.sampler.skip = self.epoch_batches
            self.sampler.skip_epoch = int(extra.get("epoch", -1))
