"""The checks of a parallel run that must fail before the process group exists (torch-free: the model's
``config.json`` only, no weights)."""
from __future__ import annotations

import logging
from typing import Any

from stages.common.errors import UserError

from ..config import STAGE
from .layout import ParallelLayout, check_model_for_layout

log = logging.getLogger("promptlaunch.prompt_learning")


def use_parallel_path(layout: ParallelLayout) -> bool:
    return layout.world_size > 1 or layout.is_model_parallel


def check_parallel_config(layout: ParallelLayout, model_config: Any) -> None:
    """What the job's environment and the model must fit before the process group exists (the config's own rules
    are ``config.check_config``'s, run earlier)."""
    import os

    env_world = os.environ.get("WORLD_SIZE")
    if env_world is not None and int(env_world) != layout.world_size:
        raise UserError(
            f"{STAGE}.trainer.devices x {STAGE}.trainer.num_nodes = {layout.world_size} but {env_world} processes "
            f"were started; start the stage through the launcher (it runs devices x num_nodes processes)"
        )
    if layout.is_model_parallel and model_config is not None:   # else ShardedPromptModel checks the loaded model
        check_model_for_layout(model_config, layout, prefix=f"{STAGE}.")


def precheck(layout: ParallelLayout, location: str) -> None:
    """:func:`check_parallel_config` with the model's ``config.json`` only (before any weights are loaded)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(location)
    except Exception as exc:  # the weights load below reports a broken folder in detail
        log.debug("AutoConfig.from_pretrained(%s) failed: %s", location, exc)
        config = None
    check_parallel_config(layout, config)
