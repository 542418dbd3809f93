"""bench/gpu_check.sh on a machine without a GPU: it refuses cleanly (exit 2, one line, nothing written), its CPU dry
run exercises every command line and writes the one JSON, and the refusal is decided by bench/gpu_env.py alone
(unit-tested with a faked ``torch.cuda``)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.support.paths import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import gpu_env as G  # noqa: E402

SCRIPT = ROOT / "bench" / "gpu_check.sh"
STEPS = ["tiny_model", "versions", "equality_tests", "pipeline", "train_bench", "eval_bench"]


def fake_torch(cuda: str | None, devices: int) -> SimpleNamespace:
    """A torch module as gpu_env sees it: its build's CUDA version and the devices it finds."""
    return SimpleNamespace(__version__="9.9.9+fake", version=SimpleNamespace(cuda=cuda),
                           cuda=SimpleNamespace(is_available=lambda: devices > 0, device_count=lambda: devices))


def run_script(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("cuda,devices,why", [
    (None, 0, "torch 9.9.9+fake is a CPU-only build"),
    ("12.4", 0, "torch 9.9.9+fake (CUDA 12.4) sees no device"),
])
def test_refusal_without_a_device(cuda, devices, why, capsys: pytest.CaptureFixture[str]) -> None:
    torch = fake_torch(cuda, devices)
    assert G.why_no_cuda(torch).startswith(why)
    with pytest.raises(SystemExit) as exc:
        G.main(["check"], torch_module=torch)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"gpu_check: no CUDA device: {why}")
    assert err.rstrip().endswith("run this on the GPU machine, or --dry-run to check the script on CPU")


def test_ranks_follow_the_gpus(capsys: pytest.CaptureFixture[str]) -> None:
    """One rank per GPU (NCCL); the dry run uses one process whatever the machine has."""
    assert G.why_no_cuda(fake_torch("12.4", 4)) is None
    assert G.main(["check"], torch_module=fake_torch("12.4", 4)) == 0
    assert G.main(["check", "--dry-run"], torch_module=fake_torch(None, 0)) == 0
    assert capsys.readouterr().out.split() == ["4", "1"]


def test_bench_device_cuda_refuses_with_the_same_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    import common as C

    monkeypatch.setattr(G, "why_no_cuda", lambda torch: "torch 9.9.9+fake is a CPU-only build")
    with pytest.raises(SystemExit, match=r"^--device cuda: torch 9.9.9\+fake is a CPU-only build$"):
        C.check_device("cuda")
    C.check_device("cpu")


def test_script_refuses_on_this_machine(tmp_path: Path) -> None:
    import torch

    if G.why_no_cuda(torch) is None:
        pytest.skip("this machine has a CUDA device: the refusal cannot happen here")
    out, work = tmp_path / "gpu_check.json", tmp_path / "work"
    p = run_script("--out", str(out), "--work", str(work), timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.splitlines() == [G.REFUSAL.format(why=G.why_no_cuda(torch))]
    assert p.stdout == "" and not out.exists() and not work.exists()


@pytest.mark.slow
def test_dry_run_runs_every_step_on_cpu(tmp_path: Path) -> None:
    out, work = tmp_path / "gpu_check.json", tmp_path / "work"
    p = run_script("--dry-run", "--out", str(out), "--work", str(work))
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert doc["mode"] == "cpu-dry-run" and "nothing in this file is a GPU measurement" in doc["note"] and doc["ok"]
    assert [s["name"] for s in doc["steps"]] == STEPS
    for s in doc["steps"]:
        assert s["exit_code"] == 0 and 0 < s["seconds"] <= s["timeout_seconds"] and s["command"], s
    versions = doc["versions"]
    assert versions["torch"] and versions["python"] and versions["transformers"] and versions["peft"] and versions["lightning"]
    assert "flash_attn" in versions and versions["git_commit"]
    results = {s["name"]: s["results"] for s in doc["steps"]}
    tests = results["equality_tests"]
    # the 1-process layout ran (gloo on CPU here, NCCL on a GPU); the multi-process ones skipped, saying why
    assert tests["counts"]["passed"] == 2 and tests["counts"]["failed"] == tests["counts"]["errors"] == 0
    assert all("one_rank" in name for name in tests["passed"])
    assert tests["skipped"] and all("PROMPTLAUNCH_TEST_MAX_RANKS=1" in why for why in tests["skipped"].values())
    assert results["train_bench"]["agreement_ok"] and results["train_bench"]["device"] == "cpu"
    assert results["eval_bench"]["identical"] and results["eval_bench"]["precision"] == "32"
    assert results["pipeline"]["total"] == 5 and results["pipeline"]["f1"] is not None
    assert "/llama_tiny_random/evaluation_squad/" in results["pipeline"]["metrics_json"]
    assert doc["machine"]["device"] == "cpu" and doc["machine"]["cpu_count"] >= 1
    assert "--device cpu" in next(s["command"] for s in doc["steps"] if s["name"] == "train_bench")
    assert "prompt_learning.trainer.accelerator=cpu" in next(s["command"] for s in doc["steps"] if s["name"] == "pipeline")
