"""``.nemo`` fixtures written the way NeMo 1.x writes them, for the importer's tests.

A ``.nemo`` here is what ``SaveRestoreConnector`` makes: ``tarfile.open(name, "w:")`` (``"w:gz"`` before NeMo 1.7)
with ``add(folder, arcname=".")``, so members are ``./model_config.yaml``, ``./model_weights.ckpt`` (a plain
``torch.save(state_dict)``) or ``./mp_rank_XX/model_weights.ckpt``, and the tokenizer files as
``./<32 hex>_vocab.json`` named ``nemo:<32 hex>_vocab.json`` in the config. Key spellings:

  * ``mcore``: megatron-core's own ``GPTModel.state_dict()`` under ``model.`` (local layer spec names);
  * ``mcore_te``: the same with TransformerEngine's fused layernorm names, as NeMo 1.21-1.23 saved them
    (``input_layernorm.`` -> ``self_attention.linear_qkv.layer_norm_``, megatron-core's
    ``sharded_state_dict_keys_map``), plus an ``_extra_state`` entry per linear;
  * ``legacy``: NeMo's legacy names, the inverse of ``build_key_mapping`` in NeMo's
    ``scripts/nlp_language_modeling/convert_nemo_gpt_to_mcore.py`` (1:1 tensors; a non-fast GLU's second half
    as ``dense_h_to_4h_2``).

The tokenizer is a GPT-2 byte-level BPE with no merges: the 256 byte symbols and ``<|endoftext|>``, 257 tokens
(padded to 384 by ``make_vocab_size_divisible_by: 128`` as GPT-2's 50257 becomes 50304).
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import yaml

UUID_VOCAB = "0123456789abcdef0123456789abcdef"
UUID_MERGES = "fedcba9876543210fedcba9876543210"
VOCAB = 257
PADDED_VOCAB = 384


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte (the byte-level BPE alphabet), in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            codes.append(256 + extra)
            extra += 1
    table = dict(zip(keep, codes))
    return [chr(table[b]) for b in range(256)]


def tokenizer_files() -> dict[str, bytes]:
    vocab = {s: i for i, s in enumerate(byte_symbols())}
    vocab["<|endoftext|>"] = 256
    return {f"{UUID_VOCAB}_vocab.json": json.dumps(vocab).encode(),
            f"{UUID_MERGES}_merges.txt": b"#version: 0.2\n"}


def gpt2_config(**over: Any) -> dict[str, Any]:
    """The NeMo launcher's gpt3 recipe shape, tiny: keys absent take NeMo's defaults (learned_absolute,
    layernorm, gelu, bias, tied)."""
    cfg = {"target": "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel",
           "nemo_version": "1.23.0", "mcore_gpt": True, "precision": 32,
           "num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 4,
           "max_position_embeddings": 16, "encoder_seq_length": 16, "make_vocab_size_divisible_by": 128,
           "layernorm_epsilon": 1e-5, "bias_activation_fusion": True, "hidden_dropout": 0.0, "attention_dropout": 0.0,
           "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
           "tokenizer": {"library": "megatron", "type": "GPT2BPETokenizer", "model": None,
                         "vocab_file": f"nemo:{UUID_VOCAB}_vocab.json", "merge_file": f"nemo:{UUID_MERGES}_merges.txt"}}
    cfg.update(over)
    return cfg


def llama_config(**over: Any) -> dict[str, Any]:
    """A NeMo Llama-style config: rope, rmsnorm, fast-swiglu, no biases, grouped-query attention, untied."""
    return gpt2_config(**{"position_embedding_type": "rope", "normalization": "rmsnorm", "activation": "fast-swiglu",
                          "bias": False, "bias_activation_fusion": False, "num_query_groups": 2,
                          "share_embeddings_and_output_weights": False, "rotary_base": 5000, **over})


def random_state(cfg: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Seeded random tensors of the right shapes in mcore names (for the bad-input tests, no megatron-core)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    h, f, L = cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["num_layers"]
    heads = cfg["num_attention_heads"]
    groups = cfg.get("num_query_groups") or heads
    hd = h // heads
    gated = str(cfg.get("activation", "gelu")).endswith("glu")
    bias = cfg.get("bias", True)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    st = {"model.embedding.word_embeddings.weight": r(PADDED_VOCAB, h)}
    if cfg.get("position_embedding_type", "learned_absolute") == "learned_absolute":
        st["model.embedding.position_embeddings.weight"] = r(cfg["max_position_embeddings"], h)
    for i in range(L):
        p = f"model.decoder.layers.{i}."
        shapes = {"input_layernorm.weight": (h,), "self_attention.linear_qkv.weight": ((heads + 2 * groups) * hd, h),
                  "self_attention.linear_proj.weight": (h, heads * hd), "pre_mlp_layernorm.weight": (h,),
                  "mlp.linear_fc1.weight": ((2 if gated else 1) * f, h), "mlp.linear_fc2.weight": (h, f)}
        for name, shape in shapes.items():
            st[p + name] = r(*shape)
            if bias or "layernorm" in name:
                st[p + name.replace("weight", "bias")] = r(shape[0])
    st["model.decoder.final_layernorm.weight"] = r(h)
    st["model.decoder.final_layernorm.bias"] = r(h)
    if not cfg.get("share_embeddings_and_output_weights", True):
        st["model.output_layer.weight"] = r(PADDED_VOCAB, h)
    return st


def to_te_names(state: dict[str, Any]) -> dict[str, Any]:
    """mcore local-spec names -> the TransformerEngine fused-layernorm names NeMo 1.21-1.23 saved."""
    out: dict[str, Any] = {}
    for k, v in state.items():
        k = k.replace(".input_layernorm.", ".self_attention.linear_qkv.layer_norm_")
        k = k.replace(".pre_mlp_layernorm.", ".mlp.linear_fc1.layer_norm_")
        out[k] = v
    for k in list(out):
        if k.endswith((".linear_proj.weight", ".linear_qkv.weight", ".linear_fc1.weight", ".linear_fc2.weight")):
            out[k.rsplit(".", 1)[0] + "._extra_state"] = None
    return out


def to_legacy_names(state: dict[str, Any], split_glu: bool = False) -> dict[str, Any]:
    """mcore names -> NeMo's legacy names (inverse of ``build_key_mapping``); ``split_glu``: a non-fast GLU,
    the first MLP linear written as ``dense_h_to_4h`` (gate) and ``dense_h_to_4h_2`` (up)."""
    layer = {"input_layernorm": "input_layernorm", "self_attention.linear_qkv": "self_attention.query_key_value",
             "self_attention.linear_proj": "self_attention.dense", "pre_mlp_layernorm": "post_attention_layernorm",
             "mlp.linear_fc1": "mlp.dense_h_to_4h", "mlp.linear_fc2": "mlp.dense_4h_to_h"}
    glob = {"model.embedding.word_embeddings.weight": "model.language_model.embedding.word_embeddings.weight",
            "model.embedding.position_embeddings.weight": "model.language_model.embedding.position_embeddings.weight",
            "model.decoder.final_layernorm.weight": "model.language_model.encoder.final_layernorm.weight",
            "model.decoder.final_layernorm.bias": "model.language_model.encoder.final_layernorm.bias",
            "model.output_layer.weight": "model.language_model.output_layer.weight"}
    out: dict[str, Any] = {}
    for k, v in state.items():
        if k.endswith("_extra_state"):
            continue
        if k in glob:
            out[glob[k]] = v
            continue
        i, rest = k[len("model.decoder.layers."):].split(".", 1)
        mod, wb = rest.rsplit(".", 1)
        new = f"model.language_model.encoder.layers.{i}.{layer[mod]}"
        if split_glu and mod == "mlp.linear_fc1":
            gate, up = v.chunk(2, dim=0)
            out[f"{new}.{wb}"], out[f"model.language_model.encoder.layers.{i}.mlp.dense_h_to_4h_2.{wb}"] = gate, up
        else:
            out[f"{new}.{wb}"] = v
    return out


def tree_files(folder: Path, under: str) -> dict[str, bytes]:
    """Every file below ``folder`` as members under ``under/`` (a distributed checkpoint's ``model_weights/``)."""
    return {f"{under}/{p.relative_to(folder)}": p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_nemo(target: Path, cfg: dict[str, Any], weights: dict[str, Any], *, gzip: bool = False,
               folder: bool = False, drop: tuple[str, ...] = (), files: dict[str, bytes] | None = None) -> Path:
    """Write a .nemo: ``weights`` maps member paths (``model_weights.ckpt``, ``mp_rank_01/model_weights.ckpt``) to
    state dicts, ``files`` member paths to raw bytes; ``folder``: the unpacked folder instead; ``drop``: members
    to leave out."""
    import torch

    members: dict[str, bytes] = {"model_config.yaml": yaml.safe_dump(cfg).encode(), **tokenizer_files(), **(files or {})}
    for name, state in weights.items():
        buf = io.BytesIO()
        torch.save(state, buf)
        members[name] = buf.getvalue()
    members = {k: v for k, v in members.items() if k not in drop}
    if folder:
        for name, data in members.items():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(data)
        return target
    with tarfile.open(target, "w:gz" if gzip else "w:") as tar:
        dirs = sorted({n.rsplit("/", 1)[0] for n in members if "/" in n})
        for d in dirs:
            info = tarfile.TarInfo(f"./{d}")
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for name, data in sorted(members.items()):
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return target
