"""A NeMo GPT ``.nemo`` base model (the NeMo launcher's GPT-2 architecture, seeded random weights) given as
``model.language_model_path`` trains a prompt like any other model: converted once into the cache, then the
usual recipe; the artifact records the .nemo as its base model. A NeMo prompt-learning ``.nemo`` given as
``model.restore_path`` brings its task along as an existing (frozen) task."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytorch_lightning")

from tests.support import nemo  # noqa: E402
from tests.support import nemo_prompts as NP  # noqa: E402
from tests.support.records import sent_records, write_jsonl  # noqa: E402
from tests.support.templates import SENT_T, SQUAD_T  # noqa: E402
from tests.support.training import make_cfg, tables, train  # noqa: E402


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


def test_new_task_on_top_of_a_nemo_p_tuned_task(tmp_path, tiny):
    """NeMo >= 1.17 p-tuned squad (an mlp encoder, hidden 32 as the tiny Llama) restored, sentiment tuned on top:
    squad in the new artifact is bit for bit the table NeMo's encoder produces."""
    mods = NP.v117_encoder("mlp", SQUAD_T["total_virtual_tokens"], 32)
    cfg = NP.prompt_config([SQUAD_T], style="p-tuning", existing=["squad"], new=["squad"], encoder="mlp")
    prompt = NP.write_prompt_nemo(tmp_path / "megatron_gpt_prompt.nemo", cfg,
                                  {"model_weights.ckpt": NP.v117_state(mods, "squad")})
    tr = write_jsonl(tmp_path / "sent_train.jsonl", sent_records(8))
    va = write_jsonl(tmp_path / "sent_val.jsonl", sent_records(4, seed=3))
    run = make_cfg(tmp_path / "run", tiny, templates=(SQUAD_T, SENT_T), new_tasks=("sentiment",), train=tr, val=va,
                   max_steps=2, restore_path=str(prompt), existing_tasks=["squad"])
    train(run)
    got = tables(run.model.artifact_path)
    assert torch.equal(got["prompt_table.squad"], NP.reference_table(mods, "mlp"))
    assert got["prompt_table.sentiment"].shape == (6, 32)
