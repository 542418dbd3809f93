"""Faults of a two-node prompt_learning job on the cluster of .ci/slurm/start-multinode.sh, through main.py:

* preemption: ``scancel --signal=USR1`` (what ``#SBATCH --signal=USR1@<secs>`` sends before the time limit) reaches
  the tasks on both nodes; they checkpoint at the same step, the job requeues itself and resumes on two nodes to the
  prompt of the same stage config run as one process here (1e-5);
* a node killed mid-run (its slurmd and every process on it, as when a node loses power), with
  ``cluster.node_failure=fail`` (the default): the restarted job fails with one line, Slurm cancels the dependant
  (evaluation: --kill-on-invalid-dep=yes), and the same command run again resumes from the checkpoint to the same
  prompt, then evaluates;
* the same with ``cluster.node_failure=requeue``: Slurm requeues the job (it is submitted with --requeue), the
  launcher says so, the dependant waits on afterok, the job starts again on the two nodes left (the cluster has
  three) and resumes from its last checkpoint to the same prompt, then the evaluation runs.

The job's "python" is the stage under tests/support/fault_runner.py, slowed to ~1 s per step so that the signal and
the kill land mid-training.
"""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytest.importorskip("torch")

from omegaconf import OmegaConf  # noqa: E402

from tests.support.launcher import ROOT, run_main  # noqa: E402
from tests.support.multinode import (RANK_LINE, assert_same_run, one_process_reference, prompt_learning_args,  # noqa: E402
                                     stage_outputs, wait_for)
from tests.support.paths import SUPPORT  # noqa: E402
from tests.support.tiny_models import build  # noqa: E402

pytestmark = pytest.mark.multinode
STEPS = 10


def _slow_python(tmp_path):
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nexec nice -n 19 {sys.executable} {SUPPORT / 'fault_runner.py'} --step-sleep 1 \"$@\"\n")
    python.chmod(0o755)
    return python


def _args(tmp_path, *extra):
    model = build("llama", tmp_path / "llama")
    return prompt_learning_args(tmp_path, model, nodes=2, devices=1, steps=STEPS, extra=[
        f"python={_slow_python(tmp_path)}", "prompt_learning.trainer.val_check_interval=4", *extra])


def _log(stage_dir, job_id):
    return next(iter(stage_dir.glob(f"log-*_{job_id}.out")), None)


STAGE_DIR = ("results", "tiny_llama", "prompt_learning_squad")


def test_usr1_preempts_the_two_node_job_which_requeues_and_resumes_to_the_same_prompt(multinode_cluster, tmp_path):
    proc = run_main(_args(tmp_path, "cluster.signal=USR1@60"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stage_dir = tmp_path.joinpath(*STAGE_DIR)
    job_id = multinode_cluster.job_id(stage_dir)
    wait_for("step 3 of the first run", lambda: _log(stage_dir, job_id) and "optimizer step 3 done" in
             _log(stage_dir, job_id).read_text(), 240)
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True, timeout=30)
    wait_for("the requeue", lambda: multinode_cluster.job(job_id).get("Restarts") == "1", 120)
    states = multinode_cluster.wait([job_id], timeout=420)
    text = _log(stage_dir, job_id).read_text()
    assert states[job_id].state == "COMPLETED", text[-3000:]

    saved = re.search(r"SIGUSR1: checkpoint saved at step (\d+) to .*; the job script requeues the job", text)
    assert saved, text[-3000:]
    step = int(saved.group(1))
    assert 3 <= step < STEPS
    assert f"promptlaunch: requeueing job {job_id}; it resumes from its checkpoint" in text
    assert re.search(rf"resuming from \S+/checkpoints/last\.ckpt \(step {step}\); Slurm restart 1", text), text[-3000:]
    err = _log(stage_dir, job_id).with_suffix(".err").read_text()
    assert err.count("received SIGUSR1; checkpointing at the next step boundary") == 2, err[-3000:]   # both nodes' ranks
    # both runs were spread over two hosts, rank 0's being the master
    runs = re.split(rf"promptlaunch: job {job_id} starts \(restart 1\)", text)
    assert len(runs) == 2
    for run in runs:
        ranks = {m[0]: m for m in RANK_LINE.findall(run)}
        assert sorted(ranks) == ["0", "1"] and ranks["0"][2] != ranks["1"][2], run[-2000:]
        assert ranks["0"][6] == ranks["1"][6] == ranks["0"][2], ranks

    cfg = OmegaConf.load(next(stage_dir.glob("*_hydra-*.yaml")))
    assert_same_run(stage_outputs(cfg), one_process_reference(stage_dir, tmp_path / "reference"), "preempted", STEPS)


def _chain_args(tmp_path, *extra):
    return _args(tmp_path, "stages=[prompt_learning,evaluation]", "evaluation.data.offset=0",
                 "evaluation.data.max_examples=2", "evaluation.inference.tokens_to_generate=2",
                 f"evaluation.data.test_ds={tmp_path}/val.jsonl", *extra)


EVAL_DIR = ("results", "tiny_llama", "evaluation_squad")


def test_a_killed_node_fails_the_job_cancels_its_dependant_and_a_rerun_resumes(multinode_cluster, tmp_path):
    """cluster.node_failure=fail (the default): Slurm restarts the --requeue job whose node failed; the script sees
    that the stage did not ask for it and exits 1 with one line; Slurm itself (--kill-on-invalid-dep=yes, no wait
    mode here) cancels the evaluation; the same main.py command run again resumes from the checkpoint."""
    args = _chain_args(tmp_path)
    stage_dir, eval_dir = tmp_path.joinpath(*STAGE_DIR), tmp_path.joinpath(*EVAL_DIR)
    proc = run_main(args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id, eval_id = multinode_cluster.job_id(stage_dir), multinode_cluster.job_id(eval_dir)
    killed = None
    try:
        wait_for("step 5", lambda: _log(stage_dir, job_id) and "optimizer step 5 done" in _log(stage_dir, job_id).read_text(), 240)
        first = multinode_cluster.hostnames(multinode_cluster.job(job_id)["NodeList"])
        killed = first[1]
        multinode_cluster.kill_node(killed)
        wait_for("the job to fail", lambda: multinode_cluster.job(job_id).get("JobState") == "FAILED", 180)
        wait_for("Slurm to cancel the evaluation", lambda: multinode_cluster.job(eval_id).get("JobState") == "CANCELLED", 60)
    finally:
        if killed:
            multinode_cluster.start_nodes()
    text, err_log = _log(stage_dir, job_id).read_text(), _log(stage_dir, job_id).with_suffix(".err").read_text()
    line = (f"promptlaunch: job {job_id} was restarted by Slurm, not by the stage: a node of its previous run failed "
            f"(or an administrator requeued it); cluster.node_failure=fail, so it fails now and Slurm cancels its "
            f"dependants. Rerun the same command once the nodes are back")
    assert line in text and line in err_log, text[-3000:]
    assert re.search(rf"error: rank 0 on host {first[0]} lost contact with another rank of this job", err_log), err_log[-3000:]
    after = text.split(f"promptlaunch: job {job_id} starts (restart 1)")[1]
    assert "promptlaunch: rank" not in after                      # nothing ran after the unasked-for restart
    assert multinode_cluster.job(job_id).get("ExitCode") == "1:0"
    assert not list(eval_dir.glob("log-*.out"))                   # the evaluation never started

    rerun = run_main([*args, "cluster.wait=true", "cluster.poll_seconds=1"])
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    new_id = multinode_cluster.job_id(stage_dir)
    assert new_id != job_id and f"job {new_id}: COMPLETED" in rerun.stdout, rerun.stdout
    resumed = re.search(r"resuming from \S+/checkpoints/last\.ckpt \(step (\d+)\)", _log(stage_dir, new_id).read_text())
    assert resumed and 4 <= int(resumed.group(1)) < STEPS, _log(stage_dir, new_id).read_text()[-3000:]
    assert (eval_dir / "results" / "metrics.json").exists() or list(eval_dir.rglob("metrics.json")), rerun.stdout
    cfg = OmegaConf.load(next(stage_dir.glob("*_hydra-*.yaml")))
    assert_same_run(stage_outputs(cfg), one_process_reference(stage_dir, tmp_path / "reference"), "node killed, rerun", STEPS)


def test_node_failure_requeue_restarts_the_job_on_the_spare_node(multinode_cluster, tmp_path):
    """cluster.node_failure=requeue: Slurm requeues a job whose node failed (NODE_FAIL) instead of failing it: the
    launcher says so, the dependant (evaluation) waits on afterok and never sees a half-trained prompt, and the job
    starts again on the two nodes left (the cluster has a third) and resumes from its checkpoint."""
    args = _chain_args(tmp_path, "cluster.node_failure=requeue", "cluster.wait=true", "cluster.poll_seconds=1")
    stage_dir = tmp_path.joinpath(*STAGE_DIR)
    launch = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    killed = None
    try:
        eval_dir = tmp_path.joinpath(*EVAL_DIR)
        wait_for("both job ids", lambda: (stage_dir / "job_id").exists() and (eval_dir / "job_id").exists(), 120)
        job_id, eval_id = multinode_cluster.job_id(stage_dir), multinode_cluster.job_id(eval_dir)
        # step 5: the step-4 validation has written checkpoints/last.ckpt
        wait_for("step 5", lambda: _log(stage_dir, job_id) and "optimizer step 5 done" in _log(stage_dir, job_id).read_text(), 240)
        first = multinode_cluster.hostnames(multinode_cluster.job(job_id)["NodeList"])
        killed = first[1]
        multinode_cluster.kill_node(killed)   # slurmd and every task on that node die at once
        wait_for("Slurm to requeue the job", lambda: multinode_cluster.job(job_id).get("Restarts") == "1", 120)
        assert multinode_cluster.job(eval_id)["JobState"] == "PENDING"   # afterok holds the dependant
        out, err = launch.communicate(timeout=400)
    finally:
        if launch.poll() is None:
            launch.kill()
        if killed:
            multinode_cluster.start_nodes()   # the node is back for the next test
    assert launch.returncode == 0, (out + err)[-3000:]
    assert f"job {job_id}: requeued by Slurm (a node failed or the job was preempted), pending again" in out, out
    assert f"job {job_id}: COMPLETED" in out and f"job {eval_id}: COMPLETED" in out, out
    second = multinode_cluster.hostnames(multinode_cluster.job(job_id)["NodeList"])
    assert killed not in second and len(second) == 2, (first, second)
    text = _log(stage_dir, job_id).read_text()
    err_log = _log(stage_dir, job_id).with_suffix(".err").read_text()
    # what the first run's log says: the rank left on the live node lost its peer (one line, no traceback), and
    # Slurm's words: the node failed, the job was cancelled for it, then requeued
    assert re.search(rf"error: rank 0 on host {first[0]} lost contact with another rank of this job", err_log), err_log[-3000:]
    assert f"srun: error: Node failure on {killed}" in err_log or "DUE TO NODE FAILURE" in err_log, err_log[-3000:]
    assert f"promptlaunch: job {job_id} starts (restart 1)" in text, text[-3000:]
    after = text.split(f"promptlaunch: job {job_id} starts (restart 1)")[1]
    assert sorted(m[2] for m in RANK_LINE.findall(after)) == second, after[-2000:]
    resumed = re.search(r"resuming from \S+/checkpoints/last\.ckpt \(step (\d+)\); Slurm restart 1", after)
    assert resumed and 4 <= int(resumed.group(1)) < STEPS, after[-3000:]
    cfg = OmegaConf.load(next(stage_dir.glob("*_hydra-*.yaml")))
    assert_same_run(stage_outputs(cfg), one_process_reference(stage_dir, tmp_path / "reference"), "node killed", STEPS)
