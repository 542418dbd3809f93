"""The prompt artifact: everything needed to use the tuned prompts on top of the unchanged base model.

Folder layout (written atomically as a whole)::

    artifact.json              format version, family, tasks (template + token count), style, base model
                               (path as given, resolved folder, fingerprint, hidden/vocab size), add_eos,
                               max_seq_length, training summary
    prompts.safetensors        prompt_table.<task>: fp32 [total_virtual_tokens, hidden] per task
    export/npy/<task>.npy      the same tables as numpy arrays
    export/peft/<task>/        PEFT PROMPT_TUNING adapter (adapter_config.json + adapter_model.safetensors)

Note on the PEFT export: PEFT prepends all virtual tokens before the input, so it matches our template only
when the task has a single marker at the start of the template (the common case); ``artifact.json`` says so.
For the encoder-decoder family ("t5") the adapter is SEQ_2_SEQ_LM with ``num_transformer_submodules: 1``:
PEFT prompt tuning then prepends the table to the ENCODER input only, which is what the table was trained
for (PEFT's default for seq2seq, 2, would expect a second block of rows for the decoder that PROMPT_TUNING
never uses). With PEFT, the caller supplies the rest of the encoder input itself: the template text up to the
answer followed by ``<extra_id_0>``; the generated answer starts after a leading ``<extra_id_0>``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from launcher.errors import UserError
from launcher.io import atomic_dir, atomic_path, remove_stale_tmp, write_json
from launcher.prompt_template import TaskTemplate, parse_templates

FORMAT_VERSION = 1
META = "artifact.json"
TABLES = "prompts.safetensors"


def save_artifact(path: str | Path, *, tables: dict[str, torch.Tensor], templates: dict[str, TaskTemplate], style: str,
                  base: dict[str, Any], add_eos: bool, max_seq_length: int, training: dict[str, Any],
                  family: str = "gpt") -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    tasks = {}
    for task, table in tables.items():
        t = templates[task]
        if table.shape[0] != t.total_virtual_tokens:
            raise UserError(f"task '{task}': prompt table has {table.shape[0]} rows but its template says {t.total_virtual_tokens}")
        first_virtual = next((i for i, p in enumerate(t.pieces) if type(p).__name__ == "Virtual"), None)
        tasks[task] = {
            "template": t.to_dict(),
            "total_virtual_tokens": int(table.shape[0]),
            "peft_export_exact": t.total_virtual_tokens > 0 and len(t.virtual_token_splits) == 1 and first_virtual == 0,
        }
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
        _export(tmp / "export", tables, base, family)
    return path


def _export(folder: Path, tables: dict[str, torch.Tensor], base: dict[str, Any], family: str = "gpt") -> None:
    import numpy as np
    from safetensors.torch import save_file

    for task, table in tables.items():
        with atomic_path(folder / "npy" / f"{task}.npy", suffix=".npy") as tmp:
            with open(tmp, "wb") as fh:   # a file object: np.save would append .npy to a path
                np.save(fh, table.numpy())
        if table.shape[0] == 0:
            continue
        peft = folder / "peft" / task
        peft.mkdir(parents=True, exist_ok=True)
        write_json(peft / "adapter_config.json", {
            "peft_type": "PROMPT_TUNING",
            "task_type": "SEQ_2_SEQ_LM" if family == "t5" else "CAUSAL_LM",
            "num_virtual_tokens": int(table.shape[0]),
            "token_dim": int(table.shape[1]),
            "num_transformer_submodules": 1,   # t5: the encoder only (see the module docstring)
            "num_attention_heads": base.get("num_attention_heads"),
            "num_layers": base.get("num_layers"),
            "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": None,
            "tokenizer_name_or_path": base.get("resolved"),
            "base_model_name_or_path": base.get("resolved"),
            "inference_mode": True,
            "revision": None,
        })
        with atomic_path(peft / "adapter_model.safetensors") as tmp:
            save_file({"prompt_embeddings": table.contiguous()}, str(tmp))


def load_artifact(path: str | Path, key: str = "model.artifact_path") -> tuple[dict[str, Any], dict[str, TaskTemplate], dict[str, torch.Tensor]]:
    """(meta, templates, tables); a missing or malformed artifact is a UserError naming ``key``."""
    from safetensors.torch import load_file

    p = Path(str(path)).expanduser()
    if not (p / META).is_file() or not (p / TABLES).is_file():
        raise UserError(f"{key}={path}: not a prompt artifact (needs {META} and {TABLES}); point it at the artifact_path of a prompt_learning run")
    try:
        meta = json.loads((p / META).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{key}={path}: {META} is not valid JSON ({exc.msg}); re-run prompt_learning to rewrite it") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{key}={path}: artifact format version {meta.get('format_version')} is not supported (expected {FORMAT_VERSION})")
    raw = load_file(str(p / TABLES))
    templates = parse_templates([t["template"] for t in meta["tasks"].values()], f"{key}/{META}:tasks")
    tables = {}
    for task in meta["tasks"]:
        name = f"prompt_table.{task}"
        if name not in raw:
            raise UserError(f"{key}={path}: {TABLES} has no tensor {name}; the artifact is damaged, re-run prompt_learning")
        tables[task] = raw[name]
    return meta, templates, tables


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
    got_fp = fingerprint.get("sha256")
    if want.get("fingerprint", {}).get("sha256") != got_fp:
        raise UserError(
            f"artifact {artifact_path} was trained on base model {want.get('language_model_path')} "
            f"(fingerprint {want.get('fingerprint', {}).get('sha256')}, hidden {want.get('hidden_size')}), but {key} points to "
            f"{language_model_path} (fingerprint {got_fp}, hidden {fingerprint.get('hidden_size')}); "
            f"use the base model the prompts were tuned on, or re-tune the prompts for this model"
        )


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
