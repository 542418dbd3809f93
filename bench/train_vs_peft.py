#!/usr/bin/env python3
"""Training throughput of our prompt-tuning step against Hugging Face PEFT prompt tuning, and its efficiency.

Same process, same frozen model object, same real SQuAD questions (batches of whole paragraphs, about five
questions per context), same prompt table, same tokens and labels (answer only), fp32 on CPU (or on the GPU with
--device cuda: model, tables, batches and the matmul peak there):

  peft          get_peft_model(model, PromptTuningConfig(CAUSAL_LM, same virtual tokens)); model(input_ids,
                attention_mask, labels).loss; backward; AdamW on the prompt embedding
  ours-plain    the engine's DecoderOnlyFamily.loss(model, store, data.collate(batch)); backward; AdamW on the
                PromptStore (what PromptLearningModule.training_step runs)
  ours-shared   the same loss on collate.collate_shared(batch): each paragraph's prefix runs once
  ours-plain-compiled  ours-plain with ``trainer.compile`` (layer_compile.py: the decoder layers through
                torch.compile, dynamic shapes); the first step, in the agreement check, pays the compilation (reported
                as ``first_step_seconds``); --no-compile leaves this side out
  ours-shared-bucketed  the same questions, batched by the engine's training sampler with length bucketing and
                whole paragraphs (engine/samplers.BucketBatchSampler), collate_shared: what the CPU config now trains
                with; its batches differ, so its loss is not part of the agreement check (same code as ours-shared)

First the loss and the prompt gradient of every side on the same batch from the same table (must agree to
--tol relative), then --warmup untimed passes per side over all batches (the first step under torch's
FlopCounterMode, which also counts the executed FLOPs), then --repeats timed passes over the same batches,
interleaved across sides; the median pass gives examples/s and template tokens/s (real tokens incl. virtual
ones, padding excluded; data collation is done beforehand for every side). Efficiency: analytic FLOPs of the executed step against the
best fp32 torch.mm GFLOP/s of the model's matmul shapes, measured once per round between the timed passes (this
VM's speed drifts by up to 2x over minutes, so each pass is compared with the peak of its own round).

Usage:  python3 bench/train_vs_peft.py [--batches 2 --batch-size 8 --repeats 3 --max-seq-length 384]
Writes bench/results/train_vs_peft.json (override with --out).
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Sequence

import common as C
import measure as M  # noqa: E402


PEAK = "matmul-peak"   # the pseudo-side timed between the passes


def peft_batch(examples: Sequence[Any], pad_id: int) -> dict[str, Any]:
    """PEFT's inputs for our examples: the same token ids and labels without the leading virtual slots (PEFT
    prepends its own virtual tokens and ignores them in the loss), right-padded like ours."""
    import torch

    from stages.engine.examples import IGNORE

    cut = [C.without_virtual(e.input_ids, e.virtual_index, e.labels) for e in examples]
    n = max(len(ids) for ids, _ in cut)
    return {
        "input_ids": torch.tensor([ids + [pad_id] * (n - len(ids)) for ids, _ in cut], dtype=torch.long),
        "labels": torch.tensor([lab + [IGNORE] * (n - len(lab)) for _, lab in cut], dtype=torch.long),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (n - len(ids)) for ids, _ in cut], dtype=torch.long),
    }


def bucketed_batches(examples: list[Any], batch_size: int, seed: int = 0) -> list[list[Any]]:
    """The same examples batched as the engine's training sampler does with ``length_bucketing`` and
    ``share_prefix`` (``engine/samplers.BucketBatchSampler``: whole paragraphs, similar lengths together)."""
    from stages.engine.samplers import BucketBatchSampler
    from stages.engine.collate import prefix_groups

    sampler = BucketBatchSampler(len(examples), batch_size, shuffle=True, seed=seed, epoch_fn=lambda: 0,
                                 lengths=[len(e.input_ids) for e in examples], groups=prefix_groups(examples))
    return [[examples[i] for i in b] for b in sampler.batches()]


class Side:
    """One contestant: a loss on its own batches and an AdamW on its own copy of the prompt table."""

    def __init__(self, name: str, batches: list[dict[str, Any]], loss_fn: Callable[[dict[str, Any]], Any],
                 param: Any, lr: float) -> None:
        import torch

        self.name, self.batches, self.loss_fn, self.param = name, batches, loss_fn, param
        self.opt = torch.optim.AdamW([param], lr=lr, weight_decay=0.0)

    def loss_and_grad(self, i: int) -> tuple[float, Any]:
        """Loss and prompt gradient on batch i, no optimiser step (the agreement check)."""
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.batches[i])
        loss.backward()
        grad = self.param.grad.detach().clone()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach()), grad

    def step(self, i: int) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.batches[i])
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def train_pass(self) -> None:
        for i in range(len(self.batches)):
            self.step(i)


def build_examples(setup: C.Setup, batch_records: list[list[dict[str, Any]]], max_seq_length: int) -> list[list[Any]]:
    """The engine's training examples (answer-only labels, EOS) of every batch; a question that does not fit stops."""
    fam, tpl, info = setup.family, setup.template, setup.info
    examples = []
    for b, recs in enumerate(batch_records):
        exs = [fam.build_example(tpl, r, info, max_seq_length=max_seq_length, add_eos=True, where=f"batch{b}[{i}]")
               for i, r in enumerate(recs)]
        if any(e is None for e in exs):
            raise SystemExit(f"batch {b}: a question does not fit --max-seq-length {max_seq_length}")
        examples.append(exs)
    return examples


def ours_side(setup: C.Setup, name: str, batches: list[dict[str, Any]], table: Any, model: Any = None) -> Side:
    """The engine's training step on ``batches`` (plain or collate_shared) with its own trainable copy of ``table``
    (``model``: another copy of the frozen model, e.g. the bf16 one; the prompt stays fp32 as in the stage)."""
    store = C.prompt_store(setup, table, trainable=True)
    model = setup.model if model is None else model

    def loss(b: dict[str, Any]) -> Any:
        total, n = setup.family.loss(model, store, b)
        return total / n.clamp(min=1)          # PromptLearningModule.training_step

    return Side(name, batches, loss, store.table(setup.template.taskname), setup.lr)


def compiled_side(setup: C.Setup, name: str, batches: list[dict[str, Any]], table: Any) -> Side:
    """``ours_side`` whose forward passes run the decoder layers compiled (``trainer.compile``); switched on only
    while its loss is built, so the other sides keep the eager layers of the same model object (the backward of a
    compiled forward is compiled too)."""
    from stages.engine.layer_compile import LayerCompiler

    side = ours_side(setup, name, batches, table)
    compiler, eager_loss = LayerCompiler(setup.model), side.loss_fn

    def loss(b: dict[str, Any]) -> Any:
        compiler.enable()
        try:
            return eager_loss(b)
        finally:
            compiler.disable()

    side.loss_fn = loss
    return side


def bf16_tolerance(config: Any) -> float:
    """The relative loss/gradient bound of bf16 against fp32 (``stages.common.precision.bf16_relative_bound``)."""
    from stages.common.precision import bf16_relative_bound

    return bf16_relative_bound(config.num_hidden_layers)


def run(setup: C.Setup, batch_records: list[list[dict[str, Any]]], table: Any, *, repeats: int = 3, warmup: int = 1,
        max_seq_length: int = 384, tol: float = 1e-4, measure_peak: bool = True, peak_repeats: int = 5,
        compile_plain: bool = True, bf16: bool = False) -> dict[str, Any]:
    """The whole comparison on already chosen batches; returns the result document (also used by the tests).
    ``bf16``: also the engine's plain and shared steps on a bf16 copy of the frozen model (``trainer.precision=
    bf16-true``), checked against PEFT's fp32 loss within :func:`bf16_tolerance`."""
    from stages.engine.collate import collate_shared
    from stages.engine import examples as D

    fam, tpl, info = setup.family, setup.template, setup.info
    examples = build_examples(setup, batch_records, max_seq_length)
    task_ids = {tpl.taskname: 0}
    plain = [fam.collate(exs, task_ids, info.pad_id) for exs in examples]
    sides: dict[str, Side] = {}

    peft = C.peft_prompt_model(setup, table)
    peft_param = peft.prompt_encoder[peft.active_adapter].embedding.weight
    dev = setup.device
    plain = [C.to_device(b, dev) for b in plain]
    sides["peft"] = Side("peft", [C.to_device(peft_batch(exs, info.pad_id), dev) for exs in examples],
                         lambda b: peft(**b).loss, peft_param, setup.lr)

    sides["ours-plain"] = ours_side(setup, "ours-plain", plain, table)
    if compile_plain:
        from stages.engine.layer_compile import check_compiler

        check_compiler("ours-plain-compiled", fix="run the bench with --no-compile")
        sides["ours-plain-compiled"] = compiled_side(setup, "ours-plain-compiled", plain, table)
    sides["ours-shared"] = ours_side(setup, "ours-shared", [C.to_device(collate_shared(exs, task_ids, info.pad_id), dev)
                                                             for exs in examples], table)
    # the same questions, batches formed by the engine's sampler
    bucketed = bucketed_batches([e for exs in examples for e in exs], len(examples[0]))
    sides["ours-shared-bucketed"] = ours_side(setup, "ours-shared-bucketed",
                                              [C.to_device(collate_shared(b, task_ids, info.pad_id), dev) for b in bucketed], table)
    if bf16:
        import copy

        import torch

        low = copy.deepcopy(setup.model).to(torch.bfloat16)
        sides["ours-plain-bf16"] = ours_side(setup, "ours-plain-bf16", plain, table, model=low)
        sides["ours-shared-bf16"] = ours_side(setup, "ours-shared-bf16", sides["ours-shared"].batches, table, model=low)

    # ---- agreement on batch 0, from the same table ----------------------------------------------------
    ref_loss, ref_grad = sides["peft"].loss_and_grad(0)
    agreement: dict[str, Any] = {}
    first_step: dict[str, float] = {}     # seconds of each side's first step (the compiled side compiles here)
    for name, side in sides.items():
        if name == "ours-shared-bucketed":   # other batches; its loss code is ours-shared's, checked here
            continue
        t0 = time.perf_counter()
        loss, grad = side.loss_and_grad(0)
        first_step[name] = time.perf_counter() - t0
        agreement[name] = {"loss": loss, "loss_rel_diff": abs(loss - ref_loss) / max(abs(ref_loss), 1e-12),
                           "grad_rel_diff": float((grad - ref_grad).norm() / ref_grad.norm().clamp(min=1e-30))}
    def tol_of(name: str) -> float:
        return bf16_tolerance(setup.model.config) if name.endswith("-bf16") else tol

    for name, a in agreement.items():
        a["tol"] = tol_of(name)
    ok = all(a["loss_rel_diff"] <= a["tol"] and a["grad_rel_diff"] <= max(a["tol"], 1e-3) for a in agreement.values())

    # ---- warm-up: untimed passes over every batch (its first step counts FLOPs), then interleaved timed passes --
    # (every batch shape once before timing: the first step of a new shape pays for allocations, which made the
    # first timed round the slowest of every side)
    # (the compiled side executes ours-plain's matmuls; FlopCounterMode does not see into compiled graphs)
    counted0 = {name: M.counted_flops(lambda side=side: side.step(0)) for name, side in sides.items() if name != "ours-plain-compiled"}
    if "ours-plain-compiled" in sides:
        sides["ours-plain-compiled"].step(0)
        counted0["ours-plain-compiled"] = counted0["ours-plain"]
    for w in range(warmup):
        for side in sides.values():
            for i in range(1 if w == 0 else 0, len(side.batches)):
                side.step(i)
    timed = {n: s.train_pass for n, s in sides.items()}
    peaks: list[dict[str, Any]] = []
    peaks16: list[dict[str, Any]] = []
    if measure_peak:   # the matmul peak is measured once per round, between the passes: the same machine state
        h, ffn = setup.model.config.hidden_size, setup.model.config.intermediate_size
        t = int(plain[0]["input_ids"].numel())
        shapes = [(t, h, ffn), (t, ffn, h), (t, h, h), (2048, 2048, 2048)]
        if bf16:
            import torch

            def both_peaks() -> None:
                peaks.append(M.matmul_peak(shapes, repeats=peak_repeats, device=dev))
                peaks16.append(M.matmul_peak(shapes, repeats=peak_repeats, dtype=torch.bfloat16, device=dev))

            timed[PEAK] = both_peaks
        else:
            timed[PEAK] = lambda: peaks.append(M.matmul_peak(shapes, repeats=peak_repeats, device=dev))
    times = M.interleaved_timing(timed, repeats)
    times.pop(PEAK, None)

    n_examples = sum(len(exs) for exs in examples)
    template_tokens = sum(len(e.input_ids) for exs in examples for e in exs)
    cfg = setup.model.config

    def ours_flops(b: dict[str, Any]) -> float:   # the engine computes logits on label positions only
        return M.batch_flops(cfg, b, int((b["labels"][:, 1:] != D.IGNORE).sum()))

    rows: dict[str, Any] = {}
    for name, side in sides.items():
        sec = M.median(times[name])
        if name == "peft":   # PEFT runs our plain layout (its virtual tokens prepended) and logits on every position
            per_batch = [M.batch_flops(cfg, b, int(b["input_ids"].numel())) for b in plain]
        else:
            per_batch = [ours_flops(b) for b in side.batches]
        rows[name] = {"median_pass_seconds": sec, "pass_seconds": times[name], "examples_per_s": n_examples / sec,
                      "template_tokens_per_s": template_tokens / sec, "flops_per_pass": sum(per_batch),
                      "analytic_flops_batch0": per_batch[0], "counted_flops_batch0": counted0[name],
                      "gflops_per_s": sum(per_batch) / sec / 1e9,
                      "pass_gflops_per_s": [sum(per_batch) / x / 1e9 for x in times[name]]}
        if name in first_step:
            rows[name]["first_step_seconds"] = first_step[name]
    refused = None
    if not ok:
        worst = max(agreement, key=lambda n: agreement[n]["loss_rel_diff"])
        refused = (f"loss/gradient of {worst} differ from PEFT's on the same batch (loss rel diff "
                   f"{agreement[worst]['loss_rel_diff']:.1e}, grad {agreement[worst]['grad_rel_diff']:.1e}; tol {tol:g}): "
                   "the sides compute different things, so no speed ratio is reported")
    M.add_speedups(rows, "peft", refused)
    result: dict[str, Any] = {
        "model": setup.model_path, "attn_implementation": getattr(setup.model.config, "_attn_implementation", None),
        "template": tpl.prompt_template, "virtual_tokens": tpl.total_virtual_tokens,
        "batches": len(examples), "batch_size": len(examples[0]), "examples_per_pass": n_examples,
        "template_tokens_per_pass": template_tokens, "padded_shapes": [list(b["input_ids"].shape) for b in plain],
        "contexts_per_batch": [len({r["context"] for r in recs}) for recs in batch_records],
        "repeats": repeats, "warmup_passes": warmup, "max_seq_length": max_seq_length,
        "rows": rows, "agreement": {"reference": "peft", "tol": tol, "ok": ok, "per_side": agreement}, "ratio_refused": refused,
    }
    if measure_peak:
        best = max(peaks, key=lambda p: p["peak_gflops"])
        result["matmul_peak"] = {**best, "per_round_gflops": [p["peak_gflops"] for p in peaks]}
        if peaks16:
            best16 = max(peaks16, key=lambda p: p["peak_gflops"])
            result["matmul_peak_bf16"] = {**best16, "per_round_gflops": [p["peak_gflops"] for p in peaks16]}
        for name, r in rows.items():
            own, own_best = (peaks16, best16) if name.endswith("-bf16") else (peaks, best)   # bf16 sides: bf16 peak
            paired = [100.0 * g / p["peak_gflops"] for g, p in zip(r["pass_gflops_per_s"], own)]
            r["pct_of_peak_per_round"] = paired
            r["pct_of_peak"] = M.median(paired)                       # each pass against the peak of its own round
            r["pct_of_peak_best"] = 100.0 * max(r["pass_gflops_per_s"]) / own_best["peak_gflops"]   # best vs best
    return result


def report(result: dict[str, Any]) -> str:
    """The printed table: throughput, ratio to PEFT, efficiency, loss agreement."""
    rows = result["rows"]
    agree = result["agreement"]["per_side"]
    lines = [M.table(
        ["side", "examples/s", "tokens/s", "x PEFT", "x PEFT paired", "GFLOP/s", "% peak", "% peak best", "loss", "rel diff"],
        [[n, r["examples_per_s"], r["template_tokens_per_s"], r["speedup_vs_peft"], r["speedup_vs_peft_paired"], r["gflops_per_s"],
          r.get("pct_of_peak"), r.get("pct_of_peak_best"), agree[n]["loss"] if n in agree else "(other batches)",
          f"{agree[n]['loss_rel_diff']:.1e}" if n in agree else ""] for n, r in rows.items()])]
    if "matmul_peak" in result:
        p = result["matmul_peak"]
        lines.append(f"fp32 matmul peak: {p['peak_gflops']:.1f} GFLOP/s ({p['peak_shape']}); per round: "
                     + ", ".join(f"{v:.1f}" for v in p["per_round_gflops"]) + "; per shape (best round): "
                     + ", ".join(f"{k} {v:.1f}" for k, v in p["per_shape_gflops"].items()))
        if "matmul_peak_bf16" in result:
            p16 = result["matmul_peak_bf16"]
            lines.append(f"bf16 matmul peak: {p16['peak_gflops']:.1f} GFLOP/s ({p16['peak_shape']}); the -bf16 sides' % peak is "
                         "against it")
            fp = rows.get("ours-shared", {}).get("median_pass_seconds")
            lo = rows.get("ours-shared-bf16", {}).get("median_pass_seconds")
            if fp and lo:
                lines.append(f"bf16-true vs fp32, shared-prefix step: {fp / lo:.2f}x faster; loss "
                             f"{agree['ours-shared-bf16']['loss']:.5f} vs {agree['ours-shared']['loss']:.5f} "
                             f"(rel diff {abs(agree['ours-shared-bf16']['loss'] - agree['ours-shared']['loss']) / abs(agree['ours-shared']['loss']):.1e}, "
                             f"bound {agree['ours-shared-bf16']['tol']:.1e})")
        lines.append("% peak: median over rounds of each pass's GFLOP/s against the peak measured in the same round; "
                     "% peak best: the best pass against the best peak")
    lines.append("first step, s (the agreement check; ours-plain-compiled compiles in it): " + "; ".join(
        f"{n} {r['first_step_seconds']:.1f}" for n, r in rows.items() if "first_step_seconds" in r))
    lines.append("GFLOP of one step on its first batch, analytic | torch FlopCounterMode: " + "; ".join(
        f"{n} {r['analytic_flops_batch0'] / 1e9:.1f} | {r['counted_flops_batch0'] / 1e9:.1f}" for n, r in rows.items()))
    lines.append(f"{result['batches']} batches x {result['batch_size']} questions (contexts per batch {result['contexts_per_batch']}, "
                 f"padded {result['padded_shapes']}), median of {result['repeats']} passes; loss agreement "
                 f"{'OK' if result['agreement']['ok'] else 'FAILED'} (tol {result['agreement']['tol']:g})")
    lines += M.refusal_line(result.get("ratio_refused"))
    return "\n".join(lines)


def train_batches(setup: C.Setup, args: Any) -> list[list[dict[str, Any]]]:
    """--batches x --batch-size SQuAD train questions, whole paragraphs that fit --max-seq-length (seeded)."""
    fam, tpl, info = setup.family, setup.template, setup.info
    fits = lambda r: fam.build_example(tpl, r, info, max_seq_length=args.max_seq_length, add_eos=True, where="") is not None  # noqa: E731
    return C.paragraph_batches(C.squad_records("train", args.data_dir), n_batches=args.batches,
                               batch_size=args.batch_size, seed=args.seed, keep=fits)


def main(argv: list[str] | None = None) -> int:
    ap = C.arg_parser(__doc__.splitlines()[0], name="train_vs_peft", batches=2, device=True)
    ap.add_argument("--warmup", type=int, default=1, help="untimed passes per side over all batches before timing (>= 1; the first step counts FLOPs)")
    ap.add_argument("--max-seq-length", type=int, default=384, help="paragraphs with a longer question are skipped")
    ap.add_argument("--tol", type=float, default=1e-4, help="relative loss agreement required")
    ap.add_argument("--no-compile", action="store_true", help="leave out the ours-plain-compiled side (needs a C++ compiler)")
    ap.add_argument("--bf16", default="auto", choices=["auto", "on", "off"],
                    help="add the bf16-true sides (auto: where the device computes bf16 natively, stages/common/precision.py)")
    args = ap.parse_args(argv)
    import torch

    from stages.common.precision import bf16_support

    C.check_device(args.device)
    support = bf16_support(C.accelerator(args.device))
    print(f"bf16: {support.describe()}")
    bf16 = args.bf16 == "on" or (args.bf16 == "auto" and support.native)

    torch.manual_seed(args.seed)
    setup = C.setup_from_args(args)
    batches = train_batches(setup, args)
    table = C.prompt_table(setup, init=args.init, seed=args.seed, artifact=args.artifact)
    result = run(setup, batches, table, repeats=args.repeats, warmup=max(1, args.warmup),
                 max_seq_length=args.max_seq_length, tol=args.tol, compile_plain=not args.no_compile, bf16=bf16)
    print(report(result))
    M.write_result(args.out, {"bench": "train_vs_peft", **result}, device=args.device)
    print(f"written: {args.out}")
    return 0 if result["agreement"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
