"""Fault tolerance of prompt learning: SIGKILL anywhere + rerun == uninterrupted run (bit for bit), corrupt
checkpoints, the preemption signal, atomic outputs. Stage processes are real subprocesses of
``stages/prompt_learning/run.py``, started through ``tests/support/fault_runner.py``, which kills them at exact points.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytorch_lightning")

from omegaconf import OmegaConf  # noqa: E402

from tests.support.paths import ROOT, SUPPORT  # noqa: E402
from tests.support.training import make_cfg, tables, train_single_thread  # noqa: E402

ENTRY = ROOT / "stages" / "prompt_learning" / "run.py"
RUNNER = SUPPORT / "fault_runner.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "TOKENIZERS_PARALLELISM": "false"}
for _k in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "PROMPTLAUNCH_REQUEUE_FILE"):
    ENV.pop(_k, None)


def fault_cfg(tmp: Path, tiny: str, name: str, max_steps: int = 6):
    """P-tuning with dropout (the RNG matters), a checkpoint every step, validation every 2 steps, and an epoch of
    6 batches, so a run crosses resume points before, at and after validations."""
    c = make_cfg(tmp / name, tiny, max_steps=max_steps, style="p-tuning")
    OmegaConf.update(c, "model.p_tuning.dropout", 0.1, merge=False)
    OmegaConf.update(c, "exp_manager.checkpoint_callback_params.every_n_train_steps", 1, merge=False)
    path = tmp / name / "config.yaml"
    OmegaConf.save(c, path)
    return c, path


def run_stage(config: Path, *faults: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The stage entry file in a fresh process (one CPU thread), with ``fault_runner`` options."""
    return subprocess.run([sys.executable, str(RUNNER), *faults, str(ENTRY), "--config", str(config)],
                          capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)


def ckpt_dir(cfg) -> Path:
    return Path(cfg.exp_manager.explicit_log_dir) / "checkpoints"


def history(cfg) -> dict:
    return json.loads((Path(cfg.exp_manager.explicit_log_dir) / "loss_history.json").read_text())


def step_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny):
    """The uninterrupted run every interrupted one must reproduce."""
    ref, _ = fault_cfg(tmp_path_factory.mktemp("reference"), tiny, "run")
    train_single_thread(ref)
    return ref


def test_sigkill_at_many_points_then_rerun_gives_the_uninterrupted_prompt(tmp_path, tiny, reference):
    ref = reference

    cfg, path = fault_cfg(tmp_path, tiny, "killed")
    ck = ckpt_dir(cfg)
    art = Path(cfg.model.artifact_path)

    # 1) mid-step: step 3 has just updated the prompt; Lightning has not counted it, nothing has saved it
    out = run_stage(path, "--kill-after-step", "3")
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    assert step_of(ck / "last.ckpt") == 2 and step_of(ck / "last.prev.ckpt") == 1

    # 2) a damaged last.ckpt (a disk fault, a truncating copy): fall back to last.prev.ckpt and say so;
    #    then die halfway through writing the second checkpoint of the run
    data = (ck / "last.ckpt").read_bytes()
    (ck / "last.ckpt").write_bytes(data[: len(data) // 3])
    out = run_stage(path, "--kill-mid-save", "2")
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    assert f"{ck / 'last.ckpt'} is unusable" in out.stdout
    assert f"resuming from the previous good checkpoint {ck / 'last.prev.ckpt'} (step 1)" in out.stdout
    assert step_of(ck / "last.ckpt") == 2          # the interrupted step-3 save never touched it
    assert list(ck.glob(".last.ckpt.*.tmp")), "the partial checkpoint should sit under a temporary name"

    # 3) while last.ckpt is being copied to last.prev.ckpt
    out = run_stage(path, "--kill-in-keep-previous", "1")
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    assert "removed" in out.stdout and ".last.ckpt." in out.stdout   # the leftover of 2) was swept
    assert step_of(ck / "last.ckpt") == 2

    # 4) train to the end, then die while the artifact folder is written
    out = run_stage(path, "--kill-in-artifact")
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    assert "resuming from" in out.stdout and "(step 2)" in out.stdout
    assert not art.exists(), "a killed artifact write must leave no artifact folder"
    assert step_of(ck / "last.ckpt") == 6

    # 5) the same command once more: nothing left to train, the artifact is written
    out = run_stage(path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(step 6)" in out.stdout
    a = tables(ref.model.artifact_path)["prompt_table.squad"]
    b = tables(cfg.model.artifact_path)["prompt_table.squad"]
    assert torch.equal(a, b), f"resumed prompt differs from the uninterrupted one by {(a - b).abs().max().item()}"
    assert history(cfg) == history(ref)
    assert not list(ck.glob(".*.tmp")) and not list(art.parent.glob(".*.tmp"))
    # the checkpoint holds the data position and the RNG states the resumes used
    last = torch.load(ck / "last.ckpt", map_location="cpu", weights_only=True)
    state = last["callbacks"]["promptlaunch.ResumeState"]
    assert state["position"]["global_step"] == 6 and state["identity"]["prompt_learning.train_examples (derived)"] == 24
    assert set(state["rng"][0]) >= {"torch", "python", "numpy"}
    assert last["promptlaunch"]["epoch_batches"] == state["position"]["batches_in_epoch"] == 6  # a whole epoch


def test_preemption_signal_checkpoints_after_the_due_validation_then_resumes(tmp_path, tiny, reference):
    """SIGUSR1 during step 4 (a validation step): validation first, then last.ckpt, the requeue marker, exit 3."""
    cfg, path = fault_cfg(tmp_path, tiny, "preempted")
    marker = tmp_path / "requeue-me"
    env = {**ENV, "PROMPTLAUNCH_REQUEUE_FILE": str(marker)}
    out = subprocess.run([sys.executable, str(RUNNER), "--usr1-after-step", "4", str(ENTRY), "--config", str(path)],
                         capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert out.returncode == 3, out.stderr[-3000:]
    assert "received SIGUSR1; checkpointing at the next step boundary" in out.stderr
    assert f"SIGUSR1: checkpoint saved at step 4 to {ckpt_dir(cfg) / 'last.ckpt'}; the job script requeues" in out.stdout
    assert marker.read_text() == "4\n"
    assert not Path(cfg.model.artifact_path).exists()
    saved = torch.load(ckpt_dir(cfg) / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 4 and saved["promptlaunch"]["history"]["val"][-1][0] == 4  # after the validation

    out = run_stage(path)   # what the requeued job runs
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(step 4)" in out.stdout
    assert torch.equal(tables(reference.model.artifact_path)["prompt_table.squad"],
                       tables(cfg.model.artifact_path)["prompt_table.squad"])
    assert history(cfg) == history(reference)


@pytest.mark.parametrize("name", ["TERM", "INT"])
def test_sigterm_and_sigint_checkpoint_and_stop_without_a_requeue(tmp_path, tiny, reference, name):
    """A closed terminal, Ctrl-C or the launcher passing a stop on: checkpoint at the step boundary, exit 3, no
    requeue marker even inside a Slurm job script; the rerun reaches the uninterrupted prompt."""
    cfg, path = fault_cfg(tmp_path, tiny, f"sig{name}")
    marker = tmp_path / "requeue-me"
    env = {**ENV, "PROMPTLAUNCH_REQUEUE_FILE": str(marker)}
    out = subprocess.run([sys.executable, str(RUNNER), "--signal-after-step", f"{name}:3", str(ENTRY), "--config",
                          str(path)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert out.returncode == 3, out.stderr[-3000:]
    assert f"received SIG{name}; checkpointing at the next step boundary" in out.stderr
    assert f"SIG{name}: checkpoint saved at step 3 to {ckpt_dir(cfg) / 'last.ckpt'}; rerun the same command to resume" \
        in out.stdout
    assert not marker.exists() and not Path(cfg.model.artifact_path).exists()
    out = run_stage(path)
    assert out.returncode == 0 and "(step 3)" in out.stdout, out.stderr[-3000:]
    assert torch.equal(tables(reference.model.artifact_path)["prompt_table.squad"],
                       tables(cfg.model.artifact_path)["prompt_table.squad"])
