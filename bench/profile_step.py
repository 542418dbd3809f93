#!/usr/bin/env python3
"""Where the time of the engine's plain eager training step goes: a torch.profiler breakdown against the matmul peak.

Why: ``train_vs_peft.py`` reports the plain fp32 step at some % of the fp32 matmul peak (analytic matmul FLOPs
over the step time). Below 100 % there are two possible reasons, and they call for different fixes: the matmuls
themselves run below the peak (shapes, threading: a kernel problem), or the step spends time outside matmuls
(softmax, norms, RoPE, SiLU, copies, the loss: memory-bound work a matmul peak does not measure). This script
separates them on the same batches as ``train_vs_peft.py`` (its ``train_batches``, ``build_examples`` and
``ours_side``, so it is the step that bench times):

1. the step without the profiler (median of --repeats passes) and the matmul peak of the model's shapes, measured
   in the same run;
2. one pass under ``torch.profiler`` (CPU, ``record_shapes``, ``with_flops``): every aten op's self time, grouped
   into matmul, attention softmax, loss, elementwise/reductions, copies/layout and other, and the shape and count
   of every matmul it ran;
3. those matmuls replayed alone, unprofiled (each shape timed, times its count): the seconds the step's matmuls
   need at their own shapes. The profiler slows a pass (its overhead is reported), so its shares are not used as
   times: the step's unprofiled time = replayed matmul seconds + the rest, and the rest is apportioned to the
   other categories by their shares in the profiled pass. % of peak of the step = (matmul share of the step) x
   (the matmuls' own % of peak): the explanation says how much of the gap each reason costs.

Usage:  python3 bench/profile_step.py [--precision 32|bf16-true --batches 2 --batch-size 8 --max-seq-length 384]
Writes bench/results/profile_step.json (override with --out).
"""
from __future__ import annotations

import sys
import time
from typing import Any, Iterable

import common as C
import measure as M

MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::_mkldnn_matmul"}
SOFTMAX = {"aten::_softmax", "aten::_softmax_backward_data", "aten::softmax"}
LOSS = {"aten::_log_softmax", "aten::_log_softmax_backward_data", "aten::nll_loss_forward", "aten::nll_loss_backward",
        "aten::log_softmax", "aten::cross_entropy_loss"}
LAYOUT = {"aten::copy_", "aten::cat", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::to", "aten::index",
          "aten::index_select", "aten::embedding", "aten::embedding_dense_backward", "aten::gather", "aten::scatter",
          "aten::scatter_add_", "aten::index_put_", "aten::_index_put_impl_", "aten::empty", "aten::empty_strided",
          "aten::zeros", "aten::zero_", "aten::fill_", "aten::new_zeros", "aten::new_empty_strided", "aten::slice_backward",
          "aten::select_backward", "aten::expand", "aten::transpose", "aten::view", "aten::reshape", "aten::permute",
          "aten::slice", "aten::select", "aten::unsqueeze", "aten::_unsafe_view", "aten::t", "aten::as_strided",
          "aten::resize_", "aten::narrow", "aten::split", "aten::chunk", "aten::detach", "aten::alias",
          "aten::stack", "aten::constant_pad_nd", "aten::pad", "aten::repeat", "aten::repeat_interleave"}
ELEMENTWISE_PREFIXES = ("aten::add", "aten::sub", "aten::mul", "aten::div", "aten::neg", "aten::pow", "aten::rsqrt",
                        "aten::sqrt", "aten::mean", "aten::sum", "aten::silu", "aten::sigmoid", "aten::where",
                        "aten::masked_fill", "aten::exp", "aten::cos", "aten::sin", "aten::max", "aten::min",
                        "aten::eq", "aten::ne", "aten::lt", "aten::gt", "aten::le", "aten::ge", "aten::bitwise",
                        "aten::clamp", "aten::_foreach", "aten::lerp", "aten::addcmul", "aten::addcdiv",
                        "aten::maximum", "aten::minimum", "aten::abs", "aten::tanh", "aten::logical", "aten::norm",
                        "aten::linalg_vector_norm", "aten::threshold", "aten::fused")
CATEGORIES = ("matmul", "attention softmax", "loss (log-softmax, NLL)", "elementwise and reductions",
              "copies and layout", "other")


def category(name: str) -> str:
    """The group of one aten op (autograd's ``...Backward0`` nodes and Python-level ranges are 'other')."""
    if name in MATMUL:
        return "matmul"
    if name in SOFTMAX:
        return "attention softmax"
    if name in LOSS:
        return "loss (log-softmax, NLL)"
    if name in LAYOUT:
        return "copies and layout"
    if name.startswith(ELEMENTWISE_PREFIXES):
        return "elementwise and reductions"
    return "other"


def breakdown(events: Iterable[Any]) -> dict[str, Any]:
    """Self time (s) and FLOPs per category from ``prof.key_averages()``, plus the top ops outside matmuls."""
    per: dict[str, dict[str, float]] = {c: {"seconds": 0.0, "flops": 0.0} for c in CATEGORIES}
    ops: list[tuple[str, float, int]] = []
    for e in events:
        sec = float(e.self_cpu_time_total) / 1e6
        c = category(e.key)
        per[c]["seconds"] += sec
        per[c]["flops"] += float(getattr(e, "flops", 0) or 0)
        if c != "matmul" and sec > 0:
            ops.append((e.key, sec, int(e.count)))
    total = sum(v["seconds"] for v in per.values())
    for v in per.values():
        v["share"] = v["seconds"] / total if total else 0.0
    mm = per["matmul"]
    top = sorted(ops, key=lambda o: -o[1])[:10]
    return {"total_self_seconds": total, "categories": per,
            "matmul_gflops_per_s": mm["flops"] / mm["seconds"] / 1e9 if mm["seconds"] else 0.0,
            "top_non_matmul_ops": [{"op": n, "seconds": s, "calls": k, "share": s / total if total else 0.0}
                                   for n, s, k in top]}


def matmul_calls(events: Iterable[Any]) -> list[tuple[str, list[list[int]], int]]:
    """(op, operand shapes, calls) of every matmul in ``prof.key_averages(group_by_input_shape=True)``; addmm's bias
    and scalars are dropped (its matrices are the 2nd and 3rd inputs)."""
    calls = []
    for e in events:
        if e.key not in MATMUL or not e.input_shapes:
            continue
        shapes = [list(x) for x in e.input_shapes if isinstance(x, (list, tuple)) and len(x) >= 2]
        if len(shapes) >= 2:
            calls.append((e.key, shapes[-2:], int(e.count)))
    return calls


def replay(calls: list[tuple[str, list[list[int]], int]], dtype: Any, min_seconds: float = 0.05) -> dict[str, Any]:
    """Each matmul shape timed alone (best of 3 inner loops of >= ``min_seconds``), times its count: the seconds and
    FLOPs of the step's matmuls without the rest of the step. ``linear`` = 2-D (the projections, MLP, LM head and
    their backward), ``attention`` = batched (scores and values, and their backward)."""
    import torch

    out: dict[str, dict[str, float]] = {"linear": {"seconds": 0.0, "flops": 0.0}, "attention": {"seconds": 0.0, "flops": 0.0}}
    for _, (sa, sb), count in calls:
        a, b = torch.randn(*sa).to(dtype), torch.randn(*sb).to(dtype)
        fn = torch.bmm if len(sa) == 3 else torch.mm
        best = M.best_seconds(lambda: fn(a, b), repeats=3, min_seconds=min_seconds)
        kind = out["attention" if len(sa) == 3 else "linear"]
        batch = sa[0] if len(sa) == 3 else 1
        kind["seconds"] += best * count
        kind["flops"] += 2.0 * batch * sa[-2] * sa[-1] * sb[-1] * count
    return out


def run(setup: C.Setup, batch_records: list[list[dict[str, Any]]], table: Any, *, repeats: int = 3,
        max_seq_length: int = 384, precision: str = "32", peak_repeats: int = 5) -> dict[str, Any]:
    """The unprofiled step time, the peak, the profiled breakdown of one pass and its matmuls replayed (also used by
    the tests)."""
    import copy

    import torch
    from torch.profiler import ProfilerActivity, profile

    import train_vs_peft as T
    from stages.engine.examples import IGNORE

    model, dtype = setup.model, torch.float32
    if precision == "bf16-true":
        model, dtype = copy.deepcopy(setup.model).to(torch.bfloat16), torch.bfloat16
    examples = T.build_examples(setup, batch_records, max_seq_length)
    task_ids = {setup.template.taskname: 0}
    plain = [setup.family.collate(exs, task_ids, setup.info.pad_id) for exs in examples]
    side = T.ours_side(setup, "ours-plain", plain, table, model=model)
    cfg = setup.model.config
    flops = sum(M.batch_flops(cfg, b, int((b["labels"][:, 1:] != IGNORE).sum())) for b in plain)

    side.train_pass()                                          # warm-up: every batch shape once
    h, ffn = cfg.hidden_size, cfg.intermediate_size
    t = int(plain[0]["input_ids"].numel())
    shapes = [(t, h, ffn), (t, ffn, h), (t, h, h), (2048, 2048, 2048)]
    peaks: list[dict[str, Any]] = []
    times = M.interleaved_timing({"step": side.train_pass,
                                  "peak": lambda: peaks.append(M.matmul_peak(shapes, repeats=peak_repeats, dtype=dtype))},
                                 repeats)
    sec = M.median(times["step"])
    peak = max(p["peak_gflops"] for p in peaks)

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
        t0 = time.perf_counter()
        side.train_pass()
        profiled = time.perf_counter() - t0
    parts = breakdown(prof.key_averages())
    mm = replay(matmul_calls(prof.key_averages(group_by_input_shape=True)), dtype)
    mm_sec = sum(v["seconds"] for v in mm.values())
    mm_flops = sum(v["flops"] for v in mm.values())
    rest = max(0.0, sec - mm_sec)
    others = {c: v for c, v in parts["categories"].items() if c != "matmul"}
    profiled_other = sum(v["seconds"] for v in others.values()) or 1.0
    return {"precision": precision, "batches": len(plain), "padded_shapes": [list(b["input_ids"].shape) for b in plain],
            "pass_seconds": times["step"], "median_pass_seconds": sec, "profiled_pass_seconds": profiled,
            "analytic_flops_per_pass": flops, "step_gflops_per_s": flops / sec / 1e9,
            "matmul_peak_gflops": peak, "matmul_peak_per_round": [p["peak_gflops"] for p in peaks],
            "step_pct_of_peak": 100.0 * flops / sec / 1e9 / peak,
            "replayed_matmuls": {k: {**v, "gflops_per_s": v["flops"] / v["seconds"] / 1e9 if v["seconds"] else 0.0,
                                     "pct_of_peak": 100.0 * v["flops"] / v["seconds"] / 1e9 / peak if v["seconds"] else 0.0}
                                 for k, v in mm.items()},
            "matmul_seconds": mm_sec, "matmul_flops": mm_flops,
            "matmul_pct_of_peak": 100.0 * mm_flops / mm_sec / 1e9 / peak if mm_sec else 0.0,
            "matmul_share_of_step": mm_sec / sec, "rest_seconds": rest,
            "rest_apportioned_seconds": {c: rest * v["seconds"] / profiled_other for c, v in others.items()},
            "profiled": parts}


def report(r: dict[str, Any]) -> str:
    p = r["profiled"]
    rows = [[c, v["seconds"], 100.0 * v["share"], v["flops"] / 1e9] for c, v in p["categories"].items()]
    mm = r["replayed_matmuls"]
    lines = [M.table(["category (self time under the profiler)", "s", "% of time", "GFLOP"], rows), "",
             M.table(["top op outside matmuls (profiled)", "s", "calls", "% of time"],
                     [[o["op"], o["seconds"], o["calls"], 100.0 * o["share"]] for o in p["top_non_matmul_ops"]]), "",
             M.table(["the pass, unprofiled", "s", "% of pass", "GFLOP/s", "% of peak"],
                     [[f"matmuls, {k} (replayed alone)", v["seconds"], 100.0 * v["seconds"] / r["median_pass_seconds"],
                       v["gflops_per_s"], v["pct_of_peak"]] for k, v in mm.items()]
                     + [[f"rest: {c} (apportioned)", x, 100.0 * x / r["median_pass_seconds"], "", ""]
                        for c, x in r["rest_apportioned_seconds"].items()]
                     + [["whole pass", r["median_pass_seconds"], 100.0, r["step_gflops_per_s"], r["step_pct_of_peak"]]]), ""]
    top = ", ".join(o["op"] for o in p["top_non_matmul_ops"][:3])
    lines += [
        f"step ({r['precision']}, {r['batches']} batches, padded {r['padded_shapes']}): {r['median_pass_seconds']:.2f} s/pass "
        f"(under the profiler {r['profiled_pass_seconds']:.2f} s), {r['step_gflops_per_s']:.1f} GFLOP/s = "
        f"{r['step_pct_of_peak']:.1f} % of the {r['matmul_peak_gflops']:.1f} GFLOP/s matmul peak measured in this run",
        f"explanation: the step's matmuls, replayed alone at their shapes, need {r['matmul_seconds']:.2f} s "
        f"({r['matmul_pct_of_peak']:.1f} % of peak: linear {mm['linear']['pct_of_peak']:.1f} %, attention "
        f"{mm['attention']['pct_of_peak']:.1f} %) = {100.0 * r['matmul_share_of_step']:.1f} % of the pass; the other "
        f"{r['rest_seconds']:.2f} s are ops that are not matmuls (largest under the profiler: {top})",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = C.arg_parser(__doc__.splitlines()[0], name="profile_step", batches=2)
    ap.add_argument("--max-seq-length", type=int, default=384, help="as train_vs_peft.py: longer paragraphs are skipped")
    ap.add_argument("--precision", default="32", choices=["32", "bf16-true"])
    args = ap.parse_args(argv)
    import torch

    import train_vs_peft as T

    torch.manual_seed(args.seed)
    setup = C.setup_from_args(args)
    batches = T.train_batches(setup, args)
    table = C.prompt_table(setup, init=args.init, seed=args.seed, artifact=args.artifact)
    result = run(setup, batches, table, repeats=args.repeats, max_seq_length=args.max_seq_length,
                 precision=args.precision)
    print(report(result))
    M.write_result(args.out, {"bench": "profile_step", "model": setup.model_path, **result})
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
