"""Training batch samplers that a resumed run can replay exactly: :class:`ResumableBatchSampler` (seeded per-epoch
shuffle, sharded by rank, skipping the batches already consumed) and :class:`BucketBatchSampler`, its length-aware and
prefix-group-aware form.

Why: with dynamic padding a batch costs as much as its longest example, so batching examples of similar length
cuts padding (``length_bucketing``); and shared-context training (``share_prefix``) saves work only when the
questions of one paragraph land in the same micro-batch. Both keep every example exactly once per epoch and
the same number of batches (``ceil(n / batch_size)``, all full but the last), so step counts, the schedule and
the epoch boundary are those of the plain sampler.

One epoch, a pure function of (seed, epoch) -- which is what lets a resumed run skip exactly the batches it
already consumed (``fault/``):
  1. units = prefix groups (``collate.prefix_groups``) or single examples, in a seeded random order;
  2. with length bucketing: cut that order into chunks of about ``chunk_batches`` batches' worth of examples
     and sort the units of each chunk by length (longest example of the unit), so neighbours have similar lengths;
  3. concatenate the units' examples and cut into batches of ``batch_size`` (a group may be split across two
     neighbouring batches; both halves still share their prefix within their batch);
  4. with length bucketing: shuffle the batch order (seeded), so lengths do not rise steadily through an epoch.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch.utils.data import Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    """Seeded per-epoch shuffle, sharded by rank; after a resume it skips the batches already consumed in the
    interrupted epoch, so a resumed run sees exactly the batches an uninterrupted run would."""

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, seed: int, epoch_fn: Callable[[], int],
                 rank: int = 0, world: int = 1) -> None:
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.epoch_fn, self.rank, self.world = epoch_fn, rank, world
        self.skip = 0
        self.skip_epoch = -1

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + 1000003 * int(self.epoch_fn()))
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        return idx[self.rank :: self.world]

    def batches(self) -> list[list[int]]:
        """This epoch's batches, a pure function of (seed, epoch): what makes skipping on resume exact."""
        idx = self._indices()
        return [idx[i : i + self.batch_size] for i in range(0, len(idx), self.batch_size)]

    def __iter__(self):
        batches = self.batches()
        skip = self.skip if int(self.epoch_fn()) == self.skip_epoch else 0
        self.skip, self.skip_epoch = 0, -1
        yield from batches[skip:]

    def __len__(self) -> int:
        return math.ceil(len(self._indices()) / self.batch_size)


class BucketBatchSampler(ResumableBatchSampler):
    """``ResumableBatchSampler`` with length bucketing (``lengths``) and/or whole prefix groups (``groups``)."""

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, seed: int, epoch_fn: Callable[[], int],
                 lengths: Sequence[int] | None = None, groups: Sequence[Sequence[int]] | None = None,
                 chunk_batches: int = 50, rank: int = 0, world: int = 1) -> None:
        super().__init__(n, batch_size, shuffle=shuffle, seed=seed, epoch_fn=epoch_fn, rank=rank, world=world)
        self.lengths = list(lengths) if lengths is not None else None
        self.groups = [list(g) for g in groups] if groups is not None else [[i] for i in range(n)]
        if sorted(i for g in self.groups for i in g) != list(range(n)):
            raise ValueError("groups must partition range(n)")
        if self.lengths is not None and len(self.lengths) != n:
            raise ValueError(f"{len(self.lengths)} lengths for {n} examples")
        self.chunk_batches = max(1, int(chunk_batches))

    def _generator(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + 1000003 * int(self.epoch_fn()) + salt)

    def _units(self) -> list[list[int]]:
        units = self.groups
        if self.shuffle:
            units = [units[i] for i in torch.randperm(len(units), generator=self._generator(0)).tolist()]
        return units[self.rank :: self.world]

    def batches(self) -> list[list[int]]:
        units = self._units()
        if self.lengths is not None:
            lengths = self.lengths
            chunk = self.batch_size * self.chunk_batches
            sorted_units: list[list[int]] = []
            start = 0
            while start < len(units):
                end, size = start, 0
                while end < len(units) and size < chunk:
                    size += len(units[end])
                    end += 1
                sorted_units += sorted(units[start:end], key=lambda u: max(lengths[i] for i in u))   # stable
                start = end
            units = sorted_units
        flat = [i for u in units for i in u]
        out = [flat[i : i + self.batch_size] for i in range(0, len(flat), self.batch_size)]
        if self.lengths is not None and self.shuffle:
            out = [out[i] for i in torch.randperm(len(out), generator=self._generator(1)).tolist()]
        return out

    def _indices(self) -> list[int]:
        return [i for u in self._units() for i in u]
