"""A NeMo GPT ``.nemo`` base model (the NeMo launcher's GPT-2 architecture, seeded random weights) given as
``model.language_model_path`` trains a prompt like any other model: converted once into the cache, then the
usual recipe; the artifact records the .nemo as its base model."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytorch_lightning")

from tests.support import nemo  # noqa: E402
from tests.support.training import make_cfg, train  # noqa: E402


def test_prompt_tuning_on_a_nemo_base_model(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTLAUNCH_CACHE", str(tmp_path / "cache"))
    cfg = nemo.gpt2_config(max_position_embeddings=512, encoder_seq_length=512)
    path = nemo.write_nemo(tmp_path / "megatron_gpt.nemo", cfg, {"model_weights.ckpt": nemo.random_state(cfg)})
    run = make_cfg(tmp_path / "run", str(path), max_steps=4, **{"data.max_seq_length": 512})
    train(run)
    artifact = json.loads((tmp_path / "run" / "results" / "artifact" / "artifact.json").read_text())
    assert artifact["base_model"]["model_type"] == "gpt2"
    assert [p.name for p in (tmp_path / "cache").iterdir()][0].startswith("megatron_gpt-nemo-")
    base = artifact["base_model"]
    assert base["language_model_path"] == str(path) and base["fingerprint"]["vocab_size"] == nemo.PADDED_VOCAB
    assert artifact["training"]["final_val_loss"] < 10 and artifact["tasks"]["squad"]["peft_export_exact"]
