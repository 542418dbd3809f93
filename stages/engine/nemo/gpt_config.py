"""``model_config.yaml`` of a NeMo 1.x GPT model, with NeMo's own defaults, and the ONE mapping to a Hugging Face
architecture.

Why one mapping and refusals: a model that is loaded approximately trains and answers without any error, only
worse, and nobody finds out. So a config maps to a HF class only where the maths is the same, and every other
value is refused with one line naming the ``model_config.yaml`` key and value:

  * GPT-2 (``GPT2LMHeadModel``), the NeMo launcher's ``gpt3`` default: learned absolute positions, LayerNorm,
    GeLU (tanh form when ``bias_activation_fusion`` or ``openai_gelu`` is on, as every fused kernel runs it; erf
    otherwise), biases, multi-head attention with ``kv_channels = hidden/heads``, tied or untied output;
  * Llama (``LlamaForCausalLM``): RoPE over the whole head (``rotary_percentage`` 1, no interpolation, not
    interleaved), RMSNorm, SwiGLU (``swiglu``/``fast-swiglu``), any ``num_query_groups``, biases or none.

Defaults are NeMo's (``megatron_gpt_model.py``, v1.23): a key absent from the file means what NeMo did with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stages.common.errors import UserError

# model_config.yaml keys that must keep NeMo's default (a different value maps to no HF class exactly)
_MUST_BE = {
    "transformer_block_type": ("pre_ln",),
    "headscale": (False,),
    "apply_residual_connection_post_layernorm": (False,),
    "normalize_attention_scores": (True,),
    "rotary_interleaved": (False,),
    "seq_len_interpolation_factor": (None,),
    "megatron_legacy": (False,),
    "layernorm_zero_centered_gamma": (False,),
    "qk_layernorm": (False,),
    "num_moe_experts": (None, 1),
    "window_size": (None,),
    "virtual_pipeline_model_parallel_size": (None, 1),
}


@dataclass(frozen=True)
class GPTArch:
    """What the weights and the HF config need from model_config.yaml."""

    family: str                 # gpt2 | llama
    num_layers: int
    hidden: int
    ffn: int
    heads: int
    groups: int                 # key/value heads
    head_dim: int
    max_positions: int
    eps: float
    bias: bool
    gated: bool
    tied: bool
    gelu: str                   # gelu_new (tanh) | gelu (erf); gpt2 only
    rope_base: float
    tp: int
    pp: int
    raw: dict


def parse(cfg: Any, where: str) -> GPTArch:
    """Check a loaded model_config.yaml (``where`` = ``key=path`` for the messages) and map it."""
    if not isinstance(cfg, dict):
        raise UserError(f"{where}: model_config.yaml is not a mapping of keys; the .nemo is damaged")

    def get(k: str, default: Any) -> Any:
        v = cfg.get(k, default)
        return default if v is None and default is not None else v

    def refuse(k: str, why: str, value: Any = None) -> UserError:
        shown = cfg[k] if k in cfg else f"{value} (NeMo's default)"
        return UserError(f"{where}: model_config.yaml {k}: {shown} {why}; promptlaunch loads only models it "
                         "can map exactly (GPT-2: learned_absolute + layernorm + gelu; Llama: rope + rmsnorm + swiglu)")

    for k in ("num_layers", "hidden_size", "num_attention_heads"):
        if not isinstance(cfg.get(k), int) or cfg[k] <= 0:
            raise UserError(f"{where}: model_config.yaml {k}: {cfg.get(k)} is not a positive integer; the .nemo "
                            "config is damaged")
    for k, allowed in _MUST_BE.items():
        if k in cfg and cfg[k] not in allowed:
            raise refuse(k, "has no exact Hugging Face equivalent")
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    ffn = get("ffn_hidden_size", 4 * hidden)
    groups = get("num_query_groups", heads)
    head_dim = get("kv_channels", hidden // heads)
    if hidden % heads and "kv_channels" not in cfg:
        raise refuse("num_attention_heads", f"does not divide hidden_size {hidden}")
    if heads % groups:
        raise refuse("num_query_groups", f"does not divide num_attention_heads {heads}", groups)
    position = get("position_embedding_type", "learned_absolute")
    norm = get("normalization", "layernorm")
    activation = get("activation", "gelu")
    bias = bool(get("bias", True))
    fusion = bool(get("bias_activation_fusion", True))
    common = dict(
        num_layers=cfg["num_layers"], hidden=hidden, ffn=ffn, heads=heads, groups=groups, head_dim=head_dim,
        max_positions=get("max_position_embeddings", get("encoder_seq_length", 2048)),
        eps=float(get("layernorm_epsilon", 1e-5)), bias=bias,
        tied=bool(get("share_embeddings_and_output_weights", True)),
        rope_base=float(get("rotary_base", 10000)),
        tp=int(get("tensor_model_parallel_size", 1)), pp=int(get("pipeline_model_parallel_size", 1)), raw=cfg)
    if position == "learned_absolute":
        if norm != "layernorm":
            raise refuse("normalization", "with learned_absolute positions (GPT-2 needs layernorm)", norm)
        if activation != "gelu":
            raise refuse("activation", "with learned_absolute positions (GPT-2 needs gelu)", activation)
        if not bias:
            raise refuse("bias", "with learned_absolute positions (GPT-2 has biases)", bias)
        if groups != heads:
            raise refuse("num_query_groups", f"!= num_attention_heads {heads} (GPT-2 has no grouped attention)", groups)
        if head_dim * heads != hidden:
            raise refuse("kv_channels", f"x {heads} heads != hidden_size {hidden} (GPT-2 needs equal sizes)", head_dim)
        gelu = "gelu_new" if fusion or get("openai_gelu", False) else "gelu"
        return GPTArch(family="gpt2", gated=False, gelu=gelu, **common)
    if position == "rope":
        if norm != "rmsnorm":
            raise refuse("normalization", "with rope (Llama needs rmsnorm; rope + layernorm is not read yet)", norm)
        if activation not in ("swiglu", "fast-swiglu"):
            raise refuse("activation", "with rope (Llama needs swiglu or fast-swiglu)", activation)
        if float(get("rotary_percentage", 1.0)) != 1.0:
            raise refuse("rotary_percentage", "(Llama rotates the whole head)", get("rotary_percentage", 1.0))
        return GPTArch(family="llama", gated=True, gelu="", **common)
    raise refuse("position_embedding_type", "is not learned_absolute or rope", position)


def hf_config(arch: GPTArch, vocab_size: int, tokenizer_ids: dict[str, int | None]) -> dict[str, Any]:
    """The config.json of the equivalent HF model (``vocab_size`` = NeMo's padded vocabulary, rows kept)."""
    ids = {k: v for k, v in tokenizer_ids.items() if v is not None}
    if arch.family == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab_size,
                "n_positions": arch.max_positions, "n_embd": arch.hidden, "n_layer": arch.num_layers,
                "n_head": arch.heads, "n_inner": arch.ffn, "activation_function": arch.gelu,
                "layer_norm_epsilon": arch.eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "scale_attn_weights": True, "tie_word_embeddings": arch.tied, **ids}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
            "hidden_size": arch.hidden, "intermediate_size": arch.ffn, "num_hidden_layers": arch.num_layers,
            "num_attention_heads": arch.heads, "num_key_value_heads": arch.groups, "head_dim": arch.head_dim,
            "max_position_embeddings": arch.max_positions, "rms_norm_eps": arch.eps, "hidden_act": "silu",
            "rope_theta": arch.rope_base, "attention_bias": arch.bias, "mlp_bias": arch.bias,
            "attention_dropout": 0.0, "tie_word_embeddings": arch.tied, **ids}
