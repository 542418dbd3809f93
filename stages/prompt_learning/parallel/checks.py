"""The checks of a parallel run that must fail before the process group exists (torch-free: the model's
``config.json`` only, no weights)."""
from __future__ import annotations

import logging
from typing import Any

from stages.common.errors import UserError

from ..config import check_p_tuning_dropout
from .layout import ParallelLayout, check_model_for_layout

log = logging.getLogger("promptlaunch.prompt_learning")


def use_parallel_path(layout: ParallelLayout) -> bool:
    return layout.world_size > 1 or layout.is_model_parallel


def check_parallel_config(cfg: Any, layout: ParallelLayout, model_config: Any, style: str) -> None:
    """Everything about the config that must fail before the process group exists."""
    import os

    env_world = os.environ.get("WORLD_SIZE")
    if env_world is not None and int(env_world) != layout.world_size:
        raise UserError(
            f"trainer.devices x trainer.num_nodes = {layout.world_size} but {env_world} processes were started; "
            f"start the stage through the launcher (it runs devices x num_nodes processes)"
        )
    precision = str(cfg.trainer.get("precision", "32"))
    if precision.startswith("16"):
        raise UserError(
            f"trainer.precision={precision}: fp16 loss scaling is not supported with several processes or "
            f"tensor/pipeline parallelism; use bf16-mixed (GPU) or 32"
        )
    if not layout.is_model_parallel:
        return
    if model_config is not None:   # else ParallelPromptTrainer checks the loaded model's config
        check_model_for_layout(model_config, layout, prefix="")
    check_p_tuning_dropout(cfg.model, style, layout.is_model_parallel)


def precheck(cfg: Any, layout: ParallelLayout, location: str, style: str) -> None:
    """:func:`check_parallel_config` with the model's ``config.json`` only (before any weights are loaded)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(location)
    except Exception as exc:  # the weights load below reports a broken folder in detail
        log.debug("AutoConfig.from_pretrained(%s) failed: %s", location, exc)
        config = None
    check_parallel_config(cfg, layout, config, style)
