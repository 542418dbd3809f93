#!/usr/bin/env python3
"""What ``trainer.reuse_host_memory`` (stages/engine/host_memory.py) does to the training step: glibc malloc as it comes
against malloc keeping freed memory for the next step, on the same model, questions and batches as
``train_vs_peft.py`` (its ours-plain and ours-shared steps).

The setting is process-wide and cannot be undone cleanly, so each side runs in its own child process; the
children alternate (default, reuse, reuse, default, ...) so both see the same drift of this VM's speed. A child
loads the model, makes one untimed pass over every batch, then times one pass per step kind and reports the
seconds, the minor page faults of the timed passes, its peak RSS and the fp32 matmul peak measured right after.
The parent prints the medians, the paired ratio (median over rounds of default / reuse) and writes the JSON.

Usage:  python3 bench/host_memory.py [--repeats 3 --batches 2 --batch-size 8]
Writes bench/results/host_memory.json (override with --out).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common as C
import measure as M  # noqa: E402

SETTINGS = ("default", "reuse")
KINDS = ("ours-plain", "ours-shared")
MARK = "HOST_MEMORY_RESULT "


def child(args: Any) -> dict[str, Any]:
    """One side: warm-up pass, then one timed pass per step kind (seconds, minor faults), peak RSS, matmul peak."""
    import resource

    import torch

    import train_vs_peft as T
    from stages.engine.collate import collate_shared

    torch.manual_seed(args.seed)
    setup = C.setup_from_args(args)
    examples = T.build_examples(setup, T.train_batches(setup, args), args.max_seq_length)
    table = C.prompt_table(setup, init=args.init, seed=args.seed, artifact=args.artifact)
    ids, pad = {setup.template.taskname: 0}, setup.info.pad_id
    sides = {"ours-plain": T.ours_side(setup, "ours-plain", [setup.family.collate(e, ids, pad) for e in examples], table),
             "ours-shared": T.ours_side(setup, "ours-shared", [collate_shared(e, ids, pad) for e in examples], table)}
    for side in sides.values():
        side.train_pass()
    out: dict[str, Any] = {"setting": args.host_memory, "passes": {}}
    for name, side in sides.items():
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        side.train_pass()
        out["passes"][name] = {"seconds": time.perf_counter() - t0,
                               "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["matmul_peak_gflops"] = M.matmul_peak([(2048, 2048, 2048)], repeats=3)["peak_gflops"]
    return out


def run_child(argv: list[str], setting: str) -> dict[str, Any]:
    """This script as a child process with --host-memory ``setting`` (the last flag wins over one in ``argv``)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", "--host-memory", setting]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"child ({setting}) failed with exit code {proc.returncode}:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][len(MARK):])


def summarize(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Medians per setting and step kind, and the paired speed-up of reuse over default."""
    rows: dict[str, Any] = {}
    for kind in KINDS:
        sec = {s: [r[s]["passes"][kind]["seconds"] for r in rounds] for s in SETTINGS}
        rows[kind] = {
            **{f"{s}_median_s": M.median(sec[s]) for s in SETTINGS},
            **{f"{s}_minor_faults": M.median([r[s]["passes"][kind]["minor_faults"] for r in rounds]) for s in SETTINGS},
            "speedup_paired": M.paired_speedup(sec["default"], sec["reuse"]),
            "seconds": sec,
        }
    rss = {s: max(r[s]["peak_rss_mb"] for r in rounds) for s in SETTINGS}
    return {"rows": rows, "peak_rss_mb": rss, "matmul_peak_gflops": {s: [r[s]["matmul_peak_gflops"] for r in rounds] for s in SETTINGS}}


def report(result: dict[str, Any]) -> str:
    rows = result["rows"]
    lines = [M.table(
        ["step", "default s", "reuse s", "x paired", "faults default", "faults reuse"],
        [[k, r["default_median_s"], r["reuse_median_s"], r["speedup_paired"], r["default_minor_faults"], r["reuse_minor_faults"]]
         for k, r in rows.items()])]
    lines.append("peak RSS MB: " + ", ".join(f"{s} {v:.0f}" for s, v in result["peak_rss_mb"].items())
                 + f"; {result['repeats']} rounds, one child process per side and round, order alternated; "
                 "x paired = median over rounds of default / reuse seconds")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = C.arg_parser(__doc__.splitlines()[0], name="host_memory", batches=2)
    ap.add_argument("--max-seq-length", type=int, default=384, help="paragraphs with a longer question are skipped")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(MARK + json.dumps(child(args)), flush=True)
        return 0
    rounds: list[dict[str, dict[str, Any]]] = []
    for r in range(args.repeats):
        got = {s: run_child(argv, s) for s in (SETTINGS if r % 2 == 0 else SETTINGS[::-1])}
        rounds.append(got)
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(
            f"{s} {got[s]['passes']['ours-plain']['seconds']:.1f}s / {got[s]['passes']['ours-shared']['seconds']:.1f}s" for s in SETTINGS),
            flush=True)
    result = {"repeats": args.repeats, "batches": args.batches, "batch_size": args.batch_size,
              "model": args.model, **summarize(rounds), "rounds": rounds}
    print(report(result))
    M.write_result(args.out, {"bench": "host_memory", **result})
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
