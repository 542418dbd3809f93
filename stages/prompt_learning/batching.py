"""Length-aware and prefix-group-aware training batches, resumable like ``module.ResumableBatchSampler``.

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

import logging
from typing import Any, Callable, Sequence

import torch

from .module import ResumableBatchSampler

log = logging.getLogger("promptlaunch.prompt_learning")


def batching_options(flags: tuple[bool, bool], family: Any, parallel: bool) -> tuple[bool, bool]:
    """(share_prefix, length_bucketing) as checked by ``config.check_batching_flags``, switched off with a logged
    line where they cannot apply rather than failing (the CPU default turns them on): the TP/PP/DP engine builds
    its batches with its own sampler, and an encoder-decoder model's bidirectional encoder makes a prefix depend
    on what follows."""
    share, bucket = flags
    if parallel and (share or bucket):
        log.warning("prompt_learning.model.data.share_prefix/length_bucketing ignored: the tensor/pipeline/data-parallel engine uses plain batches")
        return False, False
    if share and not getattr(family, "shares_prefix", False):
        log.warning("prompt_learning.model.data.share_prefix=true ignored: the %s family (encoder-decoder) cannot share prefixes", family.name)
        share = False
    return share, bucket


def batching_kind(share: bool, bucket: bool) -> str:
    """The batching actually used (after :func:`batching_options`), part of the run identity: it decides the batches."""
    return "+".join(k for k, on in (("length_bucketing", bucket), ("share_prefix", share)) if on) or "plain"


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
