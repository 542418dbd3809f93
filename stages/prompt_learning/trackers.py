"""Training's experiment trackers: Lightning's ``WandbLogger`` and ``MLFlowLogger`` on the run id kept in the results
folder (``stages.common.trackers``), so a resumed or requeued job stays one tracker run; after training, the prompt
artifact with its exports, the summary and the loss curve go to the same run.

The metrics and the loss curve come through Lightning (``train_loss``, ``val_loss``, ``lr`` per step).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from stages.common.trackers import (Trackers, existing_mlflow_run, flat_numbers, mlflow_tracking_uri, new_wandb_id, require, run_id_for,
                                    store_run_id, stored_run_id)

log = logging.getLogger("promptlaunch.prompt_learning")

PREFIX = "prompt_learning.exp_manager"


def _rank() -> int:
    """The global rank as Lightning's loggers see it (they create their run on rank 0 only)."""
    from lightning_fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def tracker_loggers(trackers: Trackers, log_dir: Path, config: dict[str, Any]) -> list[Any]:
    """The Lightning loggers of the switched-on trackers. Only rank 0 logs, so only rank 0 reads or stores ids."""
    loggers: list[Any] = []
    rank0 = _rank() == 0
    if trackers.wandb is not None:
        require("wandb", PREFIX)
        from pytorch_lightning.loggers import WandbLogger

        kwargs = dict(trackers.wandb)
        if rank0 and "id" not in kwargs:
            kwargs["id"] = run_id_for(log_dir, "wandb", new_wandb_id)
        kwargs.setdefault("resume", "allow")
        kwargs.setdefault("config", config)
        loggers.append(WandbLogger(save_dir=str(log_dir), **kwargs))
    if trackers.mlflow is not None:
        require("mlflow", PREFIX)
        from pytorch_lightning.loggers import MLFlowLogger

        kwargs = dict(trackers.mlflow)
        uri = mlflow_tracking_uri(kwargs, log_dir)
        kwargs.pop("tracking_uri", None)
        run_id = existing_mlflow_run(uri, stored_run_id(log_dir, "mlflow")) if rank0 else None
        logger = MLFlowLogger(tracking_uri=uri, run_id=run_id, **kwargs)
        if rank0:
            logger.experiment   # creates the run now, so its id is stored before the first step
            store_run_id(log_dir, "mlflow", logger.run_id)
        loggers.append(logger)
    return loggers


def publish(loggers: list[Any], artifact: Path, summary: dict[str, Any], log_dir: Path, run_name: str) -> None:
    """Rank 0, after the artifact is written: the artifact folder (prompt tables, templates, every export) as a
    W&B artifact of type ``prompt`` and as MLflow artifacts, the summary numbers, the loss curve; then the W&B
    run is finished (the MLflow run was ended by Lightning when fit returned)."""
    from pytorch_lightning.loggers import MLFlowLogger, WandbLogger

    curve = log_dir / "loss_curve.png"
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            run = logger.experiment
            art = wandb.Artifact(_wandb_name(f"{run_name}-prompt"), type="prompt",
                                 metadata={k: v for k, v in summary.items() if isinstance(v, (str, int, float, bool))})
            art.add_dir(str(artifact))
            run.log_artifact(art)
            run.summary.update(flat_numbers(summary, "training/"))
            if curve.is_file():
                run.log({"loss_curve": wandb.Image(str(curve))})
            run.finish()
            log.info("W&B run %s: artifact %s logged", run.id, art.name)
        elif isinstance(logger, MLFlowLogger):
            client, run_id = logger.experiment, logger.run_id
            client.log_artifacts(run_id, str(artifact), Path(artifact).name)
            client.log_dict(run_id, summary, "prompt_learning_summary.json")
            if curve.is_file():
                client.log_artifact(run_id, str(curve))
            log.info("MLflow run %s: artifact %s logged", run_id, Path(artifact).name)


def _wandb_name(name: str) -> str:
    """A W&B artifact name: letters, digits, dashes, underscores and dots only."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)
