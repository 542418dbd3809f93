"""Evaluation results in W&B (offline run files read back with wandb's protobuf) and MLflow (``MlflowClient`` on a
``file:`` store): metrics.json as the summary / metrics, predictions.jsonl as the table, the files as artifacts,
and a rerun in the same results folder is the same tracker run."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("wandb")
pytest.importorskip("mlflow")

from stages.common.errors import UserError  # noqa: E402
from stages.evaluation import evaluate as ev  # noqa: E402
from tests.support.evaluation import SQUAD_RECORDS, FakeModel, make_artifact, make_cfg, write_jsonl  # noqa: E402
from tests.support.templates import SQUAD_T  # noqa: E402
from tests.support.trackers import artifact_files, md5_b64, offline_trackers, read_wandb_runs, table_rows  # noqa: E402


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B offline and MLflow's file store, in this test's folder (tests.support.trackers.offline_trackers)."""
    return offline_trackers(tmp_path, monkeypatch)


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(ev, "load_prompted_model", lambda s, precision="32": FakeModel([SQUAD_T], str(s.artifact_path)))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def tracked_cfg(tmp_path: Path, **over: Any):
    test_ds = write_jsonl(tmp_path / "test.jsonl", SQUAD_RECORDS)
    return make_cfg(tmp_path, test_ds, make_artifact(tmp_path), **{
        "exp_manager.create_wandb_logger": True, "exp_manager.wandb_logger_kwargs.project": "squad_prompt_learning",
        "exp_manager.create_mlflow_logger": True, "exp_manager.mlflow_logger_kwargs.experiment_name": "squad_prompt_learning",
        "exp_manager.mlflow_logger_kwargs.tracking_uri": (tmp_path / "mlruns").as_uri(), **over})


def test_wandb_and_mlflow_hold_the_metrics_and_the_predictions_table(tmp_path, fake, offline):
    cfg = tracked_cfg(tmp_path)
    ev.evaluate(cfg)
    out = tmp_path / "results"
    metrics = json.loads((out / "metrics.json").read_text())
    preds, base = read_jsonl(out / "predictions.jsonl"), read_jsonl(out / "predictions_baseline.jsonl")
    ids = json.loads((out / "tracker_runs.json").read_text())

    wb = read_wandb_runs(out)
    assert wb.ids == {ids["wandb"]}
    assert {k: wb.summary[k] for k in metrics} == metrics       # metrics.json, whole, as the run summary
    columns, rows = table_rows(wb.files, "predictions")
    assert columns == ["index", "id", "taskname", "question", "context", "prediction", "answers", "em", "f1",
                       "baseline_prediction", "baseline_em", "baseline_f1"]
    assert [{c: r[i] for i, c in enumerate(columns) if c in preds[0]} for r in rows] == preds
    assert [r[4] for r in rows] == [rec["context"] for rec in SQUAD_RECORDS]
    assert [r[-3:] for r in rows] == [[b["prediction"], b["em"], b["f1"]] for b in base]
    (art,) = [a for a in wb.artifacts if a.type == "evaluation"]
    assert artifact_files(art) == {name: md5_b64(out / name) for name in metrics["files"].values()}

    from mlflow import MlflowClient

    client = MlflowClient((tmp_path / "mlruns").as_uri())
    run = client.get_run(ids["mlflow"])
    assert client.get_experiment(run.info.experiment_id).name == "squad_prompt_learning"
    assert run.data.metrics["exact_match"] == metrics["exact_match"] and run.data.metrics["baseline/f1"] == metrics["baseline"]["f1"]
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "predictions_table.json", str(tmp_path / "dl"))).read_text())
    assert table == {"columns": columns, "data": rows}
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == sorted(
        ["predictions_table.json", *metrics["files"].values()])

    ev.evaluate(cfg)   # the same evaluation again (a rerun, a requeued job): the same runs
    assert json.loads((out / "tracker_runs.json").read_text()) == ids
    assert read_wandb_runs(out).ids == {ids["wandb"]} and len(read_wandb_runs(out).files) == 2
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [ids["mlflow"]]


@pytest.mark.parametrize("key, value, match", [
    ("create_wandb_logger", "maybe", "evaluation.exp_manager.create_wandb_logger: must be true or false, got 'maybe'"),
    ("mlflow_logger_kwargs", [1], "evaluation.exp_manager.mlflow_logger_kwargs: must be a mapping of keyword arguments or null"),
])
def test_tracker_keys_are_checked_before_any_work(tmp_path, fake, key, value, match):
    from omegaconf import OmegaConf

    cfg = tracked_cfg(tmp_path)
    OmegaConf.update(cfg, f"exp_manager.{key}", value, merge=False)
    with pytest.raises(UserError, match=match):
        ev.evaluate(cfg)
    assert not (tmp_path / "results" / "metrics.json").exists()


def test_a_tracker_that_is_not_installed_is_one_line(tmp_path, fake, monkeypatch):
    import builtins

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "mlflow" else real(name, *a, **k))
    with pytest.raises(UserError, match=r"evaluation.exp_manager.create_mlflow_logger=true but mlflow is not installed; "
                                        r"`pip install mlflow-skinny`"):
        ev.evaluate(tracked_cfg(tmp_path, **{"exp_manager.create_wandb_logger": False}))
