"""Strict keys: a key nothing reads is refused with the nearest known key (``stages/common/checks.check_keys``), and
each stage's list of optional keys (``stages/<stage>/keys.py``) stays complete: every key name a stage reads from
its config is a key of its shipped configs (``conf/<stage>/``), a ``run`` key or listed there."""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from launcher.registry import STAGE_NAMES, known_keys
from stages.common.checks import FREE, RUN_KEYS, check_keys, shipped_keys
from stages.common.errors import UserError
from stages.common.typed import typed
from stages.engine import template
from tests.support.paths import ROOT

# Where each stage reads its config, beyond stages/<stage>/ (the engine code that takes a stage's config node).
ALSO_READS = {"prompt_learning": ["stages/engine/prompts.py"], "evaluation": [], "data_preparation": []}
# Names read with .get("...") in those files that are not config keys (checkpoints, records, metrics, batches).
NOT_CONFIG = {
    "prompt_learning": {"step", "identity", "global_step", "rng", "history", "promptlaunch", "epoch_batches", "epoch",
                        "epoch_steps", "fit_loop", "loops", "zero_grad", "attention_mask", "position_ids", "train", "val"},
    "evaluation": {"id", "drafted", "baseline", "question", "per_task", "f1_ci95", "context"},
    "data_preparation": set(),
}


def _stage_files(stage: str) -> list[Path]:
    return sorted((ROOT / "stages" / stage).rglob("*.py")) + [ROOT / p for p in ALSO_READS[stage]]


def _read_names(files: list[Path]) -> dict[str, str]:
    """Key name (the last part of a dotted key) -> where it is read: ``x.get("name")``, ``OmegaConf.select(cfg,
    "a.name")`` and the stage's own helpers called as ``helper(cfg, "a.name")``."""
    names: dict[str, str] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            args = node.args
            literals = []
            if isinstance(node.func, ast.Attribute) and node.func.attr == "get" and args and isinstance(args[0], ast.Constant):
                literals.append(args[0].value)
            if len(args) >= 2 and isinstance(args[0], ast.Name) and args[0].id == "cfg" and isinstance(args[1], ast.Constant):
                literals.append(args[1].value)
            for lit in literals:
                if isinstance(lit, str) and re.fullmatch(r"[a-z_][a-z0-9_.]*", lit):
                    names.setdefault(lit.rpartition(".")[2], f"{path.relative_to(ROOT)}:{node.lineno}")
    return names


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_every_key_a_stage_reads_is_shipped_or_listed(stage):
    leaves = {k.rpartition(".")[2] for k in known_keys(stage)} | set(template.KEYS)
    unlisted = {name: where for name, where in _read_names(_stage_files(stage)).items()
                if name not in leaves and name not in NOT_CONFIG[stage]}
    assert not unlisted, (f"{stage} reads keys no shipped config has; add them to stages/{stage}/keys.py OPTIONAL "
                          f"(or to NOT_CONFIG here if they are not config keys): {unlisted}")


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_optional_keys_are_not_shipped_and_are_read(stage):
    import importlib

    optional = importlib.import_module(f"stages.{stage}.keys").OPTIONAL
    read = set(_read_names(_stage_files(stage)))
    for key in optional:
        assert key not in shipped_keys(stage), f"{key} is in a shipped config of {stage}: remove it from OPTIONAL"
        assert key.endswith(f".{FREE}") or key.rpartition(".")[2] in read, f"{stage} does not read {key}: remove it"


def test_shipped_configs_and_the_run_keys_are_known():
    assert "trainer.max_steps" in known_keys("prompt_learning") and "run.nodes" in known_keys("prompt_learning")
    assert "inference.prompt_lookup_pass_budget" in known_keys("evaluation")
    assert {f"run.{k}" for k in RUN_KEYS} <= known_keys("data_preparation")


@pytest.mark.parametrize("given,line", [
    ({"trainer": {"max_step": 5}}, "p.trainer.max_step: unknown key (nothing reads it); did you mean p.trainer.max_steps?"),
    ({"max_steps": 5}, "p.max_steps: unknown key (nothing reads it); did you mean p.trainer.max_steps?"),
    ({"trainer": {"zzz": 1}}, "p.trainer.zzz: unknown key (nothing reads it); remove it (known keys under p.trainer: max_steps, precision)"),
    ({"kwargs": {"x": 1}, "trainer": {"precision": {"a": 1}}}, None),   # free below kwargs; precision has no known keys
])
def test_check_keys(given, line):
    known = {"trainer", "trainer.max_steps", "trainer.precision", "kwargs", f"kwargs.{FREE}"}
    if line is None:
        check_keys(OmegaConf.create(given), known, "p")
        return
    with pytest.raises(UserError) as err:
        check_keys(OmegaConf.create(given), known, "p")
    assert str(err.value) == line


@dataclass
class _Schema:
    partition: str | None = None
    srun_args: list[str] = field(default_factory=list)


def test_typed_refuses_an_undeclared_key():
    assert typed(_Schema, OmegaConf.create({"partition": "a"}), "cluster").partition == "a"
    with pytest.raises(UserError, match=r"^cluster\.partitio: unknown key \(nothing reads it\); did you mean cluster\.partition\?$"):
        typed(_Schema, OmegaConf.create({"partitio": "a"}), "cluster")
