"""The keys of a ``prompt_learning`` config: those of the shipped configs (``conf/prompt_learning/``) plus the ones
below, which the stage reads with a default but no shipped config sets. A key that is neither is refused
(``config.check_config``); ``tests/stages/common/test_keys.py`` fails when the stage reads a key that is
neither shipped nor listed here."""
from __future__ import annotations

from stages.common.checks import FREE

OPTIONAL = {
    "model.validate_before_training": "true: one validation before the first step (train.py fit)",
    "model.sequence_parallel": "false; true is refused (parallel/layout.py)",
    "exp_manager.resume_ignore_changes": "[]: identity keys a resume may differ in (identity.ignored_keys)",
    f"exp_manager.wandb_logger_kwargs.{FREE}": "keyword arguments of WandbLogger, passed on as given",
    f"exp_manager.mlflow_logger_kwargs.{FREE}": "keyword arguments of MLFlowLogger, passed on as given",
    "_check_frozen": "tests only: assert the base model's embeddings are unchanged after training",
}
