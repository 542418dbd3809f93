#!/usr/bin/env python3
"""Launcher overhead: wall time of a 3-stage dry run against baselines measured in the same run.

Baselines: a bare interpreter start and `import hydra, omegaconf` (the floor any Hydra app pays). The dry run
composes the config, validates it, plans the three stages and writes their scripts and resolved configs, but
runs nothing, so it is exactly the launcher's own cost.
Usage:  python3 bench/launcher_overhead.py [--repeats 5] [--out bench/results/launcher_overhead.json]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

import common as C  # torch-free: nothing heavy is imported while timing
import measure as M  # noqa: E402

FLOOR = "import hydra, omegaconf"
DRY_RUN = "main.py dry_run (3 stages)"


def _time(cmd: list[str], repeats: int) -> list[float]:
    """Wall seconds of ``cmd``, ``repeats`` runs after one untimed warm-up (file caches, .pyc files)."""
    subprocess.run(cmd, check=True, capture_output=True, cwd=C.ROOT)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, cwd=C.ROOT)
        times.append(time.perf_counter() - t0)
    return times


def measure(repeats: int) -> dict[str, object]:
    """Median seconds of each command and its ratio to the Hydra import floor (the result document)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmds = {
            "python -c pass": [sys.executable, "-c", "pass"],
            FLOOR: [sys.executable, "-c", "import hydra, omegaconf"],
            DRY_RUN: [sys.executable, "main.py", "dry_run=true", f"base_results_dir={tmp}/r", f"data_dir={tmp}/d",
                      "stages=[data_preparation,prompt_learning,evaluation]"],
        }
        runs = {name: _time(cmd, repeats) for name, cmd in cmds.items()}
    rows = {name: statistics.median(t) for name, t in runs.items()}
    return {"median_seconds": rows, "seconds": runs, "ratio_to_hydra_import": {k: v / rows[FLOOR] for k, v in rows.items()},
            "launcher_own_seconds": rows[DRY_RUN] - rows[FLOOR], "repeats": repeats}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(C.RESULTS_DIR / "launcher_overhead.json"))
    args = ap.parse_args(argv)
    result = measure(args.repeats)
    print(M.table(["command", "median s", "x hydra import"],
                  [[name, sec, result["ratio_to_hydra_import"][name]] for name, sec in result["median_seconds"].items()]))
    print(f"launcher's own cost above the Hydra import: {result['launcher_own_seconds']:.3f} s (median of {args.repeats})")
    M.write_result(args.out, {"bench": "launcher_overhead", **result})
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
