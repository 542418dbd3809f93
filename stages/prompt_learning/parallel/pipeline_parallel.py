"""Pipeline parallelism with ``torch.distributed.pipelining`` (manual stage split, no tracing).

Stage ``s`` of ``pp`` holds the decoder layers ``split_layers(n_layers, pp)[s]``; stage 0 also holds
the token embeddings and the soft prompt, the last stage the final norm and ``lm_head``, and its
``loss_fn`` returns the micro batch's share of the global token-mean loss (see ``model.py``).

Only the hidden states [mb, S, hidden] travel between stages. ``attention_mask`` and
``position_ids`` are passed as keyword arguments to ``schedule.step`` on EVERY stage; the schedule
chunks them into the same micro batches as the activations and each stage rebuilds the 4-D causal
mask and the rotary cos/sin from them.

The P2P buffers are sized by the first step (dynamic metadata inference), so one
``PipelineStage``/schedule pair serves one batch shape; :class:`PipelineRunner` keeps one pair per
(rows, seq_len, train|eval). Pad batches to a fixed length (``pad_to`` of the trainer) to build it
once.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

SCHEDULE_CLASSES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def build_schedule(
    stage_module: nn.Module,
    stage_index: int,
    num_stages: int,
    device: torch.device,
    pp_group,
    n_microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    schedule: str = "1f1b",
):
    """A ``PipelineStage`` for this rank's module and a GPipe or 1F1B schedule over it.

    ``scale_grads=False``: ``loss_fn`` already divides by the global token count, so the
    per-micro-batch gradients are summed, not averaged.
    """
    stage = PipelineStage(stage_module, stage_index, num_stages, device, group=pp_group)
    cls = SCHEDULE_CLASSES[schedule]
    return cls(stage, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)


class PipelineRunner:
    """Runs one batch through the pipeline with a cached schedule per batch shape."""

    def __init__(
        self,
        stage_module: nn.Module,
        stage_index: int,
        num_stages: int,
        device: torch.device,
        pp_group,
        n_microbatches: int,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        schedule: str = "1f1b",
        max_cached: int = 8,
    ) -> None:
        self.stage_module = stage_module
        self.stage_index = stage_index
        self.num_stages = num_stages
        self.device = device
        self.pp_group = pp_group
        self.n_microbatches = n_microbatches
        self.loss_fn = loss_fn
        self.schedule = schedule
        self.max_cached = max_cached
        self._cache: OrderedDict[tuple, object] = OrderedDict()

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1

    def _schedule_for(self, key: tuple):
        sched = self._cache.get(key)
        if sched is None:
            sched = build_schedule(
                self.stage_module, self.stage_index, self.num_stages, self.device, self.pp_group,
                self.n_microbatches, self.loss_fn, self.schedule,
            )
            self._cache[key] = sched
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return sched

    def run(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        labels: torch.Tensor,
        train: bool,
    ) -> torch.Tensor:
        """Forward (+ backward when ``train``) of all micro batches; returns the sum of the
        micro-batch losses on the last stage and a zero on the others."""
        key = (tuple(input_ids.shape), train)
        sched = self._schedule_for(key)
        kwargs = {"attention_mask": attention_mask, "position_ids": position_ids}
        losses: list[torch.Tensor] = []
        call = sched.step if train else sched.eval
        args = (input_ids,) if self.is_first else ()
        if self.is_last:
            # return_outputs=False: the logits are not kept, only the per-micro-batch losses
            call(*args, target=labels, losses=losses, return_outputs=False, **kwargs)
        else:
            call(*args, **kwargs)
        if self.is_last:
            return torch.stack([loss.detach().float() for loss in losses]).sum()
        return torch.zeros((), dtype=torch.float32, device=self.device)
