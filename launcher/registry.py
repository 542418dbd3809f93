"""The stages the launcher can plan, in pipeline order, each by the module that checks its config.

The launcher knows no stage's keys: it calls ``<module>.check(stage_cfg) -> StageCheck`` (stages/common/checks.py)
and plans with what comes back, and ``<module>.known_keys()`` to refuse unknown keys in a stage that is not run. A new stage is one line here, a ``stages/<name>/run.py`` and a ``conf/<name>/``
group (PEFT registers its tuners by name in the same spirit).
"""
from __future__ import annotations

import importlib
from typing import Any

from stages.common.checks import StageCheck

STAGES = {
    "data_preparation": "stages.data_preparation.config",
    "prompt_learning": "stages.prompt_learning.config",
    "evaluation": "stages.evaluation.config",
}
STAGE_NAMES = tuple(STAGES)


def known_keys(name: str) -> frozenset[str]:
    """The keys the stage's config may have (its shipped configs' and the optional ones it reads)."""
    return importlib.import_module(STAGES[name]).known_keys()


def check_stage(name: str, cfg: Any) -> StageCheck:
    """Run the stage's own config check (torch-free; the same function the job calls)."""
    return importlib.import_module(STAGES[name]).check(cfg)
