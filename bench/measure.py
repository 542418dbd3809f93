"""Measuring, for the benchmarks: the machine a figure came from, interleaved timing, speed-up ratios (refused when
the baseline's output is wrong), FLOP counts and the matmul peak, tables and JSON results. Torch is imported lazily,
so ``launcher_overhead.py`` stays torch-free while it times."""
from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

CPU_MATMUL_FLAGS = {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8"}


def cuda_info() -> dict[str, Any]:
    """The CUDA side of the machine: torch's CUDA and NCCL versions and every visible GPU (name, compute capability,
    memory). Empty without a CUDA device; the one place the benches and bench/gpu_check.sh describe a GPU."""
    import torch

    if torch.version.cuda is None or not torch.cuda.is_available():
        return {}
    nccl = None
    if torch.distributed.is_available() and torch.distributed.is_nccl_available():
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append({"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2 ** 30, 1)})
    return {"torch_cuda": torch.version.cuda, "nccl": nccl, "gpus": gpus}


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What a figure depends on: cores, threads, library versions, CPU model (read where it is cheap), the device the
    model ran on and, on CUDA, the GPUs (:func:`cuda_info`)."""
    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                            "device": device}
    try:
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            lines = fh.readlines()
        names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
        flags = next((set(ln.split(":", 1)[1].split()) for ln in lines if ln.startswith("flags")), set())
        # the matmul features a figure depends on (a machine with AVX2 only computes bf16 by emulation)
        info["cpu_matmul_flags"] = sorted(flags & CPU_MATMUL_FLAGS)
    except OSError:
        pass
    try:
        info["loadavg_1min"] = os.getloadavg()[0]   # > cores means the figures were taken on a busy machine
    except OSError:
        pass
    if "torch" in sys.modules:   # only when the bench itself uses torch (launcher_overhead does not)
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    torch_interop_threads=torch.get_num_interop_threads(),
                    cpu_capability=torch.backends.cpu.get_cpu_capability())
        from stages.engine.host_memory import in_effect

        info["reuse_host_memory"] = in_effect()   # the stages' trainer.reuse_host_memory (--host-memory)
        for mod in ("transformers", "peft"):
            if mod in sys.modules:
                info[mod] = getattr(sys.modules[mod], "__version__", "?")
        if device == "cuda":
            info.update(cuda_info())
    return info


def command_line() -> str:
    """The exact command that produced a result file (shell-quoted, relative to the repository root)."""
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def write_result(path: str | os.PathLike[str], payload: dict[str, Any], device: str = "cpu") -> Path:
    """Atomically write a bench result with the machine (``device``: where the model ran), the command and the time
    it was taken."""
    from stages.common.io import write_json   # the repository root is on sys.path once a bench imported common

    doc = {**payload, "machine": machine_info(device), "command": command_line(),
           "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(machine_line(doc["machine"]))
    return write_json(path, doc)


def machine_line(m: dict[str, Any]) -> str:
    """The machine a printed figure came from, in one line (the CPU model varies between sessions)."""
    versions = ", ".join(f"{k} {m[k]}" for k in ("torch", "transformers", "peft") if k in m)
    gpus = "".join(f"; GPU {g['name']} (capability {g['capability']})" for g in m.get("gpus", []))
    return (f"machine: {m.get('cpu_model', '?')}, {m.get('affinity_cpus', m.get('cpu_count'))} cores, "
            f"torch CPU capability {m.get('cpu_capability', '?')}, flags {' '.join(m.get('cpu_matmul_flags', [])) or '?'}; "
            f"{versions}; load {m.get('loadavg_1min', float('nan')):.2f}{gpus}")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain fixed-width text table (floats with 3 significant decimals)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return "" if v is None else str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    return "\n".join(lines)


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def interleaved_timing(sides: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Wall seconds of each side's callable, ``repeats`` times, interleaved (A B C A B C ...), so a change in
    machine load hits every side alike instead of biasing whichever ran last."""
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def paired_speedup(ref: Sequence[float], side: Sequence[float]) -> float:
    """Median over rounds of ref's pass / side's pass in the same round: robust to this VM's drift across rounds
    (the ratio of the two medians can pair a slow round of one side with a fast round of the other)."""
    return median([a / b for a, b in zip(ref, side)])


def add_speedups(rows: dict[str, dict[str, Any]], baseline: str, refused: str | None) -> None:
    """``speedup_vs_peft`` and ``speedup_vs_peft_paired`` (against row ``baseline``) on every row, or None on all of
    them when ``refused`` says why the baseline's output is wrong: a ratio against a baseline that computes
    something else is not a result."""
    ref = rows[baseline]
    for r in rows.values():
        r["speedup_vs_peft"] = None if refused else ref["median_pass_seconds"] / r["median_pass_seconds"]
        r["speedup_vs_peft_paired"] = None if refused else paired_speedup(ref["pass_seconds"], r["pass_seconds"])


def refusal_line(refused: str | None) -> list[str]:
    """The report's line when ratios were refused (empty otherwise)."""
    return [f"NO RATIO: {refused}"] if refused else []


def llama_dims(config: Any) -> dict[str, int]:
    """Matmul dimensions of a Llama-style decoder (hidden, layers, heads, kv heads, head dim, MLP, vocab)."""
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return dict(h=int(config.hidden_size), layers=int(config.num_hidden_layers), heads=heads,
                kv=int(getattr(config, "num_key_value_heads", heads) or heads), d=head_dim,
                ffn=int(config.intermediate_size), vocab=int(config.vocab_size))


def train_step_flops(config: Any, tokens: int, attn_pairs: int, logit_rows: int) -> dict[str, float]:
    """Analytic FLOPs of one prompt-tuning step (what the hardware executes, padding included).

    ``tokens``: positions run through the decoder; ``attn_pairs``: (query, key) pairs the attention computes (eager
    attention computes the whole padded grid); ``logit_rows``: positions whose LM-head logits are computed.
    Forward: q/k/v/o projections and the gated MLP on every position, attention scores and values on every pair,
    the LM head on ``logit_rows``. Backward: the weights are frozen, so only gradients to activations are computed:
    one matmul per linear layer (same cost as forward), two per attention matmul (to both operands), one for the LM
    head. Norms, softmax, RoPE and the loss are not matmuls and are left out."""
    g = llama_dims(config)
    linear = 2 * tokens * g["layers"] * (g["h"] * g["heads"] * g["d"] + 2 * g["h"] * g["kv"] * g["d"]
                                        + g["heads"] * g["d"] * g["h"] + 3 * g["h"] * g["ffn"])
    attn = 2 * 2 * g["layers"] * g["heads"] * g["d"] * attn_pairs
    head = 2 * logit_rows * g["h"] * g["vocab"]
    fwd = linear + attn + head
    bwd = linear + 2 * attn + head
    return {"forward": float(fwd), "backward": float(bwd), "total": float(fwd + bwd)}


def batch_flops(config: Any, batch: dict[str, Any], logit_rows: int) -> float:
    """``train_step_flops`` of an engine batch: plain ([B, L] right-padded) or shared-prefix (``collate_shared``:
    prefixes [P, Lp] once, then suffixes [B, Ls] attending to their prefix's Lp slots and to themselves).

    In the shared layout autograd skips two pieces of backward, subtracted here: the prefixes' last-layer outputs
    feed nothing (only their keys/values do), so their last-layer query, attention, o_proj and MLP gradients are
    not computed; and the suffix embeddings carry no virtual token, so layer 0 computes no gradient into the
    suffix queries, keys and values. (In the plain layout the input embeddings require grad as a whole tensor,
    so everything is computed.) Checked against FlopCounterMode in tests/bench/test_bench.py."""
    b, ls = batch["input_ids"].shape
    if "prefix_input_ids" not in batch:
        return train_step_flops(config, b * ls, b * ls * ls, logit_rows)["total"]
    p, lp = batch["prefix_input_ids"].shape
    g = llama_dims(config)
    q, kv = g["h"] * g["heads"] * g["d"], g["h"] * g["kv"] * g["d"]
    skip_linear = 2 * p * lp * (2 * q + 3 * g["h"] * g["ffn"]) + 2 * b * ls * (q + 2 * kv)
    pair = 2 * g["heads"] * g["d"]   # one attention matmul, one (query, key) pair, one layer
    skip_attn = 4 * pair * p * lp * lp + pair * b * ls * (lp + ls)
    full = train_step_flops(config, p * lp + b * ls, p * lp * lp + b * ls * (lp + ls), logit_rows)["total"]
    return full - skip_linear - skip_attn


def counted_flops(fn: Callable[[], Any]) -> float:
    """FLOPs torch itself counts (``torch.utils.flop_counter.FlopCounterMode``) while ``fn`` runs once."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def best_seconds(fn: Callable[[], Any], repeats: int, min_seconds: float, sync: Callable[[], Any] = lambda: None) -> float:
    """Seconds of one ``fn()``: best of ``repeats`` loops, each of enough calls to last ``min_seconds`` (the count from
    one call after a warm-up call); ``sync`` waits for a GPU."""
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    inner = max(1, int(min_seconds / max(time.perf_counter() - t0, 1e-6)))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def matmul_peak(shapes: Sequence[tuple[int, int, int]], repeats: int = 5, min_seconds: float = 0.2,
                dtype: Any = None, device: str = "cpu") -> dict[str, Any]:
    """Best ``torch.mm`` GFLOP/s (fp32 unless ``dtype``) on ``device`` over ``shapes`` (m, k, n), each timed ``repeats``
    times (best of), inner loops long enough to last ``min_seconds``: the practical peak of this machine for the
    model's own matmul sizes (on CUDA every timing waits for the GPU)."""
    import torch

    dtype = dtype or torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    per: dict[str, float] = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k).to(device, dtype), torch.randn(k, n).to(device, dtype)
        out = torch.empty(m, n, dtype=dtype, device=device)
        best = best_seconds(lambda: torch.mm(a, b, out=out), repeats, min_seconds, sync)
        per[f"{m}x{k}x{n}"] = 2.0 * m * k * n / best / 1e9
    key = max(per, key=per.get)
    return {"peak_gflops": per[key], "peak_shape": key, "per_shape_gflops": per, "repeats": repeats}
