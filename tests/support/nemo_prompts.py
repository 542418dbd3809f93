"""NeMo prompt-learning ``.nemo`` fixtures, built from the key names in NeMo's own sources (not from our writer).

* NeMo <= 1.16 (``prompt_table.py``: ``PromptTable`` of ``PromptEmbedding``; ``megatron_base_prompt_learning_model.py``
  ``state_dict``): ``{'prompt_table': {'prompt_table.<task>.prompt_embeddings.weight', 'prompt_table.<task>.indices'}}``,
  or the same keys flat under ``prompt_table.`` (older files, still read by NeMo's ``load_state_dict``); the config
  as ``update_config_for_inference_and_save`` leaves it (``virtual_prompt_style: inference``, ``new_tasks: []``).
* NeMo >= 1.17 (``prompt_encoder.py``: ``PromptEncoder.state_dict``): ``prompt_table`` (the ``InferenceTable``, left
  zeroed here as a train-mode forward leaves it), ``embeddings`` (``nn.Embedding``), and ``mlp_head``
  (``nn.Sequential(Linear, ReLU, Linear)``), ``lstm_head`` (bidirectional batch-first ``nn.LSTM``) + ``mlp_head``
  (``Linear(2h, 2h), ReLU, Linear(2h, H)``), or ``tpmlp`` (``first``/``second`` linears); the config as
  ``MegatronGPTPromptLearningModel.init_model`` leaves it (``existing_tasks = existing + new``).

The modules are torch's own, built as NeMo builds them, so ``reference_table`` is the encoder's forward run by
torch, an independent check of the importer's recomputation.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

from tests.support import nemo

GPT_PROMPT_TARGET = ("nemo.collections.nlp.models.language_modeling.megatron_gpt_prompt_learning_model."
                     "MegatronGPTPromptLearningModel")
NO_TOKENIZER = tuple(nemo.tokenizer_files())


def prompt_config(templates: list[dict[str, Any]], *, style: str, existing: list[str], new: list[str],
                  encoder: str | None = None, nemo_version: str = "1.23.0") -> dict[str, Any]:
    cfg: dict[str, Any] = {"target": GPT_PROMPT_TARGET, "nemo_version": nemo_version,
                           "nemo_path": "/results/prompt_learning_gpt3/megatron_gpt_prompt.nemo", "virtual_prompt_style": style,
                           "language_model_path": "/results/gpt3_5b/convert_nemo/results/megatron_gpt.nemo",
                           "existing_tasks": existing, "new_tasks": new, "task_templates": templates,
                           "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1}
    if encoder is not None:
        cfg["p_tuning"] = {"encoder_type": encoder, "num_layers": 2, "dropout": 0.0, "encoder_hidden": 16,
                           "init_std": 0.023}
    return cfg


def v116_state(tables: dict[str, Any], flat: bool = False) -> dict[str, Any]:
    import torch

    entries: dict[str, Any] = OrderedDict()
    for task, w in tables.items():
        entries[f"prompt_table.{task}.prompt_embeddings.weight"] = w
        entries[f"prompt_table.{task}.indices"] = torch.arange(w.shape[0], dtype=torch.long)
    if flat:
        return OrderedDict((f"prompt_table.{k}", v) for k, v in entries.items())
    return {"prompt_table": entries}


def v117_encoder(encoder: str, tokens: int, hidden: int, enc_hidden: int = 16, seed: int = 0) -> dict[str, Any]:
    """The torch modules of a NeMo >= 1.17 ``PromptEncoder`` of ``encoder`` type, seeded."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    mods: dict[str, Any] = {"embeddings": nn.Embedding(tokens, hidden)}
    if encoder == "mlp":
        mods["mlp_head"] = nn.Sequential(nn.Linear(hidden, enc_hidden), nn.ReLU(), nn.Linear(enc_hidden, enc_hidden),
                                         nn.ReLU(), nn.Linear(enc_hidden, hidden))   # num_layers: 3
    elif encoder == "lstm":
        mods["lstm_head"] = nn.LSTM(input_size=hidden, hidden_size=enc_hidden, num_layers=2, dropout=0.0,
                                    bidirectional=True, batch_first=True)
        mods["mlp_head"] = nn.Sequential(nn.Linear(2 * enc_hidden, 2 * enc_hidden), nn.ReLU(),
                                         nn.Linear(2 * enc_hidden, hidden))
    elif encoder == "tpmlp":
        g = torch.Generator().manual_seed(seed + 1)
        mods["tpmlp"] = {"first.weight": torch.randn(enc_hidden, hidden, generator=g) * 0.3,
                         "first.bias": torch.randn(enc_hidden, generator=g) * 0.3,
                         "second.weight": torch.randn(hidden, enc_hidden, generator=g) * 0.3,
                         "second.bias": torch.randn(hidden, generator=g) * 0.3}
    return mods


def v117_state(mods: dict[str, Any], task: str, version: str = "1.23") -> dict[str, Any]:
    """``PromptEncoder.state_dict()``: the inference table zeroed (stale), ``indices`` persistent before 1.20."""
    import torch

    w = mods["embeddings"].weight
    table: dict[str, Any] = OrderedDict([(f"prompt_table.{task}.prompt_embeddings.weight", torch.zeros_like(w))])
    if version < "1.20":
        table[f"prompt_table.{task}.indices"] = torch.arange(w.shape[0], dtype=torch.long)
    state: dict[str, Any] = {"prompt_table": table, "embeddings": mods["embeddings"].state_dict()}
    for name in ("mlp_head", "lstm_head"):
        if name in mods:
            state[name] = mods[name].state_dict()
    if "tpmlp" in mods:
        state["tpmlp"] = OrderedDict(mods["tpmlp"])
    return state


def reference_table(mods: dict[str, Any], encoder: str) -> Any:
    """``PromptEncoder._forward`` run by torch's modules (eval mode), squeezed to ``[T, H]``."""
    import torch

    with torch.no_grad():
        emb = mods["embeddings"]
        x = emb(torch.arange(emb.num_embeddings)).unsqueeze(0)
        if encoder == "embedding":
            out = x
        elif encoder == "mlp":
            out = mods["mlp_head"].eval()(x)
        elif encoder == "lstm":
            out = mods["mlp_head"].eval()(mods["lstm_head"].eval()(x)[0])
        else:   # TPMLP.forward at TP=1: matmul, fused_bias_gelu (NeMo's bias_gelu constants), matmul + bias
            p = mods["tpmlp"]
            z = p["first.bias"] + torch.matmul(x, p["first.weight"].t())
            h = z * 0.5 * (1.0 + torch.tanh(0.79788456 * z * (1 + 0.044715 * z * z)))
            out = torch.matmul(h, p["second.weight"].t()) + p["second.bias"]
        return out.squeeze(0)


def write_prompt_nemo(target: Path, cfg: dict[str, Any], weights: dict[str, Any], **kw: Any) -> Path:
    """A prompt-learning ``.nemo`` (no tokenizer files: NeMo's prompt models register none)."""
    return nemo.write_nemo(target, cfg, weights, drop=NO_TOKENIZER, **kw)
