"""The run identity: everything that determines a prompt-learning result, recorded in every checkpoint and artifact.

A resume continues only when the identity of the checkpoint equals this run's, so a sweep, a second launch or a
changed override can never continue another run's training under its own name. The identity is the stage config
minus what does not change the result (where things are written, how often to log or validate, the step limits
-- "train longer" stays one override --, speed knobs, how the work is split over processes), with content in place of paths: the base model's
fingerprint instead of ``language_model_path``, each data file's size and sha256 instead of its name. Derived facts
that decide the batches (the example count, the batching actually used) are in it too.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable, Mapping

from omegaconf import OmegaConf

from stages.common.errors import UserError

STAGE = "prompt_learning"
IGNORE_KEY = f"{STAGE}.exp_manager.resume_ignore_changes"
# config keys (relative to the stage) that do not change the result, or stand in by their content
EXCLUDED = ("run", "exp_manager", "model.artifact_path", "model.language_model_path", "model.restore_path",
            "model.data.train_ds", "model.data.validation_ds", "model.data.num_workers", "model.attn_implementation",
            "model.validate_before_training", "trainer",
            # how the work is split, not what is computed: a checkpoint resumes across layouts (same global batch)
            "model.tensor_model_parallel_size", "model.pipeline_model_parallel_size", "model.pipeline_schedule",
            "model.micro_batch_size", "model.sequence_parallel")
TRAINER_KEYS = ("precision", "gradient_clip_val", "gradient_clip_algorithm")   # the trainer keys that do count
_CHUNK = 1 << 20


def file_digest(path: str) -> dict[str, Any]:
    """Size and sha256 of one data file: a file edited in place is another file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            h.update(block)
    return {"bytes": os.path.getsize(path), "sha256": h.hexdigest()}


def _flatten(node: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(node, Mapping):
        for k in sorted(node):
            _flatten(node[k], f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = node


def run_identity(cfg: Any, *, style: str, base_fingerprint: str, data_files: Mapping[str, Iterable[str]],
                 derived: Mapping[str, Any]) -> dict[str, Any]:
    """Flat ``{key: value}``: the config keys that count (full key paths), the content that stands in for the
    excluded paths, and ``derived`` (facts computed by the run, e.g. the number of training examples)."""
    plain = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    flat: dict[str, Any] = {}
    _flatten(plain, "", flat)
    unused = "model.p_tuning" if style == "prompt-tuning" else "model.prompt_tuning"
    identity: dict[str, Any] = {}
    for key, value in flat.items():
        if key.startswith("trainer.") and key.split(".", 1)[1] in TRAINER_KEYS:
            identity[f"{STAGE}.{key}"] = value
        elif not any(key == e or key.startswith(e + ".") for e in (*EXCLUDED, unused)) and not key.startswith("_"):
            identity[f"{STAGE}.{key}"] = value
    identity[f"{STAGE}.model.language_model_path (content)"] = base_fingerprint
    for key, files in data_files.items():
        identity[f"{STAGE}.{key} (content)"] = [file_digest(str(f)) for f in files]
    identity.update({f"{STAGE}.{k} (derived)": v for k, v in derived.items()})
    return json.loads(json.dumps(identity, sort_keys=True, default=str))   # plain JSON types: what a checkpoint holds


def digest(identity: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def changed_keys(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The keys whose values differ, in order, a key absent on one side included."""
    return [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]


def ignored_keys(raw: Any) -> list[str]:
    """``exp_manager.resume_ignore_changes``: key paths, with or without the ``prompt_learning.`` prefix."""
    if raw is None:
        return []
    if isinstance(raw, str):
        raw = [raw]
    items = list(raw) if not OmegaConf.is_config(raw) else list(OmegaConf.to_container(raw))
    if any(not isinstance(k, str) or not k for k in items):
        raise UserError(f"{IGNORE_KEY}: expected a list of key paths such as [model.optim.lr], got {raw!r}")
    return [k if k.startswith(f"{STAGE}.") else f"{STAGE}.{k}" for k in items]


def matches_ignored(key: str, ignored: Iterable[str]) -> bool:
    """``prompt_learning.model.optim`` ignores every key under it; ``... (content)``/``(derived)`` by their name."""
    name = key.split(" (")[0]
    return any(name == k or name.startswith(k + ".") for k in ignored)
