#!/usr/bin/env python3
"""How cost grows: the engine's training step against sequence length and batch size (fp32 vs bf16-true), and its
evaluation against batch size and answer length, with what a GPU would take (an ESTIMATE from FLOPs, not measured).

Training: batches of whole SQuAD paragraphs that fit each --seq-lengths value (the stage's shared-prefix step,
``DecoderOnlyFamily.loss`` on ``collate_shared`` batches, answer-only logits), median of --repeats timed steps
after one untimed step, for each batch size; fp32 and, where the CPU computes bf16 natively, bf16-true.
Evaluation: ``PromptedModel.generate`` (share_prefix, the evaluation config's prompt lookup) on --eval-questions
dev questions, for each batch size and each --answer-lengths (tokens_to_generate; answers stop at the newline
or EOS as in the stage).

The GPU column: the step's analytic FLOPs (bench/measure.py, checked against torch's counter in
tests/bench/test_bench.py) at --gpu-tflops x --gpu-efficiency (default: an A100's 312 dense bf16 TFLOP/s at 40 %
model-FLOPs utilisation). It is labelled an estimate until bench/gpu_check.sh measures it on a GPU.

Usage:  python3 bench/cost_growth.py [--seq-lengths 192,384,768 --batch-sizes 4,8,16 --repeats 3]
Writes bench/results/cost_growth.json (override with --out).
"""
from __future__ import annotations

import sys
import time
from typing import Any

import common as C
import measure as M


def train_rows(setup: C.Setup, args: Any, bf16_model: Any) -> list[dict[str, Any]]:
    import torch

    from stages.engine.collate import collate_shared
    from stages.engine.examples import IGNORE
    from train_vs_peft import build_examples, ours_side

    fam, tpl, info = setup.family, setup.template, setup.info
    records = C.squad_records("train", args.data_dir)
    table = C.prompt_table(setup, init=args.init, seed=args.seed)
    rows = []
    for seq in (int(x) for x in args.seq_lengths.split(",")):
        # paragraphs whose questions fit seq and need more than --min-fill of it: the length grows with the setting
        fits = lambda r, s=seq: (ex := fam.build_example(tpl, r, info, max_seq_length=s, add_eos=True, where="")) is not None \
            and len(ex.input_ids) > args.min_fill * s  # noqa: E731
        for bs in (int(x) for x in args.batch_sizes.split(",")):
            recs = C.paragraph_batches(records, n_batches=2, batch_size=bs, seed=args.seed, keep=fits)
            batches = [collate_shared(exs, {tpl.taskname: 0}, info.pad_id) for exs in build_examples(setup, recs, seq)]
            tokens = sum(int(b["attention_mask"].sum()) + int(b.get("prefix_attention_mask", torch.zeros(0)).sum())
                         for b in batches) / len(batches)
            flops = M.median([M.batch_flops(setup.model.config, b, int((b["labels"][:, 1:] != IGNORE).sum()))
                              for b in batches])
            for precision, model in (("32", None), ("bf16-true", bf16_model)):
                if precision == "bf16-true" and model is None:
                    continue
                side = ours_side(setup, f"{precision}", batches, table, model=model)
                side.step(0)
                times = []
                for r in range(args.repeats):
                    t0 = time.perf_counter()
                    side.step(r % len(batches))
                    times.append(time.perf_counter() - t0)
                sec = M.median(times)
                rows.append({"max_seq_length": seq, "batch_size": bs, "precision": precision, "step_seconds": sec,
                             "tokens_per_step": tokens, "tokens_per_s": tokens / sec, "gflop_per_step": flops / 1e9,
                             "gpu_estimate_seconds": flops / (args.gpu_tflops * 1e12 * args.gpu_efficiency)})
                print(f"  train seq {seq} batch {bs} {precision}: {sec:.2f} s/step, {tokens / sec:.0f} tokens/s", flush=True)
    return rows


def eval_rows(setup: C.Setup, args: Any) -> list[dict[str, Any]]:
    from eval_vs_peft import default_lookup, prompted_model

    table = C.prompt_table(setup, init=args.init, seed=args.seed)
    pm = prompted_model(setup, table)
    k, budget = default_lookup()
    dev = C.squad_records("dev", args.data_dir)[:args.eval_questions]
    inputs = [{key: v for key, v in r.items() if key != "answer"} for r in dev]
    rows = []
    for length in (int(x) for x in args.answer_lengths.split(",")):
        for bs in (int(x) for x in args.eval_batch_sizes.split(",")):
            pm.generate(inputs[:bs], tokens_to_generate=length, batch_size=bs, share_prefix=True, progress=False,
                        prompt_lookup_num_tokens=k, prompt_lookup_pass_budget=budget)   # warm-up
            t0 = time.perf_counter()
            pm.generate(inputs, tokens_to_generate=length, batch_size=bs, share_prefix=True, progress=False,
                        prompt_lookup_num_tokens=k, prompt_lookup_pass_budget=budget)
            sec = time.perf_counter() - t0
            rows.append({"tokens_to_generate": length, "batch_size": bs, "questions": len(inputs),
                         "questions_per_s": len(inputs) / sec})
            print(f"  eval answer {length} batch {bs}: {len(inputs) / sec:.2f} questions/s", flush=True)
    return rows


def report(result: dict[str, Any]) -> str:
    lines = [M.table(["max_seq_length", "batch", "precision", "s/step", "tokens/s", "GFLOP/step", "GPU s/step (ESTIMATE)"],
                     [[r["max_seq_length"], r["batch_size"], r["precision"], r["step_seconds"], r["tokens_per_s"],
                       r["gflop_per_step"], r["gpu_estimate_seconds"]] for r in result["train"]])]
    lines.append(M.table(["tokens_to_generate", "batch", "questions/s"],
                         [[r["tokens_to_generate"], r["batch_size"], r["questions_per_s"]] for r in result["eval"]]))
    lines.append(f"GPU column: an ESTIMATE, {result['gpu_assumption']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = C.arg_parser(__doc__.splitlines()[0], name="cost_growth", batches=2)
    ap.add_argument("--seq-lengths", default="192,384,768")
    ap.add_argument("--batch-sizes", default="4,8,16")
    ap.add_argument("--min-fill", type=float, default=0.5, help="questions must use more than this part of the length")
    ap.add_argument("--eval-questions", type=int, default=64)
    ap.add_argument("--eval-batch-sizes", default="1,8,16,32")
    ap.add_argument("--answer-lengths", default="8,32")
    ap.add_argument("--gpu-tflops", type=float, default=312.0, help="dense bf16 TFLOP/s of the GPU to estimate")
    ap.add_argument("--gpu-efficiency", type=float, default=0.4, help="model FLOPs utilisation assumed")
    ap.add_argument("--bf16", default="auto", choices=["auto", "on", "off"])
    args = ap.parse_args(argv)
    import copy

    import torch

    from stages.common.precision import bf16_support

    torch.manual_seed(args.seed)
    setup = C.setup_from_args(args)
    support = bf16_support("cpu")
    print(f"bf16: {support.describe()}", flush=True)
    use_bf16 = args.bf16 == "on" or (args.bf16 == "auto" and support.native)
    bf16_model = copy.deepcopy(setup.model).to(torch.bfloat16) if use_bf16 else None
    result = {"bench": "cost_growth", "model": setup.model_path, "bf16": support.describe(),
              "train": train_rows(setup, args, bf16_model), "eval": eval_rows(setup, args),
              "gpu_assumption": f"{args.gpu_tflops:g} TFLOP/s x {args.gpu_efficiency:g} utilisation, not measured"}
    print(report(result))
    M.write_result(args.out, result)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
