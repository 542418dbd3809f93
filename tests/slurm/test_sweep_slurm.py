"""A two-job sweep on a real Slurm: each job its own folder and its own afterok chain (prompt_learning -> evaluation)
under its own job names, so ``--dependency=singleton`` does not serialise them; the sweep's end waits for both
chains (cluster.wait=true) and writes the summary with their states, val_loss and EM/F1."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.launcher import ROOT, run_main

FIXTURE = ROOT / "tests" / "fixtures" / "squad_tiny"
pytestmark = pytest.mark.slurm


def test_two_job_sweep_two_chains_with_distinct_names(slurm_cluster, tmp_path):
    llama = tmp_path / "llama"
    subprocess.run([sys.executable, "-m", "tests.support.tiny_models", "llama", str(llama)], check=True, cwd=ROOT)
    data = tmp_path / "data"
    prep = run_main(["stages=[data_preparation]", f"data_dir={data}", f"base_results_dir={tmp_path}/prep",
                     "data_preparation.source=local", f"data_preparation.local_dir={FIXTURE}",
                     "data_preparation.sha256.train=null", "data_preparation.sha256.dev=null",
                     "data_preparation.expected_counts.train=7", "data_preparation.expected_counts.dev=5"])
    assert prep.returncode == 0, prep.stderr
    results = tmp_path / "results"
    proc = run_main([
        "-m", "cluster_type=slurm", "cluster.wait=true", "cluster.poll_seconds=1", "cluster.exclusive=false",
        "cluster.mem=null", f"cluster.job_name_prefix=pl-{tmp_path.name}-", f"base_results_dir={results}",
        f"data_dir={data}", "stages=[prompt_learning,evaluation]", "prompt_learning.model.optim.lr=0.01,0.05",
        f"prompt_learning.model.language_model_path={llama}", "prompt_learning.run.model_train_name=tiny_llama",
        "prompt_learning.model.global_batch_size=4", "prompt_learning.model.micro_batch_size=4",
        "prompt_learning.trainer.max_steps=2", "prompt_learning.trainer.val_check_interval=2",
        "prompt_learning.trainer.enable_progress_bar=false", "prompt_learning.model.data.max_seq_length=512",
        "prompt_learning.model.task_templates.0.truncate_field=context",
        "evaluation.data.offset=0", "evaluation.data.max_examples=3", "evaluation.inference.tokens_to_generate=4",
        "env_vars.OMP_NUM_THREADS=1",
    ], cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    sweep = results / "sweeps" / "lr=0.01~0.05"
    chains, names = {}, set()
    for job in ("lr=0.01", "lr=0.05"):
        record = json.loads((sweep / job / "sweep.json").read_text())
        ids = [slurm_cluster.job_id(record["stages"][s]) for s in ("prompt_learning", "evaluation")]
        chains[job] = ids
        for stage_dir in record["stages"].values():
            script = next(p for p in Path(stage_dir).glob("*_slurm.sh")).read_text()
            names.add(next(line for line in script.splitlines() if line.startswith("#SBATCH --job-name=")))
        lock = json.loads((Path(record["stages"]["prompt_learning"]) / "launch.lock").read_text())
        assert lock["slurm_jobs"] == ids                                      # held while the chain was in squeue
    assert len(names) == 4 and len({i for ids in chains.values() for i in ids}) == 4
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert [r["state"] for r in summary["jobs"]] == [
        f"prompt_learning {chains[j][0]} COMPLETED, evaluation {chains[j][1]} COMPLETED" for j in ("lr=0.01", "lr=0.05")]
    assert [r["lr"] for r in summary["jobs"]] == [0.01, 0.05]
    assert all(r["final_val_loss"] is not None and r["f1"] is not None for r in summary["jobs"])
