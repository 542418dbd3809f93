#!/usr/bin/env python3
"""Launcher overhead: wall time of a 3-stage dry run against baselines measured in the same run.

Baselines: a bare interpreter start and `import hydra, omegaconf` (the floor any Hydra app pays).
Usage:  python3 bench/launcher_overhead.py [--repeats 5] [--out bench/results/launcher_overhead.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launcher.io import write_json  # noqa: E402


def _time(cmd: list[str], repeats: int) -> float:
    """Median wall seconds of ``cmd`` over ``repeats`` runs (after one warm-up)."""
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "launcher_overhead.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = {
            "python -c pass": _time([sys.executable, "-c", "pass"], args.repeats),
            "import hydra, omegaconf": _time([sys.executable, "-c", "import hydra, omegaconf"], args.repeats),
            "main.py dry_run (3 stages)": _time(
                [sys.executable, "main.py", "dry_run=true", f"base_results_dir={tmp}/r", f"data_dir={tmp}/d",
                 "stages=[data_preparation,prompt_learning,evaluation]"], args.repeats),
        }
    floor = rows["import hydra, omegaconf"]
    print(f"{'command':32s} {'median s':>9s} {'x hydra import':>15s}")
    for name, sec in rows.items():
        print(f"{name:32s} {sec:9.3f} {sec / floor:15.2f}")
    write_json(args.out, {"median_seconds": rows, "ratio_to_hydra_import": {k: v / floor for k, v in rows.items()},
                          "repeats": args.repeats})
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
