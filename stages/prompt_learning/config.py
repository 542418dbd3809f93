"""The prompt_learning stage's own config rules, torch-free, in one place with one wording (the full key path).

The launcher calls them before anything is written or submitted (``launcher/validate.py``), and the stage calls
them again inside the job on the config it was handed, so a hand-edited ``<name>_hydra.yaml`` is checked the same
way. Rules that need files or the model (inputs exist, restored tasks are in the artifact) are not here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import ListConfig, OmegaConf

from stages.common.errors import UserError
from stages.engine.template import TaskTemplate, parse_templates

KEY = "prompt_learning.model"
STYLES = ("prompt-tuning", "p-tuning")
ENCODERS = ("mlp", "lstm")
INIT_METHODS = ("random", "text", "vocab", "file")


@dataclass(frozen=True)
class Tasks:
    """What to tune: the prompt style, every task template, the new (trainable) and existing (frozen) tasks."""

    style: str
    templates: dict[str, TaskTemplate]
    new: list[str]
    existing: list[str]


def task_names(m: Any, key: str) -> list[str]:
    """``new_tasks=squad`` (a bare string) means ``[squad]``; the config gets the list written back."""
    raw = m.get(key)
    if raw is None:
        return []
    if isinstance(raw, str):
        m[key] = [raw] if raw else []
        return [raw] if raw else []
    if not isinstance(raw, (list, ListConfig)) or any(not isinstance(t, str) or not t for t in raw):
        raise UserError(f"{KEY}.{key}: expected a list of task names such as [squad], got {raw!r}")
    return [str(t) for t in raw]


def check_tasks(m: Any) -> Tasks:
    """``model.virtual_prompt_style``, ``p_tuning.encoder_type``, ``task_templates``, ``new_tasks``,
    ``existing_tasks`` (with ``restore_path``) and ``prompt_tuning.new_prompt_init_methods``."""
    style = m.get("virtual_prompt_style")
    if style not in STYLES:
        raise UserError(f"{KEY}.virtual_prompt_style: '{style}' is not one of {', '.join(STYLES)}")
    if style == "p-tuning":
        enc = (m.get("p_tuning") or {}).get("encoder_type")
        if enc not in ENCODERS:
            raise UserError(f"{KEY}.p_tuning.encoder_type: '{enc}' is not one of {', '.join(ENCODERS)}")
    raw = m.get("task_templates")
    templates = parse_templates((OmegaConf.to_container(raw) if OmegaConf.is_config(raw) else raw) or [], f"{KEY}.task_templates")
    new, existing = task_names(m, "new_tasks"), task_names(m, "existing_tasks")
    if not new:
        raise UserError(f"{KEY}.new_tasks: empty; name the task(s) to tune, e.g. new_tasks=[squad]")
    for key, names in (("new_tasks", new), ("existing_tasks", existing)):
        for n in names:
            if n not in templates:
                raise UserError(f"{KEY}.{key}: '{n}' has no entry in model.task_templates (have: {sorted(templates)})")
    both = set(new) & set(existing)
    if both:
        raise UserError(f"{KEY}.new_tasks: {sorted(both)} also in existing_tasks; a task is either new or existing")
    if existing and not m.get("restore_path"):
        raise UserError(f"{KEY}.restore_path: required with existing_tasks; point it at the prompt artifact to extend")
    if style == "prompt-tuning":
        methods = list((m.get("prompt_tuning") or {}).get("new_prompt_init_methods") or [])
        if methods and len(methods) not in (1, len(new)):
            raise UserError(f"{KEY}.prompt_tuning.new_prompt_init_methods: {len(methods)} entries for {len(new)} new "
                            "tasks; give one per task")
        for method in methods:
            if method not in INIT_METHODS:
                raise UserError(f"{KEY}.prompt_tuning.new_prompt_init_methods: '{method}' is not one of "
                                f"{', '.join(INIT_METHODS)}")
    return Tasks(str(style), templates, new, existing)


def check_batching_flags(m: Any) -> tuple[bool, bool]:
    """(share_prefix, length_bucketing) of ``model.data``, each true or false. Where they cannot apply the stage
    switches them off with a logged line instead of failing (train.py): the CPU default config turns them on, and
    ``trainer.devices=2`` on top of it should still just work."""
    data = m.get("data") or {}
    flags = []
    for key in ("share_prefix", "length_bucketing"):
        value = data.get(key, False)
        if not isinstance(value, bool):
            raise UserError(f"{KEY}.data.{key}: must be true or false, got {value!r}")
        flags.append(value)
    return flags[0], flags[1]


def check_p_tuning_dropout(m: Any, style: str, model_parallel: bool) -> None:
    """P-tuning under tensor/pipeline parallelism needs dropout 0: every tensor-parallel rank recomputes the prompt
    encoder, and the results must agree."""
    if style != "p-tuning" or not model_parallel:
        return
    dropout = float((m.get("p_tuning") or {}).get("dropout", 0.0) or 0.0)
    if dropout > 0:
        raise UserError(f"{KEY}.p_tuning.dropout={dropout}: P-tuning with tensor/pipeline parallelism needs dropout 0 "
                        "(every tensor-parallel rank recomputes the prompt encoder and the results must agree); set "
                        f"{KEY}.p_tuning.dropout=0.0 or tensor_model_parallel_size=pipeline_model_parallel_size=1")
