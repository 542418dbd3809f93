"""Prompt artifacts for the tiny models, written by the engine itself (no training)."""
from __future__ import annotations

from pathlib import Path

from stages.engine.template import parse_templates
from tests.support.templates import SQUAD_T


def save_tiny_artifact(folder: Path, model_dir: Path) -> Path:
    """A prompt artifact for the tiny model written by the engine's own save_artifact (random table, scale 1)."""
    import torch

    from stages.engine.artifact import base_info, save_artifact
    from stages.engine.base_model import fingerprint, load_model

    model = load_model(str(model_dir))
    fp = fingerprint(model)
    torch.manual_seed(1)
    return save_artifact(folder, tables={"squad": torch.randn(4, fp["hidden_size"])}, templates=parse_templates([SQUAD_T]),
                         style="prompt-tuning", base=base_info(str(model_dir), str(model_dir), model, fp), add_eos=True,
                         max_seq_length=256, training={"note": "random table for tests"})
