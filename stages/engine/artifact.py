"""The prompt artifact: everything needed to use the tuned prompts on top of the unchanged base model.

Folder layout (written atomically as a whole)::

    artifact.json              format version, family, tasks (template + token count), style, base model
                               (path as given, resolved folder, fingerprint, hidden/vocab size), add_eos,
                               max_seq_length, training summary
    prompts.safetensors        prompt_table.<task>: fp32 [total_virtual_tokens, hidden] per task
    export/npy/<task>.npy      the same tables as numpy arrays
    export/peft/<task>/        PEFT PROMPT_TUNING adapter (adapter_config.json + adapter_model.safetensors) and
                               promptlaunch_input.json (the text and tokenizer call that give the trained tokens)
    export/nemo/<task>.nemo    NeMo 1.20-1.23 prompt-learning file (encoder_type: embedding); nemo-1.17/ for NeMo
                               1.17-1.19, nemo-1.16/ for NeMo <= 1.16 (virtual_prompt_style: inference)

``load_artifact`` also reads a NeMo prompt-learning ``.nemo`` (a file, or an unpacked folder with
``model_config.yaml`` and no ``artifact.json``): :mod:`stages.engine.nemo.prompts`.

The exports and what to feed them: ``export.py``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from stages.common.errors import UserError
from stages.common.io import atomic_dir, remove_stale_tmp, write_json
from stages.engine.template import TaskTemplate, parse_templates

from .export import engine_ids, write_exports

FORMAT_VERSION = 1
META = "artifact.json"
TABLES = "prompts.safetensors"


def save_artifact(path: str | Path, *, tables: dict[str, torch.Tensor], templates: dict[str, TaskTemplate], style: str,
                  base: dict[str, Any], add_eos: bool, max_seq_length: int, training: dict[str, Any],
                  family: str = "gpt", export_specs: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write the artifact folder atomically. ``export_specs`` (task -> ``export.input_spec``) describe the PEFT
    input; without them (tables saved outside a training run) the exports carry no input file."""
    from safetensors.torch import save_file

    path = Path(path)
    tasks = {}
    for task, table in tables.items():
        t = templates[task]
        if table.shape[0] != t.total_virtual_tokens:
            raise UserError(f"task '{task}': prompt table has {table.shape[0]} rows but its template says {t.total_virtual_tokens}")
        tasks[task] = {"template": t.to_dict(), "total_virtual_tokens": int(table.shape[0])}
        if export_specs and task in export_specs:
            tasks[task]["peft_export_exact"] = export_specs[task]["peft_export_exact"]
    meta = {
        "format_version": FORMAT_VERSION,
        "family": family,
        "virtual_prompt_style": style,
        "tasks": tasks,
        "base_model": base,
        "add_eos": bool(add_eos),
        "max_seq_length": int(max_seq_length),
        "training": training,
    }
    if family == "t5":
        meta["encoder_decoder"] = {"encoder_input": "template up to the answer field, then <extra_id_0>",
                                   "decoder_target": "<extra_id_0> answer" + (" </s>" if add_eos else "")}
    remove_stale_tmp(path.parent, [path.name])   # a killed earlier write's leftovers (one writer: rank 0)
    with atomic_dir(path) as tmp:
        save_file({f"prompt_table.{k}": v.to(torch.float32).contiguous() for k, v in tables.items()}, str(tmp / TABLES),
                  metadata={"format": "promptlaunch", "format_version": str(FORMAT_VERSION)})
        write_json(tmp / META, meta)
        write_exports(tmp / "export", tables, base, family, export_specs or {}, templates)
    return path


def load_artifact(path: str | Path, key: str = "model.artifact_path") -> tuple[dict[str, Any], dict[str, TaskTemplate], dict[str, torch.Tensor]]:
    """(meta, templates, tables); a missing or malformed artifact is a UserError naming ``key``.

    The format is decided here, by content: a folder with ``artifact.json`` is ours; a file, or a folder with
    ``model_config.yaml`` and no ``artifact.json``, is a NeMo prompt-learning ``.nemo`` (meta ``format: nemo``)."""
    from safetensors.torch import load_file

    p = Path(str(path)).expanduser()
    if is_nemo_prompt(p):
        from .nemo import prompts as nemo_prompts

        return nemo_prompts.load(p, key)
    if not (p / META).is_file() or not (p / TABLES).is_file():
        raise UserError(f"{key}={path}: not a prompt artifact (needs {META} and {TABLES}); point it at the artifact_path of a prompt_learning run or a NeMo prompt-learning .nemo")
    try:
        meta = json.loads((p / META).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{key}={path}: {META} is not valid JSON ({exc.msg}); re-run prompt_learning to rewrite it") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{key}={path}: artifact format version {meta.get('format_version')} is not supported (expected {FORMAT_VERSION})")
    try:
        raw = load_file(str(p / TABLES))
    except Exception as exc:   # safetensors raises its own error types for a truncated or foreign file
        raise UserError(f"{key}={path}: {p / TABLES} is truncated or not a safetensors file ({type(exc).__name__}: "
                        f"{str(exc)[:80]}); copy the artifact again or re-run prompt_learning") from None
    templates = parse_templates([t["template"] for t in meta["tasks"].values()], f"{key}/{META}:tasks")
    tables = {}
    for task in meta["tasks"]:
        name = f"prompt_table.{task}"
        if name not in raw:
            raise UserError(f"{key}={path}: {TABLES} has no tensor {name}; the artifact is damaged, re-run prompt_learning")
        tables[task] = raw[name]
    return meta, templates, tables


def is_nemo_prompt(p: Path) -> bool:
    """A NeMo ``.nemo`` rather than our artifact folder (see :func:`load_artifact`)."""
    return p.is_file() or (p.is_dir() and not (p / META).exists() and (p / "model_config.yaml").is_file())


FAMILY_KINDS = {"gpt": "decoder-only", "t5": "encoder-decoder"}


def check_base(meta: dict[str, Any], artifact_path: str | Path, fingerprint: dict[str, Any], language_model_path: str,
               key: str = "model.language_model_path", family: str | None = None) -> None:
    want = meta.get("base_model", {})
    have = meta.get("family", "gpt")
    if family is not None and have != family:
        raise UserError(
            f"artifact {artifact_path} holds prompts for a {have} ({FAMILY_KINDS.get(have, '?')}) model "
            f"({want.get('language_model_path')}), but {key} points to {language_model_path}, a {family} "
            f"({FAMILY_KINDS.get(family, '?')}) model; prompts do not transfer between model families: use the base "
            f"model the prompts were tuned on, or re-tune the prompts for this model"
        )
    if meta.get("format") == "nemo":   # a NeMo prompt file records no fingerprint: the hidden size is all we can check
        if want.get("hidden_size") != fingerprint.get("hidden_size"):
            raise UserError(
                f"NeMo prompt file {artifact_path} holds prompts of hidden size {want.get('hidden_size')} (NeMo base "
                f"model {want.get('language_model_path')}), but {key} points to {language_model_path}, hidden size "
                f"{fingerprint.get('hidden_size')}; use the base model the prompts were tuned on"
            )
        return
    got_fp = fingerprint.get("sha256")
    recorded = want.get("fingerprint", {})
    if recorded.get("sha256") != got_fp or recorded.get("weights_sha256", fingerprint.get("weights_sha256")) != \
            fingerprint.get("weights_sha256"):   # artifacts written before weights_sha256: the embeddings only
        raise UserError(
            f"artifact {artifact_path} was trained on base model {want.get('language_model_path')} "
            f"(fingerprint {_shown(recorded)}, hidden {want.get('hidden_size')}), but {key} points to "
            f"{language_model_path} (fingerprint {_shown(fingerprint)}, hidden {fingerprint.get('hidden_size')}); "
            f"use the base model the prompts were tuned on, or re-tune the prompts for this model"
        )


def _shown(fp: dict[str, Any]) -> str:
    return f"{fp.get('sha256')}/{fp.get('weights_sha256', '-')}"


def base_info(given: str, resolved: str, model: Any, fingerprint: dict[str, Any]) -> dict[str, Any]:
    cfg = model.config
    return {
        "language_model_path": given,
        "resolved": resolved,
        "fingerprint": fingerprint,
        "hidden_size": fingerprint["hidden_size"],
        "vocab_size": fingerprint["vocab_size"],
        "model_type": getattr(cfg, "model_type", None),
        "num_attention_heads": getattr(cfg, "num_attention_heads", None),
        "num_layers": getattr(cfg, "num_hidden_layers", None),
    }


def peft_input_ids(artifact_path: str | Path, tokenizer: Any, record: dict[str, Any], task: str | None = None) -> list[int]:
    """The engine's ids for ``record`` without virtual slots, for a user of the PEFT export who needs exactly the
    tokens the prompt was trained on (``record`` holds the template's input fields; ``task`` defaults to its
    ``taskname``, else the artifact's only task). Loads no model."""
    from .examples import TokenizerInfo
    from .family import DecoderOnlyFamily, EncoderDecoderFamily

    meta, templates, _ = load_artifact(artifact_path, "artifact_path")
    task = task or record.get("taskname") or (next(iter(templates)) if len(templates) == 1 else None)
    if task not in templates:
        raise UserError(f"task: {task!r} is not one of the artifact's tasks {sorted(templates)}; pass task= or a record taskname")
    family = EncoderDecoderFamily(tokenizer) if meta.get("family") == "t5" else DecoderOnlyFamily()
    return engine_ids(family, templates[task], record, TokenizerInfo(tokenizer))
