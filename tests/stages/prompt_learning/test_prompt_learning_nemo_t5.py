"""A NeMo T5 ``.nemo`` base model (tiny, RANDOMLY INITIALISED; no real T5 weights exist offline) in the prompt
learning stage: an encoder input longer than its learned positions is refused in one line naming
``model.data.max_seq_length`` (NeMo's T5 prompt learning defaults it to the model's ``max_position_embeddings``),
and the model's own limit trains."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytorch_lightning")
pytest.importorskip("sentencepiece")

from stages.common.errors import UserError  # noqa: E402
from tests.support import nemo_t5  # noqa: E402
from tests.support.training import make_cfg, train  # noqa: E402


def test_max_seq_length_against_the_learned_positions(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTLAUNCH_CACHE", str(tmp_path / "cache"))
    cfg, tok = nemo_t5.t5_config("mt5", max_position_embeddings=64), nemo_t5.tokenizer_member("mt5")
    state = nemo_t5.random_legacy_state(cfg, nemo_t5.nemo_vocab_size("mt5", tok, cfg))
    path = nemo_t5.write(tmp_path / "megatron_mt5.nemo", cfg, {"model_weights.ckpt": state}, tok)
    with pytest.raises(UserError, match=r"^prompt_learning\.model\.data\.max_seq_length: 128 is longer than the 64 "
                                         r"positions of .*megatron_mt5\.nemo \(learned absolute positions\); set it to "
                                         r"at most 64$"):
        train(make_cfg(tmp_path / "long", str(path), max_steps=2))
    train(make_cfg(tmp_path / "run", str(path), max_steps=2, **{"data.max_seq_length": 64}))
    artifact = json.loads((tmp_path / "run" / "results" / "artifact" / "artifact.json").read_text())
    assert artifact["family"] == "t5" and artifact["base_model"]["model_type"] == "megatron_t5"
