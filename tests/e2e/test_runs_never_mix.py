"""Issue 19, "Runs never mix", through ``python3 main.py`` on the tiny random Llama (CPU, one thread, bit-deterministic):
a two-value ``-m`` sweep gives two folders and a summary; a second launch into a running launch's folder is refused
with one line and leaves the first's result equal to a solo run's; SIGTERM to main.py during training checkpoints,
releases the lock, leaves no process and says so in one line, and the rerun ends with the uninterrupted prompt."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytorch_lightning")

from tests.support.launcher import ROOT, run_main  # noqa: E402
from tests.support.paths import SUPPORT  # noqa: E402
from tests.support.records import squad_records, write_jsonl  # noqa: E402
from tests.support.training import tables  # noqa: E402

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
STEPS = 8


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("never_mix")
    train = write_jsonl(root / "train.jsonl", squad_records(24))
    val = write_jsonl(root / "val.jsonl", squad_records(8, seed=5))
    # a job "python" that runs the stage slowed to ~0.7 s per optimizer step, so a test can catch it training
    slow = root / "python"
    slow.write_text(f"#!/bin/sh\nexec {sys.executable} {SUPPORT / 'fault_runner.py'} --step-sleep 0.7 \"$@\"\n")
    slow.chmod(0o755)
    return {"root": root, "model": tiny, "train": train, "val": val, "slow": str(slow)}


def args(inputs, results: Path, *extra: str) -> list[str]:
    return ["stages=[prompt_learning]", f"base_results_dir={results}", f"data_dir={inputs['root']}/data",
            f"prompt_learning.model.language_model_path={inputs['model']}",
            f"prompt_learning.model.data.train_ds=[{inputs['train']}]",
            f"prompt_learning.model.data.validation_ds=[{inputs['val']}]",
            "prompt_learning.model.global_batch_size=4", "prompt_learning.model.micro_batch_size=4",
            "prompt_learning.model.task_templates.0.total_virtual_tokens=4",
            "prompt_learning.model.task_templates.0.virtual_token_splits=[4]",
            "prompt_learning.model.data.max_seq_length=128", "prompt_learning.model.data.max_train_examples=null",
            "prompt_learning.model.data.max_val_examples=null", "prompt_learning.model.data.share_prefix=false",
            "prompt_learning.model.data.length_bucketing=false",
            "prompt_learning.exp_manager.checkpoint_callback_params.every_n_train_steps=1",
            f"prompt_learning.trainer.max_steps={STEPS}", "prompt_learning.trainer.val_check_interval=4",
            "prompt_learning.trainer.enable_progress_bar=false", "prompt_learning.exp_manager.create_tensorboard_logger=false",
            *extra]


def artifact(stage_dir: Path) -> Path:
    (path,) = [p for p in stage_dir.rglob("prompt_artifact") if "previous" not in p.parts]
    return path


def table(stage_dir: Path) -> "torch.Tensor":
    return tables(str(artifact(stage_dir)))["prompt_table.squad"]


@pytest.fixture(scope="module")
def solo(inputs):
    """The uninterrupted, unshared reference launch."""
    results = inputs["root"] / "solo"
    proc = run_main(args(inputs, results), env=ENV)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return next(results.rglob("prompt_learning_squad"))


def start(inputs, results: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args(inputs, results, f"python={inputs['slow']}", *extra)],
                            cwd=ROOT, env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(log: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.is_file() and f"fault_runner: optimizer step {step} done" in log.read_text():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError(f"no step {step} in {log} after {timeout} s")


def processes_mentioning(text: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,stat,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if text in line and "ps -eo" not in line]


def test_two_value_sweep_gives_two_folders_two_artifacts_and_a_summary(inputs, tmp_path):
    results = tmp_path / "results"
    proc = run_main(["-m", *args(inputs, results, "prompt_learning.model.optim.lr=0.01,0.05")], cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]          # nothing in the current folder
    sweep = results / "sweeps" / "lr=0.01~0.05"
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["lr=0.01", "lr=0.05"]
    lrs = {}
    for folder in ("lr=0.01", "lr=0.05"):
        record = json.loads((sweep / folder / "sweep.json").read_text())
        assert record["job"]["values"] == {"prompt_learning.model.optim.lr": folder[3:]}
        assert record["sweep"]["dir"] == str(sweep) and record["exit_code"] == 0
        stage = sweep / folder / "smollm2_135m" / "prompt_learning_squad"
        lrs[folder] = json.loads((artifact(stage) / "artifact.json").read_text())["training"]["lr"]
    assert lrs == {"lr=0.01": 0.01, "lr=0.05": 0.05}
    a = table(sweep / "lr=0.01" / "smollm2_135m" / "prompt_learning_squad")
    b = table(sweep / "lr=0.05" / "smollm2_135m" / "prompt_learning_squad")
    assert not torch.equal(a, b)
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert [(r["values"]["prompt_learning.model.optim.lr"], r["lr"], r["state"]) for r in summary["jobs"]] == [
        ("0.01", 0.01, "completed"), ("0.05", 0.05, "completed")]
    assert all(isinstance(r["final_val_loss"], float) for r in summary["jobs"])
    assert (sweep / "sweep_summary.png").stat().st_size > 1000
    md = (sweep / "sweep_summary.md").read_text()
    assert "| 0 | 0.01 | completed |" in md and "| 1 | 0.05 | completed |" in md
    assert f"sweep summary: {sweep / 'sweep_summary.md'}" in proc.stdout


def test_second_launch_into_a_running_folder_is_refused_and_the_first_equals_a_solo_run(inputs, solo, tmp_path):
    results = tmp_path / "results"
    first = start(inputs, results)
    stage = results / "smollm2_135m" / "prompt_learning_squad"
    wait_for_step(stage / "log-squad_smollm2_135m.out", 2, first)
    second = run_main(args(inputs, results, f"python={inputs['slow']}"), env=ENV)
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert lines[0].startswith(f"error: {stage} is in use by another launch (pid {first.pid} on ")
    assert f"kill {first.pid}, or launch into another folder" in lines[0]
    assert "python3 main.py 'stages=[prompt_learning]'" in lines[0]
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, (out + err)[-3000:]
    assert not (stage / "launch.lock").exists()
    assert torch.equal(table(stage), table(solo))


def test_sigterm_to_main_checkpoints_releases_and_the_rerun_ends_with_the_uninterrupted_prompt(inputs, solo, tmp_path):
    results = tmp_path / "results"
    proc = start(inputs, results)
    stage = results / "smollm2_135m" / "prompt_learning_squad"
    wait_for_step(stage / "log-squad_smollm2_135m.out", 3, proc)
    assert (stage / "launch.lock").is_file()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, (out + err)[-3000:]
    assert "received SIGTERM; checkpointing at the next step boundary" in out   # the stage got it (its output is streamed)
    ckpt = stage / "results" / "checkpoints" / "last.ckpt"
    assert err.strip().splitlines()[-1] == (f"stopped by SIGTERM: prompt_learning saved its checkpoint {ckpt}; "
                                            f"rerun the same command to resume")
    assert processes_mentioning(str(results)) == []                             # no stage process left
    assert not (stage / "launch.lock").exists()
    step = int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])
    assert 3 <= step < STEPS and not list(stage.rglob("prompt_artifact"))

    again = run_main(args(inputs, results, f"python={inputs['slow']}"), env=ENV)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert f"(step {step})" in again.stdout
    assert torch.equal(table(stage), table(solo))
