#!/usr/bin/env python3
"""Time to F1: our prompt-tuning engine against Hugging Face PEFT prompt tuning, each given the same wall-clock budgets.

Both sides start from the same prompt table (the CPU config's init), train on the same SQuAD training questions in
the same batches (whole paragraphs, length-bucketed: the stage's sampler) with the same AdamW (the CPU config's lr,
betas, weight decay), the same warm-up then constant learning rate (a constant rate makes one run per side serve
every budget), the same precision, on the same frozen model object:

  peft   get_peft_model(model, PromptTuningConfig(CAUSAL_LM)) as a user writes it; model(input_ids, attention_mask,
         labels).loss; backward; step
  ours   the stage's step: DecoderOnlyFamily.loss on collate_shared batches (each paragraph's prefix once)

The sides are interleaved in chunks of --chunk-seconds, each with its own clock that counts only its own steps, so
the machine's drift hits both. When a side's clock passes a budget its table is kept. Every kept table is then
scored on the same --eval held-out dev questions (squad_test_ground_truth.jsonl from --eval-offset, all gold
answers) by the same decoder, the engine's exact greedy decoding, so only training differs. Before training, the
two losses and prompt gradients on the same batch from the same table must agree (fp32: 1e-4; bf16:
``stages.common.precision.bf16_relative_bound``); otherwise no ratio is printed.

Reports F1 (with its 95 % bootstrap interval) against minutes for both sides as a table and a PNG, and "minutes
for PEFT to reach our F1 at --reference-minutes" (linear interpolation between PEFT's budgets; "> max" when it
never does).

Usage:  python3 bench/quality_vs_peft.py [--budgets 2,5,10 --eval 500 --precision auto]
Writes bench/results/quality_vs_peft.json and .png (override with --out).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import common as C
import measure as M

class Trainee:
    """One side: its batches, loss, trainable table, AdamW with warm-up, its own clock and kept tables."""

    def __init__(self, name: str, batches: list[Any], loss_fn: Any, param: Any, setup: C.Setup, opt_cfg: dict[str, Any],
                 warmup: int) -> None:
        import torch

        self.name, self.batches, self.loss_fn, self.param = name, batches, loss_fn, param
        self.opt = torch.optim.AdamW([param], lr=setup.lr, betas=tuple(opt_cfg.get("betas", (0.9, 0.98))),
                                     weight_decay=float(opt_cfg.get("weight_decay", 0.0)))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / max(1, warmup)))
        self.clock = 0.0
        self.steps = 0
        self.losses: list[float] = []
        self.kept: dict[float, Any] = {}

    def loss_and_grad(self, i: int) -> tuple[float, Any]:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.batches[i])
        loss.backward()
        grad = self.param.grad.detach().float().clone()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach()), grad

    def run_until(self, seconds: float, budgets: list[float]) -> None:
        """Steps until this side's own clock reaches ``seconds``; keeps the table at every budget it passes."""
        while self.clock < seconds:
            t0 = time.perf_counter()
            self.opt.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.batches[self.steps % len(self.batches)])
            loss.backward()
            self.opt.step()
            self.sched.step()
            self.clock += time.perf_counter() - t0
            self.steps += 1
            self.losses.append(float(loss.detach()))
            for b in budgets:
                if b not in self.kept and self.clock >= b * 60:
                    self.kept[b] = (self.param.detach().float().clone(), self.steps)


def training_batches(setup: C.Setup, args: Any, cfg: dict[str, Any]) -> list[list[Any]]:
    """The stage's training examples (its truncation, answer window, EOS) batched by its sampler."""
    from stages.engine.dataset import build_dataset
    from train_vs_peft import bucketed_batches

    data = cfg["data"]
    records = [(r, f"train[{i}]") for i, r in enumerate(C.squad_records("train", args.data_dir))]
    examples, stats = build_dataset([], {setup.template.taskname: setup.template}, setup.info, key="train",
                                    max_seq_length=args.max_seq_length or int(data["max_seq_length"]), min_seq_length=1,
                                    add_eos=True, max_examples=args.train_examples, seed=args.seed, records=records,
                                    builder=setup.family.build_example, group_sample=True,
                                    keep_answer=bool(data.get("truncate_keep_answer", False)))
    print(f"training examples: {stats.as_dict()}", flush=True)
    return bucketed_batches(examples, args.batch_size, seed=args.seed)


def score(setup: C.Setup, table: Any, records: list[dict[str, Any]], args: Any) -> dict[str, Any]:
    """SQuAD EM/F1 (with 95 % intervals) of ``table`` through the engine's greedy decoding."""
    from stages.engine.prompted_model import PromptedModel
    from stages.evaluation.metrics import aggregate, score as squad_score

    store = C.prompt_store(setup, table, trainable=False)
    pm = PromptedModel(setup.model, setup.tokenizer, {setup.template.taskname: setup.template}, store,
                       {"language_model_path": setup.model_path})
    inputs = [{k: v for k, v in r.items() if k != "answer"} for r in records]
    preds = pm.generate(inputs, tokens_to_generate=args.tokens_to_generate, batch_size=16, share_prefix=True,
                        prompt_lookup_num_tokens=4, progress=False)
    out = aggregate(squad_score(p, r["answer"]) for p, r in zip(preds, records))
    return {k: out[k] for k in ("exact_match", "f1", "total", "f1_ci95")}


def minutes_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """First minute at which the (minutes, F1) curve reaches ``target`` (linear between points; 0 F1 at 0)."""
    prev = (0.0, 0.0)
    for m, f in curve:
        if f >= target:
            if f == prev[1]:
                return m
            return prev[0] + (m - prev[0]) * (target - prev[1]) / (f - prev[1])
        prev = (m, f)
    return None


def plot(path: Path, rows: dict[str, list[dict[str, Any]]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in rows.items():
        xs = [p["minutes"] for p in pts]
        ax.plot(xs, [p["f1"] for p in pts], marker="o", label=name)
        ax.fill_between(xs, [p["f1_ci95"][0] for p in pts], [p["f1_ci95"][1] for p in pts], alpha=0.15)
    ax.set_xlabel("training minutes (each side's own clock)")
    ax.set_ylabel("held-out SQuAD F1 (95% CI)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = C.arg_parser(__doc__.splitlines()[0], name="quality_vs_peft", batches=0)
    ap.add_argument("--budgets", default="2,5,10", help="training minutes per side, comma separated")
    ap.add_argument("--reference-minutes", type=float, default=5.0, help="our budget whose F1 PEFT must reach")
    ap.add_argument("--eval", type=int, default=500, help="held-out dev questions scored per kept table")
    ap.add_argument("--eval-offset", type=int, default=5000, help="first dev record (dev[5000:] = the evaluation slice)")
    ap.add_argument("--train-examples", type=int, default=20000, help="training questions sampled (whole paragraphs)")
    ap.add_argument("--max-seq-length", type=int, default=None, help="default: the CPU config's")
    ap.add_argument("--precision", default="auto", help="auto | 32 | bf16-true (both sides)")
    ap.add_argument("--chunk-seconds", type=float, default=20.0, help="interleaving granularity")
    ap.add_argument("--tokens-to-generate", type=int, default=32)
    args = ap.parse_args(argv)
    import torch
    from omegaconf import OmegaConf

    from stages.common import precision as P

    torch.manual_seed(args.seed)
    budgets = sorted(float(b) for b in args.budgets.split(","))
    if args.reference_minutes not in budgets:
        raise SystemExit(f"--reference-minutes {args.reference_minutes} must be one of --budgets {budgets}")
    cfg = OmegaConf.to_container(OmegaConf.load(str(C.DEFAULT_CONFIG)), resolve=False)["model"]
    setup = C.setup_from_args(args)
    chosen = P.resolve(args.precision, "cpu", "--precision")
    print(P.explain(args.precision, chosen, "cpu"), flush=True)
    if chosen not in ("32", "32-true", "bf16-true"):
        raise SystemExit(f"--precision {args.precision} -> {chosen}: this bench runs 32 or bf16-true")
    table = C.prompt_table(setup, init=args.init, seed=args.seed, artifact=args.artifact)
    if chosen == "bf16-true":
        setup.model.to(torch.bfloat16)

    from stages.engine.collate import collate_shared
    from train_vs_peft import peft_batch

    batches = training_batches(setup, args, cfg)
    task_ids, pad = {setup.template.taskname: 0}, setup.info.pad_id
    warmup = int(cfg["optim"].get("sched", {}).get("warmup_steps", 0) or 0)
    peft = C.peft_prompt_model(setup, table)
    peft_param = peft.prompt_encoder[peft.active_adapter].embedding.weight
    sides = {"peft": Trainee("peft", [peft_batch(b, pad) for b in batches], lambda b: peft(**b).loss, peft_param,
                             setup, cfg["optim"], warmup)}
    store = C.prompt_store(setup, table, trainable=True)

    def ours_loss(b: dict[str, Any]) -> Any:
        total, n = setup.family.loss(setup.model, store, b)
        return total / n.clamp(min=1)

    sides["ours"] = Trainee("ours", [collate_shared(b, task_ids, pad) for b in batches], ours_loss,
                            store.table(setup.template.taskname), setup, cfg["optim"], warmup)

    # ---- agreement on the first batch, from the same table ------------------------------------------------
    (l_p, g_p), (l_o, g_o) = sides["peft"].loss_and_grad(0), sides["ours"].loss_and_grad(0)
    tol = 1e-4 if chosen.startswith("32") else P.bf16_relative_bound(setup.model.config.num_hidden_layers)
    agreement = {"peft_loss": l_p, "ours_loss": l_o, "loss_rel_diff": abs(l_o - l_p) / max(abs(l_p), 1e-12),
                 "grad_rel_diff": float((g_o - g_p).norm() / g_p.norm().clamp(min=1e-30)), "tol": tol,
                 "peft_prompt_dtype": str(peft_param.dtype)}
    agreement["ok"] = agreement["loss_rel_diff"] <= tol and agreement["grad_rel_diff"] <= max(tol, 1e-3)
    print(f"agreement on batch 0: {agreement}", flush=True)

    # ---- interleaved training -----------------------------------------------------------------------------
    t_start = time.monotonic()
    target = 0.0
    while any(s.clock < budgets[-1] * 60 for s in sides.values()):
        target += args.chunk_seconds
        for s in sides.values():
            s.run_until(min(target, budgets[-1] * 60), budgets)
        print(f"  {target / 60:.1f} min: " + ", ".join(f"{n} {s.steps} steps loss {s.losses[-1]:.3f}"
                                                    for n, s in sides.items()), flush=True)
    train_wall = time.monotonic() - t_start

    # ---- score every kept table with the same decoder --------------------------------------------------------
    import json

    gt = Path(args.data_dir) / "prompt_data" / "v1.1" / "squad_test_ground_truth.jsonl"
    with open(gt, encoding="utf-8") as fh:
        dev = [json.loads(line) for line in fh if line.strip()][args.eval_offset:args.eval_offset + args.eval]
    rows: dict[str, list[dict[str, Any]]] = {}
    for name, side in sides.items():
        rows[name] = []
        for b in budgets:
            kept_table, steps = side.kept[b]
            t0 = time.monotonic()
            s = score(setup, kept_table, dev, args)
            rows[name].append({"minutes": b, "steps": steps, **s, "scoring_seconds": round(time.monotonic() - t0, 1)})
            print(f"  {name} {b:g} min ({steps} steps): F1 {s['f1']:.1f} {s['f1_ci95']} EM {s['exact_match']:.1f}", flush=True)
    untrained = score(setup, table, dev, args)

    ours_ref = next(r["f1"] for r in rows["ours"] if r["minutes"] == args.reference_minutes)
    peft_minutes = minutes_to_reach([(r["minutes"], r["f1"]) for r in rows["peft"]], ours_ref)
    refused = None if agreement["ok"] else (
        f"PEFT's loss/gradient on the same batch differ from ours (loss {agreement['loss_rel_diff']:.1e}, grad "
        f"{agreement['grad_rel_diff']:.1e}; tol {tol:.1e}): the sides train different things, so no ratio is reported")
    result = {"bench": "quality_vs_peft", "model": setup.model_path, "precision": chosen,
              "precision_why": P.explain(args.precision, chosen, "cpu"), "budgets_minutes": budgets,
              "eval": {"file": str(gt), "offset": args.eval_offset, "questions": len(dev)},
              "batches": len(batches), "batch_size": args.batch_size, "warmup_steps": warmup, "lr": setup.lr,
              "agreement": agreement, "rows": rows, "untrained": untrained, "train_wall_seconds": round(train_wall, 1),
              "reference": {"ours_minutes": args.reference_minutes, "ours_f1": ours_ref,
                            "peft_minutes_to_reach": None if refused else peft_minutes,
                            "ratio": None if refused or peft_minutes is None else peft_minutes / args.reference_minutes},
              "ratio_refused": refused}
    print(M.table(["side", "minutes", "steps", "F1", "F1 95% CI", "EM"],
                  [[n, r["minutes"], r["steps"], r["f1"], f"{r['f1_ci95'][0]:.1f}-{r['f1_ci95'][1]:.1f}", r["exact_match"]]
                   for n, pts in rows.items() for r in pts]))
    print(f"untrained prompt: F1 {untrained['f1']:.1f}")
    if refused:
        print(*M.refusal_line(refused), sep="\n")
    elif peft_minutes is None:
        print(f"PEFT did not reach our {args.reference_minutes:g}-minute F1 ({ours_ref:.1f}) within {budgets[-1]:g} minutes")
    else:
        print(f"minutes for PEFT to reach our {args.reference_minutes:g}-minute F1 ({ours_ref:.1f}): {peft_minutes:.1f} "
              f"({peft_minutes / args.reference_minutes:.2f}x)")
    out = M.write_result(args.out, result)
    png = Path(out).with_suffix(".png")
    plot(png, rows, f"{setup.model_path}, {chosen}, {len(dev)} dev questions")
    print(f"written: {out}, {png}")
    return 0 if agreement["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
