"""Evaluation results in the experiment trackers (``evaluation.exp_manager``): ``metrics.json`` as the run's summary
(W&B) or metrics (MLflow), ``predictions.jsonl`` as a table (question, context, prediction, gold answers, EM, F1, and
the baseline's answer and scores next to them), and the evaluation files as artifacts.

The table is built from the files the stage has just written, so its rows are the rows of ``predictions.jsonl``.
The tracker run id is kept in ``run.results_dir`` (``stages.common.trackers``): rerunning the same evaluation, or a
requeued job, updates the same run.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Sequence

from stages.common.trackers import (Trackers, existing_mlflow_run, flat_numbers, mlflow_tracking_uri, new_wandb_id, require, run_id_for,
                                    store_run_id, stored_run_id)

from .config import PREFIX

log = logging.getLogger("promptlaunch.evaluation")

KEY = f"{PREFIX}.exp_manager"
BASELINE_COLUMNS = ("baseline_prediction", "baseline_em", "baseline_f1")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def prediction_table(folder: Path, metrics: dict[str, Any], contexts: Sequence[Any]) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows): the main predictions file's fields in order, the record's context after its question, and
    with a baseline its prediction, EM and F1 (rows matched by position: both files follow the test slice)."""
    files = metrics["files"]
    main = read_jsonl(folder / files["predictions"])
    if not main:
        return [], []
    columns = list(main[0])
    columns.insert(columns.index("question") + 1 if "question" in columns else len(columns), "context")
    rows = [[{**rec, "context": ctx}.get(c) for c in columns] for rec, ctx in zip(main, contexts)]
    if "predictions_baseline" in files:
        base = read_jsonl(folder / files["predictions_baseline"])
        columns += list(BASELINE_COLUMNS)
        rows = [row + [b["prediction"], b["em"], b["f1"]] for row, b in zip(rows, base)]
    return columns, rows


def log_evaluation(trackers: Trackers, folder: Path, run_name: str, metrics: dict[str, Any], contexts: Sequence[Any]) -> None:
    """Send one finished evaluation (its files already in ``folder``) to every switched-on tracker."""
    columns, rows = prediction_table(folder, metrics, contexts)
    paths = [folder / name for name in metrics["files"].values()]
    if trackers.wandb is not None:
        _to_wandb(trackers.wandb, folder, run_name, metrics, columns, rows, paths)
    if trackers.mlflow is not None:
        _to_mlflow(trackers.mlflow, folder, run_name, metrics, columns, rows, paths)


def _to_wandb(kwargs: dict[str, Any], folder: Path, run_name: str, metrics: dict[str, Any], columns: list[str],
              rows: list[list[Any]], paths: list[Path]) -> None:
    wandb = require("wandb", KEY)
    kw = {"job_type": "evaluation", "dir": str(folder), "resume": "allow", **kwargs}
    kw.setdefault("id", run_id_for(folder, "wandb", new_wandb_id))
    run = wandb.init(**kw)
    try:
        run.summary.update(metrics)
        run.log({"predictions": wandb.Table(columns=columns, data=rows)})
        art = wandb.Artifact(re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{run_name}-evaluation"), type="evaluation")
        for path in paths:
            art.add_file(str(path))
        run.log_artifact(art)
        log.info("W&B run %s: summary, %d table rows and artifact %s logged", run.id, len(rows), art.name)
    finally:
        run.finish()


def _to_mlflow(kwargs: dict[str, Any], folder: Path, run_name: str, metrics: dict[str, Any], columns: list[str],
               rows: list[list[Any]], paths: list[Path]) -> None:
    require("mlflow", KEY)
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    uri = mlflow_tracking_uri(kwargs, folder)
    client = MlflowClient(uri)
    name = str(kwargs.get("experiment_name") or "evaluation")
    found = client.get_experiment_by_name(name)
    experiment_id = found.experiment_id if found else client.create_experiment(name)
    run_id = existing_mlflow_run(uri, stored_run_id(folder, "mlflow"))
    if run_id is None:
        run_id = client.create_run(experiment_id, run_name=str(kwargs.get("run_name") or run_name),
                                   tags=dict(kwargs.get("tags") or {})).info.run_id
        store_run_id(folder, "mlflow", run_id)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in flat_numbers(metrics).items()])
    client.log_dict(run_id, {"columns": columns, "data": rows}, "predictions_table.json")
    for path in paths:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    log.info("MLflow run %s (%s): metrics, %d table rows and %d files logged", run_id, uri, len(rows), len(paths))
