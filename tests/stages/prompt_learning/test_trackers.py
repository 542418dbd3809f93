"""Training in W&B and MLflow on the tiny Llama: the loss curve, the config, the prompt artifact with its exports; and a
run killed with SIGKILL and rerun, then preempted and requeued, stays one W&B run and one MLflow run. W&B's offline run
files are read back with wandb's protobuf, MLflow's runs with ``MlflowClient`` on the ``file:`` store."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("wandb")
pytest.importorskip("mlflow")

from omegaconf import OmegaConf  # noqa: E402

from tests.support.paths import ROOT, SUPPORT  # noqa: E402
from tests.support.trackers import artifact_files, md5_b64, offline_trackers, read_wandb_runs  # noqa: E402
from tests.support.training import make_cfg, train  # noqa: E402


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B offline and MLflow's file store, in this test's folder (tests.support.trackers.offline_trackers)."""
    return offline_trackers(tmp_path, monkeypatch)


def tracked(tmp: Path, tiny: str, **kw):
    cfg = make_cfg(tmp, tiny, **kw)
    em = cfg.exp_manager
    em.create_wandb_logger = True
    em.wandb_logger_kwargs = {"project": "squad_prompt_learning", "name": "test"}
    em.create_mlflow_logger = True
    em.mlflow_logger_kwargs = {"experiment_name": "squad_prompt_learning", "run_name": "test",
                               "tracking_uri": (tmp / "mlruns").as_uri()}
    return cfg


def mlflow_runs(cfg):
    from mlflow import MlflowClient

    client = MlflowClient(cfg.exp_manager.mlflow_logger_kwargs.tracking_uri)
    experiment = client.get_experiment_by_name("squad_prompt_learning")
    return client, client.search_runs([experiment.experiment_id])


def logged(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(int(r["trainer/global_step"]), r[key]) for r in rows if key in r]


def same_values(got: list[tuple[int, float]], want: list[list[float]]) -> bool:
    """The same values in order, up to float32 rounding (the trackers keep the logged tensors' float32 values; the
    steps are Lightning's own numbering, the count before the update)."""
    return [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)


def test_training_metrics_config_and_the_prompt_artifact_reach_wandb_and_mlflow(tmp_path, tiny, offline):
    cfg = tracked(tmp_path, tiny)
    train(cfg)
    log_dir, art = Path(cfg.exp_manager.explicit_log_dir), Path(cfg.model.artifact_path)
    ids = json.loads((log_dir / "tracker_runs.json").read_text())
    hist = json.loads((log_dir / "loss_history.json").read_text())

    wb = read_wandb_runs(log_dir)
    assert wb.ids == {ids["wandb"]} and len(wb.files) == 1
    assert [s for s, _ in logged(wb.history, "train_loss")] == [0, 1, 2, 3]
    assert same_values(logged(wb.history, "train_loss"), hist["train"])
    assert same_values(logged(wb.history, "val_loss"), hist["val"])
    assert wb.config["model"]["new_tasks"] == ["squad"] and wb.config["trainer"]["max_steps"] == 4
    (prompt,) = [a for a in wb.artifacts if a.type == "prompt"]
    files = sorted(p for p in art.rglob("*") if p.is_file())
    assert artifact_files(prompt) == {str(p.relative_to(art)): md5_b64(p) for p in files}
    assert "export/peft/squad/adapter_model.safetensors" in artifact_files(prompt)
    assert wb.summary["training/steps"] == 4

    client, runs = mlflow_runs(cfg)
    assert [r.info.run_id for r in runs] == [ids["mlflow"]]
    val = client.get_metric_history(ids["mlflow"], "val_loss")
    assert same_values(sorted((m.step, m.value) for m in val), hist["val"])
    assert len(client.get_metric_history(ids["mlflow"], "train_loss")) == 4
    logged_files = {a.path for a in client.list_artifacts(ids["mlflow"], art.name)}
    assert f"{art.name}/prompts.safetensors" in logged_files and f"{art.name}/export" in logged_files
    assert {a.path for a in client.list_artifacts(ids["mlflow"])} >= {"loss_curve.png", "prompt_learning_summary.json"}


def test_a_killed_then_preempted_training_stays_one_wandb_run_and_one_mlflow_run(tmp_path, tiny, offline):
    """SIGKILL after step 2, rerun; SIGUSR1 (the Slurm preemption notice) after step 4, exit 3 for the requeue; rerun
    to the end: three processes, one W&B run id, one MLflow run, every step logged."""
    cfg = tracked(tmp_path, tiny, max_steps=6)
    OmegaConf.update(cfg, "exp_manager.checkpoint_callback_params.every_n_train_steps", 1, merge=False)
    path = tmp_path / "config.yaml"
    OmegaConf.save(cfg, path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "PROMPTLAUNCH_REQUEUE_FILE": str(tmp_path / "requeue")}
    # WANDB_SERVICE: the W&B service an in-process test of this session started; a job has its own
    for k in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "RANK", "WANDB_SERVICE"):
        env.pop(k, None)

    def stage(*faults: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(SUPPORT / "fault_runner.py"), *faults,
                               str(ROOT / "stages" / "prompt_learning" / "run.py"), "--config", str(path)],
                              capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)

    log_dir = Path(cfg.exp_manager.explicit_log_dir)
    out = stage("--kill-after-step", "2")
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    ids = json.loads((log_dir / "tracker_runs.json").read_text())   # stored before the first step
    out = stage("--usr1-after-step", "4")   # counts this process's steps: the resumed run's step 2 + 4
    assert out.returncode == 3 and "resuming from" in out.stdout, out.stderr[-3000:]
    out = stage()
    assert out.returncode == 0 and "resuming from" in out.stdout, out.stderr[-3000:]
    assert json.loads((log_dir / "tracker_runs.json").read_text()) == ids

    wb = read_wandb_runs(log_dir)
    assert len(wb.files) == 3 and wb.ids == {ids["wandb"]}    # one run id across the three processes
    assert [a.type for a in wb.artifacts].count("prompt") == 1

    client, runs = mlflow_runs(cfg)
    assert [r.info.run_id for r in runs] == [ids["mlflow"]]
    assert client.get_run(ids["mlflow"]).info.status == "FINISHED"
    # MLflow writes at once. Step 4 is where the preemption stopped: Lightning logs a step's metrics after the
    # callbacks, and the checkpointing callback had stopped the run (every logger alike)
    in_mlflow = {m.step for m in client.get_metric_history(ids["mlflow"], "train_loss")}
    assert in_mlflow == {0, 1, 2, 3, 5}
    # W&B has the same, except what the SIGKILLed process had not flushed yet; the preempted one lost nothing
    assert {s for s, _ in logged(wb.history, "train_loss")} | {0} == in_mlflow
