"""Preemption on a real Slurm: main.py submits a prompt_learning stage (tiny model, tiny data); while it trains,
``scancel --signal=USR1`` (what ``#SBATCH --signal=USR1@<secs>`` sends before the time limit) makes it save a
checkpoint and requeue itself; the requeued job resumes and ends with the prompt of an uninterrupted run.

Needs the Slurm of ``.ci/slurm/start.sh`` (skipped otherwise, see the ``slurm_cluster`` fixture).
"""
from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")

from omegaconf import OmegaConf  # noqa: E402

from tests.support.launcher import run_main  # noqa: E402
from tests.support.paths import SUPPORT  # noqa: E402
from tests.support.records import squad_records, write_jsonl  # noqa: E402
from tests.support.tiny_models import make_model_dir  # noqa: E402
from tests.support.training import tables, train_single_thread  # noqa: E402

pytestmark = pytest.mark.slurm


def _scontrol_job(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _wait_for(what: str, check, timeout: float, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_usr1_checkpoints_requeues_and_the_requeued_job_resumes_to_the_same_prompt(slurm_cluster, tmp_path):
    model = make_model_dir(tmp_path / "tiny_llama")
    train = write_jsonl(tmp_path / "train.jsonl", squad_records(48))
    val = write_jsonl(tmp_path / "val.jsonl", squad_records(8, seed=5))
    # the job's "python": the stage under fault_runner, slowed to ~1 s per step so the signal lands mid-training
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nexec nice -n 19 {sys.executable} {SUPPORT / 'fault_runner.py'} --step-sleep 1 \"$@\"\n")
    python.chmod(0o755)
    results = tmp_path / "results"
    proc = run_main([
        "stages=[prompt_learning]", "cluster_type=slurm", f"base_results_dir={results}", f"data_dir={tmp_path}/data",
        f"python={python}", "cluster.exclusive=false", "cluster.mem=null", f"cluster.job_name_prefix=pl-{tmp_path.name}-",
        "cluster.signal=USR1@60", "env_vars.OMP_NUM_THREADS=1", "env_vars.HF_HUB_OFFLINE=1",
        f"prompt_learning.model.language_model_path={model}", f"prompt_learning.model.data.train_ds=[{train}]",
        f"prompt_learning.model.data.validation_ds=[{val}]", "prompt_learning.model.p_tuning.dropout=0.1",
        "prompt_learning.model.virtual_prompt_style=p-tuning", "prompt_learning.model.p_tuning.encoder_hidden=16",
        "prompt_learning.trainer.max_steps=10", "prompt_learning.trainer.val_check_interval=4",
        "prompt_learning.trainer.enable_progress_bar=false",
    ])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stage_dir = next(results.rglob("job_id")).parent
    job_id = slurm_cluster.job_id(stage_dir)
    script = next(stage_dir.glob("*_slurm.sh")).read_text()
    assert "#SBATCH --signal=USR1@60" in script and "#SBATCH --requeue" in script and "#SBATCH --open-mode=append" in script
    log = lambda: next(iter(stage_dir.glob(f"log-*_{job_id}.out")), None)  # noqa: E731

    # training is under way: send what Slurm sends before the time limit
    _wait_for("step 3 of the first run", lambda: log() and "optimizer step 3 done" in log().read_text(), 240)
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True, timeout=30)

    # the job saved a checkpoint and requeued itself. Slurm holds a requeued job for AuthInfo cred_expire
    # seconds (10 s on the CI cluster, 120 s by default); forcing an earlier start (scontrol update
    # StartTime=now) makes slurmd refuse it ("Job credential revoked") and the job FAILS, so just wait.
    _wait_for("the requeued job to pend", lambda: (j := _scontrol_job(job_id)).get("Restarts") == "1"
              and j.get("JobState") in ("PENDING", "RUNNING", "COMPLETED"), 120)
    states = slurm_cluster.wait([job_id], timeout=420)
    text = log().read_text()
    assert states[job_id].state == "COMPLETED", text[-3000:]
    assert _scontrol_job(job_id)["Restarts"] == "1"

    # one log (appended): the first run, its checkpoint and requeue, the resumed run
    assert "promptlaunch: job %s starts (restart 0)" % job_id in text
    assert "received SIGUSR1; checkpointing at the next step boundary" in log().with_suffix(".err").read_text()
    saved = re.search(r"SIGUSR1: checkpoint saved at step (\d+) to .*; the job script requeues the job", text)
    assert saved, text[-3000:]
    assert f"promptlaunch: requeueing job {job_id}; it resumes from its checkpoint" in text
    assert "promptlaunch: job %s starts (restart 1)" % job_id in text
    step = int(saved.group(1))
    assert 3 <= step < 10
    assert re.search(rf"resuming from \S+/checkpoints/last\.ckpt \(step {step}\); Slurm restart 1", text), text[-3000:]
    assert not list(stage_dir.glob(".requeue-*"))

    # the same stage config, uninterrupted, here: the same prompt, bit for bit
    cfg = OmegaConf.load(next(stage_dir.glob("*_hydra-*.yaml")))
    ref_dir = tmp_path / "reference"
    OmegaConf.update(cfg, "run.results_dir", str(ref_dir), merge=False)
    OmegaConf.update(cfg, "exp_manager.explicit_log_dir", str(ref_dir / "results"), merge=False)
    OmegaConf.update(cfg, "model.artifact_path", str(ref_dir / "artifact"), merge=False)
    train_single_thread(cfg)
    a = tables(cfg.model.artifact_path)["prompt_table.squad"]
    b = tables(OmegaConf.load(next(stage_dir.glob("*_hydra-*.yaml"))).model.artifact_path)["prompt_table.squad"]
    assert torch.equal(a, b), f"requeued run differs from the uninterrupted one by {(a - b).abs().max().item()}"
