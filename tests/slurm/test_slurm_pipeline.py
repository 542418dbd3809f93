"""The whole pipeline on a real Slurm: three chained sbatch jobs, prompt learning as 2 srun tasks (DP=2 on gloo).

A tiny randomly initialised Llama (``python3 -m tests.support.tiny_models llama``) keeps it to a couple of minutes on CPU;
its EM/F1 are meaningless, the test checks that every stage ran where and how it should.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.launcher import ROOT, run_main

FIXTURE = ROOT / "tests" / "fixtures" / "squad_tiny"


@pytest.mark.slurm
def test_three_stage_pipeline_on_slurm_with_two_process_prompt_learning(slurm_cluster, tmp_path):
    llama = tmp_path / "llama"
    subprocess.run([sys.executable, "-m", "tests.support.tiny_models", "llama", str(llama)], check=True, cwd=ROOT)
    results, data = tmp_path / "results", tmp_path / "data"
    proc = run_main([
        "cluster_type=slurm", "cluster.wait=true", "cluster.poll_seconds=1", "cluster.exclusive=false",
        f"cluster.job_name_prefix=pl-{tmp_path.name}-", f"base_results_dir={results}", f"data_dir={data}",
        "stages=[data_preparation,prompt_learning,evaluation]",
        "data_preparation.source=local", f"data_preparation.local_dir={FIXTURE}",
        "data_preparation.sha256.train=null", "data_preparation.sha256.dev=null",
        "data_preparation.expected_counts.train=7", "data_preparation.expected_counts.dev=5",
        f"prompt_learning.model.language_model_path={llama}", "prompt_learning.run.model_train_name=tiny_llama",
        "prompt_learning.trainer.devices=2",
        "prompt_learning.model.global_batch_size=4", "prompt_learning.model.micro_batch_size=2",
        "prompt_learning.trainer.max_steps=2", "prompt_learning.trainer.val_check_interval=2",
        "prompt_learning.trainer.enable_progress_bar=false", "prompt_learning.model.data.max_seq_length=512",
        "prompt_learning.model.task_templates.0.truncate_field=context",
        "evaluation.data.offset=0", "evaluation.data.max_examples=3", "evaluation.inference.tokens_to_generate=4",
        "env_vars.OMP_NUM_THREADS=1",
    ])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    stage_dirs = {
        "data_preparation": results / "data_preparation",
        "prompt_learning": results / "tiny_llama" / "prompt_learning_squad",
        "evaluation": results / "tiny_llama" / "evaluation_squad",
    }
    ids = {s: slurm_cluster.job_id(d) for s, d in stage_dirs.items()}
    for stage, job_id in ids.items():
        assert f"job {job_id}: COMPLETED" in proc.stdout, (stage, proc.stdout)
    # the prompt-learning job ran two srun tasks that formed one data-parallel world
    pl_log = (stage_dirs["prompt_learning"] / f"log-squad_tiny_llama_{ids['prompt_learning']}.out").read_text()
    assert "Starting with 2 processes" in pl_log, pl_log[-3000:]
    script = (stage_dirs["prompt_learning"] / "squad_tiny_llama_slurm.sh").read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "srun" in script
    metrics = json.loads((stage_dirs["evaluation"] / "metrics.json").read_text())
    assert metrics["total"] == 3 and 0.0 <= metrics["f1"] <= 100.0
    assert len((stage_dirs["evaluation"] / "predictions.jsonl").read_text().splitlines()) == 3
