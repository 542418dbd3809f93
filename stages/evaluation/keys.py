"""The keys of an ``evaluation`` config: those of the shipped configs (``conf/evaluation/``) plus the ones below,
which the stage reads with a default but no shipped config sets. A key that is neither is refused
(``config.Settings.from_cfg``); ``tests/stages/common/test_keys.py`` fails when the stage reads a key that is
neither shipped nor listed here."""
from __future__ import annotations

from stages.common.checks import FREE

OPTIONAL: dict[str, str] = {
    f"exp_manager.wandb_logger_kwargs.{FREE}": "keyword arguments of wandb.init, passed on as given (trackers.py)",
    f"exp_manager.mlflow_logger_kwargs.{FREE}": "experiment_name, run_name, tracking_uri, tags (trackers.py)",
    "exp_manager.mlflow_logger_kwargs.tags": "tags of a new MLflow run (trackers.py)",
}
