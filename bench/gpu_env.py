#!/usr/bin/env python3
"""The Python side of ``bench/gpu_check.sh``: whether this machine can run the GPU check, what it runs with, and the
one JSON document it writes.

Why a helper: the refusal (no CUDA: a CPU-only torch build, or no visible device) is decided here and only here, so
the script, the benches' ``--device cuda`` and the tests say the same thing; and the results of the script's steps
(pytest's JUnit XML, the benches' JSON, the pipeline's metrics.json) are read by Python, not by shell text munging.

    python3 bench/gpu_env.py check [--dry-run]        ranks for the equality tests (the GPU count; 1 in the dry run),
                                                      or exit 2 with one line on stderr
    python3 bench/gpu_env.py versions --out FILE      print and write what the check runs with (installs nothing)
    python3 bench/gpu_env.py report --work DIR --mode MODE --out FILE --milliseconds MS
                                                      the one JSON of the run (atomically), from DIR/steps.tsv
"""
from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import common as C  # noqa: F401 - puts the repository root on sys.path
import measure as M

REFUSAL = "gpu_check: no CUDA device: {why}; run this on the GPU machine, or --dry-run to check the script on CPU"
DRY_RUN_NOTE = ("cpu-dry-run: every step ran on CPU (gloo, fp32, the tiny random Llama, the tiny SQuAD fixture) to "
                "check the script's command lines; nothing in this file is a GPU measurement")
GPU_NOTE = ("gpu: the tests on NCCL with one rank per GPU, the benches with --device cuda, the pipeline with "
            "trainer.accelerator=gpu; each step's command says exactly what ran")
LIBRARIES = {"transformers": "transformers", "peft": "peft", "lightning": "pytorch_lightning", "flash_attn": "flash_attn"}


def why_no_cuda(torch: Any) -> str | None:
    """Why this torch cannot run on a GPU here (None when it can): the one rule of the refusal."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no device (no driver, or CUDA_VISIBLE_DEVICES hides them)"
    return None


def ranks(torch: Any, dry_run: bool) -> int:
    """Processes the equality tests may start: one per GPU (NCCL runs one rank per GPU); 1 in the CPU dry run.
    Raises SystemExit(2) with the refusal line when there is no GPU and this is not a dry run."""
    if dry_run:
        return 1
    why = why_no_cuda(torch)
    if why:
        print(REFUSAL.format(why=why), file=sys.stderr)
        raise SystemExit(2)
    return int(torch.cuda.device_count())


def git_commit() -> str | None:
    """The repository's commit, with ``-dirty`` when the work tree differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=C.ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=C.ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def versions() -> dict[str, Any]:
    """What the check runs with: python, torch and its CUDA/NCCL, the GPUs, the libraries (None: not importable)."""
    import platform

    import torch

    found: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    found.update(M.cuda_info())
    for key, module in LIBRARIES.items():
        try:
            found[key] = getattr(importlib.import_module(module), "__version__", "?")
        except Exception:  # noqa: BLE001 - a library that does not import is reported as missing, whatever the reason
            found[key] = None
    found["git_commit"] = git_commit()
    return found


# ---- the results of each step -----------------------------------------------------------------------------
def junit_counts(path: Path) -> dict[str, Any]:
    """pytest's JUnit XML: passed / failed / errors / skipped, and each skip's reason (a skip is not a pass)."""
    root = ET.parse(path).getroot()
    cases = root.iter("testcase")
    out: dict[str, Any] = {"passed": [], "failed": [], "errors": [], "skipped": {}}
    for case in cases:
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None:
            out["failed"].append(name)
        elif case.find("error") is not None:
            out["errors"].append(name)
        elif case.find("skipped") is not None:
            out["skipped"][name] = case.find("skipped").get("message", "")
        else:
            out["passed"].append(name)
    out["counts"] = {k: len(v) for k, v in out.items()}
    return out


def bench_summary(path: Path) -> dict[str, Any]:
    """The key figures of a train/eval bench document: agreement, ratios against PEFT, throughput."""
    doc = json.loads(path.read_text())
    rate = "examples_per_s" if doc["bench"] == "train_vs_peft" else "questions_per_s"
    out: dict[str, Any] = {"json": str(path), "device": doc["machine"].get("device"), "ratio_refused": doc.get("ratio_refused"),
                           "rows": {n: {"speedup_vs_peft": r["speedup_vs_peft"], rate: r[rate]} for n, r in doc["rows"].items()}}
    if doc["bench"] == "train_vs_peft":
        out["agreement_ok"] = doc["agreement"]["ok"]
        out["bf16_sides"] = any(n.endswith("-bf16") for n in doc["rows"])
    else:
        out.update(identical=doc["identical"], precision=doc.get("precision"))
    return out


def pipeline_summary(results: Path) -> dict[str, Any]:
    """EM/F1 of the pipeline's evaluation (its metrics.json)."""
    found = sorted(results.rglob("evaluation_squad/metrics.json"))
    if not found:
        return {"metrics_json": None}
    m = json.loads(found[0].read_text())
    return {"metrics_json": str(found[0]), **{k: m.get(k) for k in ("exact_match", "f1", "f1_ci95", "total")}}


def step_results(name: str, work: Path) -> dict[str, Any]:
    """What each step left in the work folder (empty when it left nothing)."""
    try:
        if name == "versions":
            return json.loads((work / "versions.json").read_text())
        if name == "equality_tests":
            return junit_counts(work / "equality_tests.xml")
        if name in ("train_bench", "eval_bench"):
            return bench_summary(work / f"{name}.json")
        if name == "pipeline":
            return pipeline_summary(work / "results")
    except (OSError, ValueError, KeyError, ET.ParseError) as exc:
        return {"unreadable": f"{type(exc).__name__}: {exc}"}
    return {}


def report(work: Path, mode: str, out: Path, seconds: float) -> dict[str, Any]:
    """The one document of a run: every step (command, exit code, seconds, results), the versions and the machine."""
    from stages.common.io import write_json

    steps = []
    for line in (work / "steps.tsv").read_text().splitlines():
        name, code, ms, limit, command = line.split("\t", 4)
        steps.append({"name": name, "command": command, "exit_code": int(code), "seconds": int(ms) / 1000,
                      "timeout_seconds": int(limit), "timed_out": int(code) == 124, "log": str(work / f"{name}.log"),
                      "results": step_results(name, work)})
    importlib.import_module("torch")   # machine_info describes torch only once it is imported
    doc = {"check": "gpu_check", "mode": mode, "ok": all(s["exit_code"] == 0 for s in steps),
           "note": DRY_RUN_NOTE if mode == "cpu-dry-run" else GPU_NOTE,
           "total_seconds": seconds, "work_dir": str(work), "versions": step_results("versions", work), "steps": steps,
           "machine": M.machine_info("cpu" if mode == "cpu-dry-run" else "cuda")}
    write_json(out, doc)
    return doc


def main(argv: list[str] | None = None, torch_module: Any = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check").add_argument("--dry-run", action="store_true")
    sub.add_parser("versions").add_argument("--out", required=True)
    rp = sub.add_parser("report")
    rp.add_argument("--work", required=True)
    rp.add_argument("--mode", required=True, choices=["gpu", "cpu-dry-run"])
    rp.add_argument("--out", required=True)
    rp.add_argument("--milliseconds", type=int, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "check":
        if torch_module is None:
            import torch as torch_module
        print(ranks(torch_module, args.dry_run))
        return 0
    if args.cmd == "versions":
        found = versions()
        for k, v in found.items():
            print(f"  {k}: {v if v is not None else 'not installed'}")
        Path(args.out).write_text(json.dumps(found, indent=1))
        return 0
    doc = report(Path(args.work), args.mode, Path(args.out), args.milliseconds / 1000)
    for s in doc["steps"]:
        print(f"  {s['name']}: exit {s['exit_code']}{' (timed out)' if s['timed_out'] else ''}, {s['seconds']:.0f} s")
    print(f"written: {args.out} ({'all steps passed' if doc['ok'] else 'SOME STEPS FAILED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
