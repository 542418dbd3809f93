"""Which batching a prompt-learning run uses: the ``model.data`` flags, switched off where they cannot apply, and
the name of the result (part of the run identity). The samplers themselves are the engine's (``engine/samplers.py``)."""
from __future__ import annotations

import logging
from typing import Any

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
