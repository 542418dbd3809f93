"""Frozen linear layers for forward passes of few rows on CPU: ``weight @ x^T`` instead of ``x @ weight^T``.

Why: a decoding pass feeds 1-32 row-tokens (rows x fed slots). For such shapes the fp32 GEMM behind
``nn.Linear`` (the weight as the transposed right operand) runs far below this CPU's matmul rate; the same product
with the weight as the left, row-major operand runs up to 2x faster (measured here with 10 rows: LM head
[49152 x 576] 68 -> 30 ms, gate/up projections 1.44 -> 1.09 ms), needs no copy of the weights, and multiplies and
sums the same numbers (results equal up to float rounding). Larger passes (prefill, training) keep ``nn.Linear``.
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 32   # passes with more row-tokens than this keep nn.Linear's kernel


def linear_few_rows(module: nn.Linear, max_rows: int, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``; computed as ``weight @ x^T`` when ``x`` has at most ``max_rows`` rows."""
    rows = x.numel() // max(x.shape[-1], 1)
    if x.dim() < 2 or rows > max_rows or rows == 0:
        return F.linear(x, module.weight, module.bias)
    y = torch.mm(module.weight, x.reshape(rows, x.shape[-1]).t()).t().contiguous()
    if module.bias is not None:
        y += module.bias
    return y.view(*x.shape[:-1], y.shape[-1])


@contextmanager
def few_row_linears(model: Any, max_rows: int = MAX_ROWS) -> Iterator[int]:
    """Within the block, every plain fp32 CPU ``nn.Linear`` of ``model`` uses ``linear_few_rows``; yields how many
    layers were switched. Layers of other types or devices, or with a forward of their own, are left alone."""
    switched = [m for m in model.modules()
                if type(m) is nn.Linear and "forward" not in m.__dict__
                and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]
    for m in switched:
        m.forward = partial(linear_few_rows, m, max_rows)
    try:
        yield len(switched)
    finally:
        for m in switched:
            del m.forward
