"""``model_config.yaml`` of a NeMo 1.x Megatron T5/mT5 (legacy ``MegatronT5Model``), with NeMo's own defaults, mapped
onto :class:`stages.engine.megatron_t5.MegatronT5Config`, or refused with one line naming the key.

What is read is what the NeMo launcher's ``conf/training/t5/*.yaml`` and ``mt5/*.yaml`` shipped (NML 23.03 to
24.05): separate ``encoder`` / ``decoder`` sections, ``position_embedding_type: learned_absolute``,
``activation: geglu`` (``fast-geglu`` stores the same maths in one matrix), ``normalization: layernorm``,
``transformer_block_type: pre_ln``, ``bias: True``, shared token embeddings and a tied tokens head with a bias.
Everything else computes something else (relative position buckets, RMSNorm, other activations, post-LN, ...) and
is refused before anything is read or written. Defaults are NeMo's, read from v1.23.0
``token_level_encoder_decoder.py`` (``encoder_cfg.get(key, default)``) and ``megatron_lm_encoder_decoder_model.py``.
NeMo Framework Launcher 24.07+ configs set ``mcore_t5: True`` (megatron-core T5, other key names): refused, not read
yet.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stages.common.errors import UserError

# per stack (encoder./decoder.): keys that must keep the value the launcher shipped (NeMo's default when absent)
_STACK_MUST_BE = {
    "arch": ("transformer",),
    "position_embedding_type": ("learned_absolute",),
    "normalization": ("layernorm",),
    "transformer_block_type": ("pre_ln",),
    "bias": (True,),
    "headscale": (False,),
    "megatron_legacy": (False,),
    "normalize_attention_scores": (True,),
    "num_moe_experts": (None, 1),
    "num_self_attention_per_cross_attention": (None, 1),
}
_STACK_DEFAULTS = {"arch": "transformer", "position_embedding_type": "learned_absolute", "normalization": "layernorm",
                   "transformer_block_type": "pre_ln", "bias": True, "headscale": False, "megatron_legacy": False,
                   "normalize_attention_scores": True, "num_moe_experts": 1, "num_self_attention_per_cross_attention": 1}
_ACTIVATIONS = ("geglu", "fast-geglu")
# top level: key -> values read (NeMo's default first)
_TOP_MUST_BE = {
    "mcore_t5": (False,),
    "share_token_embeddings": (True,),
    "share_decoder_tokens_head_embeddings": (True,),
    "tokens_head_bias": (True,),
    "pipeline_model_parallel_size": (1,),
    "hiddens": (None,),
}
TOKENIZER_LIBRARIES = {"megatron": ("BertWordPieceCase", "BertWordPieceLowerCase"), "sentencepiece": (None,)}
_READ = ("promptlaunch reads the NeMo launcher's T5/mT5 (learned_absolute positions, geglu, layernorm, pre_ln, "
         "biases, shared embeddings)")


@dataclass(frozen=True)
class T5Arch:
    """What the model and the importer need from ``model_config.yaml``."""

    encoder_layers: int
    decoder_layers: int
    hidden: int
    heads: int
    kv_channels: int
    ffn: int
    eps: float
    gelu: str           # "tanh" or "erf"
    fast_glu: bool      # fast-geglu: both halves in dense_h_to_4h ([gate; up] per tensor-parallel rank)
    max_positions: int
    tp: int
    make_divisible_by: int


def is_t5(cfg: Any) -> bool:
    """A NeMo encoder-decoder (T5/mT5) config rather than a GPT one."""
    return isinstance(cfg, dict) and (("encoder" in cfg and "decoder" in cfg) or "T5" in str(cfg.get("target", "")))


def _refuse(where: str, key: str, value: Any, why: str, default: bool = False) -> UserError:
    shown = f"{value} (NeMo's default)" if default else value
    return UserError(f"{where}: model_config.yaml {key}: {shown} {why}; {_READ}")


def _stack(cfg: dict, name: str, where: str) -> dict[str, Any]:
    section = cfg.get(name)
    if not isinstance(section, dict):
        raise UserError(f"{where}: model_config.yaml {name}: missing (an old NeMo T5 config without separate encoder "
                        f"and decoder sections); {_READ}")
    for k, allowed in _STACK_MUST_BE.items():
        value = section.get(k, _STACK_DEFAULTS[k])
        if value not in allowed:
            raise _refuse(where, f"{name}.{k}", value, "computes something else than the NeMo launcher's T5",
                          default=k not in section)
    activation = section.get("activation", "gelu")
    if activation not in _ACTIVATIONS:
        raise _refuse(where, f"{name}.activation", activation, "is not geglu (the NeMo launcher's T5/mT5 activation)",
                      default="activation" not in section)
    for k in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size"):
        if not isinstance(section.get(k), int) or section[k] <= 0:
            raise UserError(f"{where}: model_config.yaml {name}.{k}: {section.get(k)} is not a positive integer; the "
                            ".nemo config is damaged")
    hidden, heads = section["hidden_size"], section["num_attention_heads"]
    kv = section.get("kv_channels")
    if kv is None:
        if hidden % heads:
            raise _refuse(where, f"{name}.num_attention_heads", heads, f"does not divide hidden_size {hidden}")
        kv = hidden // heads
    fusion = bool(section.get("bias_activation_fusion", True))
    return {"layers": section["num_layers"], "hidden": hidden, "heads": heads, "kv": int(kv),
            "ffn": section["ffn_hidden_size"], "eps": float(section.get("layernorm_epsilon", 1e-5)),
            "gelu": "tanh" if fusion or section.get("openai_gelu", False) else "erf",
            "fast_glu": activation == "fast-geglu"}


def parse(cfg: Any, where: str) -> T5Arch:
    """The architecture of a NeMo T5/mT5 config, or a UserError naming the ``model_config.yaml`` key."""
    if not isinstance(cfg, dict):
        raise UserError(f"{where}: model_config.yaml is not a mapping of keys; the .nemo is damaged")
    for k, allowed in _TOP_MUST_BE.items():
        if k in cfg and cfg[k] not in allowed:
            why = ("(megatron-core T5, NeMo Framework Launcher 24.07+) is not read yet" if k == "mcore_t5"
                   else "is not read (the NeMo launcher's T5/mT5 have it at its default)")
            raise _refuse(where, k, cfg[k], why)
    enc, dec = _stack(cfg, "encoder", where), _stack(cfg, "decoder", where)
    for k, key in (("hidden", "hidden_size"), ("heads", "num_attention_heads"), ("kv", "kv_channels"),
                   ("ffn", "ffn_hidden_size"), ("eps", "layernorm_epsilon"), ("gelu", "bias_activation_fusion"),
                   ("fast_glu", "activation")):
        if enc[k] != dec[k]:
            value = cfg["decoder"].get(key, f"{dec[k]} (NeMo's default)")
            raise _refuse(where, f"decoder.{key}", value, f"differs from the encoder's ({enc[k]})")
    if not isinstance(cfg.get("max_position_embeddings"), int) or cfg["max_position_embeddings"] <= 0:
        raise UserError(f"{where}: model_config.yaml max_position_embeddings: {cfg.get('max_position_embeddings')} is "
                        "not a positive integer; the .nemo config is damaged")
    return T5Arch(encoder_layers=enc["layers"], decoder_layers=dec["layers"], hidden=enc["hidden"], heads=enc["heads"],
                  kv_channels=enc["kv"], ffn=enc["ffn"], eps=enc["eps"], gelu=enc["gelu"], fast_glu=enc["fast_glu"],
                  max_positions=cfg["max_position_embeddings"], tp=int(cfg.get("tensor_model_parallel_size") or 1),
                  make_divisible_by=int(cfg.get("make_vocab_size_divisible_by") or 128))


def tokenizer_settings(cfg: dict, where: str) -> dict[str, Any]:
    """The ``tokenizer`` section as NeMo's ``MegatronT5Model._build_vocab`` reads it, checked (library and type)."""
    tok = cfg.get("tokenizer") or {}
    library, kind = tok.get("library"), tok.get("type")
    if library not in TOKENIZER_LIBRARIES:
        raise UserError(f"{where}: model_config.yaml tokenizer.library: {library} is not read; promptlaunch reads the "
                        "NeMo launcher's T5 tokenizers (megatron BertWordPieceCase vocab.txt, sentencepiece model)")
    if library == "megatron" and kind not in TOKENIZER_LIBRARIES["megatron"]:
        raise UserError(f"{where}: model_config.yaml tokenizer.type: {kind} is not read with library megatron "
                        "(BertWordPieceCase or BertWordPieceLowerCase)")
    if tok.get("additional_special_tokens"):
        raise UserError(f"{where}: model_config.yaml tokenizer.additional_special_tokens: is not read (the NeMo "
                        "launcher's T5/mT5 add none)")
    if library == "sentencepiece" and tok.get("sentencepiece_legacy", True) is not True:
        raise UserError(f"{where}: model_config.yaml tokenizer.sentencepiece_legacy: "
                        f"{tok.get('sentencepiece_legacy')} cannot add T5's special tokens (NeMo refuses it too)")
    dataset_type = (cfg.get("data") or {}).get("dataset_type", "t5")
    return {"library": library, "lower_case": kind == "BertWordPieceLowerCase",
            "file": tok.get("vocab_file") if library == "megatron" else tok.get("model"),
            "file_key": "tokenizer.vocab_file" if library == "megatron" else "tokenizer.model",
            "sentinels": int(tok.get("num_sentinel_tokens") or 0), "ul2": dataset_type == "ul2",
            "reverse": bool(tok.get("add_sentinel_tokens_in_reverse_order", False)),
            "sentinels_first": bool(tok.get("add_sentinel_tokens_first", False))}


def padded_vocab(size: int, arch: T5Arch) -> int:
    """NeMo's ``_vocab_size_with_padding``: up to a multiple of ``make_vocab_size_divisible_by`` x TP."""
    multiple = arch.make_divisible_by * arch.tp
    return -(-size // multiple) * multiple


def hf_config(arch: T5Arch, vocab_size: int, ids: dict[str, int | None]) -> dict[str, Any]:
    """config.json of the converted folder (``vocab_size`` = NeMo's padded vocabulary, rows kept)."""
    from stages.engine.megatron_t5 import MODEL_TYPE

    return {"architectures": ["MegatronT5ForConditionalGeneration"], "model_type": MODEL_TYPE,
            "vocab_size": vocab_size, "hidden_size": arch.hidden, "num_layers": arch.encoder_layers,
            "num_decoder_layers": arch.decoder_layers, "num_attention_heads": arch.heads,
            "kv_channels": arch.kv_channels, "ffn_hidden_size": arch.ffn, "max_position_embeddings": arch.max_positions,
            "layernorm_epsilon": arch.eps, "gelu": arch.gelu, "fast_glu": arch.fast_glu, "is_encoder_decoder": True,
            "tie_word_embeddings": False, **{k: v for k, v in ids.items() if v is not None}}
