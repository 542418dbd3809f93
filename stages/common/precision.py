"""``trainer.precision`` that follows the hardware: ``auto``, ``32``, ``bf16-mixed`` and ``bf16-true`` on CPU and GPU.

Why measured and not assumed: bf16 is a different bargain on every machine. On a CPU with AMX or AVX512-BF16 a
bf16 matmul runs 2.4x (AVX512-BF16) to 6x (AMX) faster than fp32; on an AVX2-only CPU torch emulates it, about
two orders of magnitude slower. So the decision reads the capability torch reports for the device and measures
both rates with a short probe (1-2 s in a fresh process, once per process), and says both in the log line and
in any refusal. The decision is taken on the machine that runs the job (a Slurm node may not be the login node).

What each value means here (the frozen model is never trained, so its weights need no fp32 master copy):

* ``32``: everything fp32;
* ``bf16-mixed``: Lightning's autocast: matrix products in bf16, autocast's fp32 ops (softmax, norms, losses) in
  fp32, the frozen weights kept fp32 and cast per product;
* ``bf16-true``: the frozen model's weights cast to bf16 once and everything in it computed in bf16;
* in both bf16 modes the soft prompt (table or P-tuning encoder) and its optimiser state stay fp32 (rows are cast
  to the model's dtype where they are inserted) and the loss is a log-softmax over fp32 logits;
* ``auto``: ``bf16-true`` where the device computes bf16 natively and the probe confirms it is faster, else ``32``.

``PROMPTLAUNCH_BF16`` (``native`` | ``emulated``) overrides the capability check for a node whose torch build
misreports it; the probe's rates are still measured and logged.
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

from stages.common.errors import UserError

CHOICES = ("auto", "32", "32-true", "bf16-mixed", "bf16-true", "bf16")   # CPU and GPU
GPU_ONLY = ("16-mixed", "16", "16-true")
BF16 = ("bf16-mixed", "bf16-true", "bf16")


@dataclass(frozen=True)
class Bf16Support:
    """What the device does with bf16, and the probe's rates (GFLOP/s of a square matmul)."""

    device: str
    native: bool
    reason: str
    fp32_gflops: float
    bf16_gflops: float

    def rates(self) -> str:
        return (f"measured {self.bf16_gflops:.0f} GFLOP/s bf16 vs {self.fp32_gflops:.0f} fp32 "
                f"({self.bf16_gflops / max(self.fp32_gflops, 1e-9):.1f}x)")

    def describe(self) -> str:
        return f"{self.device}: bf16 {'native' if self.native else 'emulated'} ({self.reason}); {self.rates()}"


def _probe(device: str, n: int = 512, rounds: int = 5, min_seconds: float = 0.03,
           warmup_seconds: float = 0.15) -> tuple[float, float]:
    """(fp32, bf16) GFLOP/s of an n x n x n matmul: after ``warmup_seconds`` of products per dtype, the best of
    ``rounds`` timed loops per dtype, interleaved so a machine's drift hits both, each lasting ``min_seconds``.

    Why loops and not a few calls: one 512^3 product takes ~1 ms at these rates, so three calls timed once measured
    the timer and a fresh process's first products more than the matmul (a fresh-clone run saw bf16 at 0.5x fp32 on
    an AMX machine and chose fp32; fresh processes also saw fp32 at 30-110 GFLOP/s against ~300 warm). Small, so an
    emulated bf16 (~0.2 s a product) still costs about a second."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    pairs = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
        calls, t0 = 0, time.perf_counter()
        while calls < 2 or time.perf_counter() - t0 < warmup_seconds:   # thread pool, kernel selection, AMX setup
            a @ b
            sync()
            calls += 1
        one = max((time.perf_counter() - t0) / calls, 1e-9)
        pairs[dtype] = (a, b, max(1, int(min_seconds / one)), float("inf"))
    for _ in range(rounds):
        for dtype, (a, b, inner, best) in pairs.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                a @ b
            sync()
            pairs[dtype] = (a, b, inner, min(best, (time.perf_counter() - t0) / inner))
    fp32, bf16 = (2 * n ** 3 / pairs[d][3] / 1e9 for d in (torch.float32, torch.bfloat16))
    return fp32, bf16


def _capability(device: str) -> tuple[bool, str]:
    import torch

    forced = os.environ.get("PROMPTLAUNCH_BF16")
    if forced in ("native", "emulated"):
        return forced == "native", f"PROMPTLAUNCH_BF16={forced}"
    if device == "cuda":
        ok = torch.cuda.is_bf16_supported()
        cap = torch.cuda.get_device_capability()
        return ok, f"CUDA compute capability {cap[0]}.{cap[1]}"
    found = [name for name, probe in (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
             if getattr(torch.cpu, probe, lambda: False)()]
    if found:
        return True, f"this CPU has {' and '.join(found)}"
    return False, f"this CPU has neither AMX nor AVX512-BF16 (torch reports {torch.backends.cpu.get_cpu_capability()})"


@functools.lru_cache(maxsize=None)
def bf16_support(accelerator: str) -> Bf16Support:
    """The device's bf16 capability and probe rates (cached per process)."""
    device = "cuda" if accelerator == "gpu" else "cpu"
    native, reason = _capability(device)
    fp32, bf16 = _probe(device)
    return Bf16Support(device, native, reason, fp32, bf16)


UNIT_ROUNDOFF = 2.0 ** -8      # bf16 keeps 8 significant bits: one rounding moves a value by at most 2^-8 of it
ROUNDINGS_PER_LAYER = 12       # bf16-true, along one pre-norm decoder layer: norm, q/k/v, scores, softmax, attention
                               # output, o_proj, residual add, norm, gate/up, activation x up, down, residual add


def bf16_relative_bound(num_layers: int) -> float:
    """How far bf16 may move a loss (relative to the largest logit) or the prompt gradient (relative L2) from fp32.

    k = 12 L + 2 roundings in sequence (embedding and head included); independent rounding errors add like a random
    walk, so the relative error is about u sqrt(k); a loss ``logsumexp(z) - z_y`` moves by at most twice its largest
    logit's change, and the gradient is rounded once more in the backward pass: 2 u sqrt(k). The tests and benches
    that compare bf16 with fp32 hold them to it (tests/stages/prompt_learning/test_bf16.py)."""
    return 2 * UNIT_ROUNDOFF * (ROUNDINGS_PER_LAYER * num_layers + 2) ** 0.5


def resolve(precision: str, accelerator: str, key: str) -> str:
    """The precision this job runs with (``auto`` decided, ``bf16`` spelled ``bf16-mixed``); an explicit bf16
    where the device would emulate it is one line with the measured rates."""
    precision = "bf16-mixed" if precision == "bf16" else precision
    if precision != "auto" and precision not in BF16:
        return precision
    return decide(precision, bf16_support(accelerator), key)


def decide(precision: str, support: Bf16Support, key: str) -> str:
    """:func:`resolve` once the device's support is known (pure)."""
    if precision == "auto":
        return "bf16-true" if support.native and support.bf16_gflops > support.fp32_gflops else "32"
    if not support.native:
        raise UserError(f"{key}: {precision} would be emulated on this machine ({support.reason}; {support.rates()}); "
                        f"set {key}=32 or auto")
    return precision


def explain(precision: str, chosen: str, accelerator: str) -> str:
    """The log line that says what ran and why (the rates when bf16 was considered)."""
    if precision != "auto" and chosen not in BF16:
        return f"precision {chosen}"
    return f"precision {precision} -> {chosen}: {bf16_support(accelerator).describe()}"
