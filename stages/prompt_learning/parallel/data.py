"""Data of a parallel run: a global batch per step, sharded by data-parallel rank, and every rank gets the same
number of batches (short batches filled with rows whose labels are all ignored)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import torch

from stages.engine.examples import IGNORE

from stages.engine.samplers import ResumableBatchSampler

REAL_ROWS = "row_is_real"   # batch key added by PadCollate: False for the filler rows


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
            batch["labels"][real:] = IGNORE
        batch[REAL_ROWS] = torch.arange(self.rows) < real
        return batch
