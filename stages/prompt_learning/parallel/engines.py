"""One optimiser step's forward + backward + reduction on this rank: :class:`ModelParallelEngine` (TP x PP x DP
through the library in this package) and :class:`DataParallelEngine` (TP = PP = 1, any architecture).

Both compute the loss as the token mean over the GLOBAL batch (sum of the cross entropy of every answer token /
their number), whatever the layout, so every layout reproduces one process on the whole batch.
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from stages.common.errors import UserError
from stages.engine.examples import IGNORE
from stages.engine.prompts import PromptStore

from .layout import ParallelLayout


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
    return (labels[:, 1:] != IGNORE).sum()


class ModelParallelEngine:
    """TP x PP (x DP) through the library; the store is trained in place."""

    def __init__(self, model: Any, store: PromptStore, layout: ParallelLayout, device: torch.device,
                 pad_to: int | None) -> None:
        from .sharded_model import ShardedPromptModel

        self.table = StoreTable(store)
        self.sharded = ShardedPromptModel(model, self.table, layout, device=device, pad_to=pad_to, prefix="")
        self.layout = layout
        mesh = self.sharded.mesh
        self._dp_group = mesh["dp"].get_group() if (mesh is not None and layout.dp > 1) else None

    @property
    def data_parallel_rank(self) -> int:
        return self.sharded.data_parallel_rank

    def train_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.sharded.train_step(self.table.library_batch(batch))

    def eval_sums(self, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        """(sum of token CE, token count) over the global batch; same on every rank."""
        b = self.table.library_batch(batch)
        loss = self.sharded.eval_step(b)
        n = _count(b["labels"]).to(self.sharded.device)
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
