"""Tiny megatron-core ``T5Model``s on CPU: the independent reference for the NeMo T5/mT5 importer.

Built as the NeMo launcher's T5 is configured (:mod:`tests.support.nemo_t5`): megatron-core's local layer specs
(``encoder_model_with_local_spec`` / ``decoder_model_with_local_spec``; given as layer specs, so each block's final
LayerNorm is megatron-core's local LayerNorm: its ``get_t5_*_with_local_block_spec`` names TransformerEngine's
``TENorm`` for it, which needs TransformerEngine), learned absolute positions shared by encoder and decoder, gated
GELU with ``bias_activation_fusion`` (megatron-core's tanh ``geglu``, NeMo's ``fused_bias_geglu``), biases,
``apply_query_key_layer_scaling`` as NeMo's default, tied output layer with a bias, seeded, random LayerNorm gains
and biases (so a swapped one shows). One gloo process, parallel state and CUDA patches as in
:mod:`tests.support.megatron_gpt`. Masks are passed explicitly as NeMo builds them (``True`` = masked):
padding x padding for the encoder, causal and padding for the decoder, decoder x encoder padding for the cross
attention.
"""
from __future__ import annotations

from typing import Any

from tests.support import megatron_gpt, nemo_t5

init_single_process = megatron_gpt.init_single_process
shutdown = megatron_gpt.shutdown


def _transformer_config(cfg: dict[str, Any], side: str) -> Any:
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    s = cfg[side]
    return TransformerConfig(
        num_layers=s["num_layers"], hidden_size=s["hidden_size"], ffn_hidden_size=s["ffn_hidden_size"],
        num_attention_heads=s["num_attention_heads"], kv_channels=s["kv_channels"], use_cpu_initialization=True,
        init_method_std=0.1, hidden_dropout=0.0, attention_dropout=0.0, add_bias_linear=s["bias"],
        bias_activation_fusion=s["bias_activation_fusion"], gated_linear_unit=True, activation_func=F.gelu,
        normalization="LayerNorm", layernorm_epsilon=s["layernorm_epsilon"],
        apply_query_key_layer_scaling=s["apply_query_key_layer_scaling"])


def build(cfg: dict[str, Any], vocab: int, seed: int = 0) -> Any:
    import torch
    from megatron.core.models.T5.t5_model import T5Model
    from megatron.core.models.T5.t5_spec import decoder_model_with_local_spec, encoder_model_with_local_spec

    torch.manual_seed(seed)
    model = T5Model(config=_transformer_config(cfg, "decoder"), encoder_config=_transformer_config(cfg, "encoder"),
                    transformer_encoder_layer_spec=encoder_model_with_local_spec(),
                    transformer_decoder_layer_spec=decoder_model_with_local_spec(), vocab_size=vocab,
                    max_sequence_length=cfg["max_position_embeddings"], share_embeddings_and_output_weights=True,
                    position_embedding_type="learned_absolute")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def masks(enc_valid: Any, dec_valid: Any) -> tuple[Any, Any, Any]:
    """(encoder, decoder, encoder-decoder) masks [b, 1, sq, sk], True = masked."""
    import torch

    e, d = enc_valid.bool(), dec_valid.bool()
    causal = torch.tril(torch.ones(d.shape[1], d.shape[1], dtype=torch.bool))
    enc = ~(e[:, None, :, None] & e[:, None, None, :])
    dec = ~(d[:, None, :, None] & d[:, None, None, :] & causal[None, None])
    cross = ~(d[:, None, :, None] & e[:, None, None, :])
    return enc, dec, cross


def forward(model: Any, enc_ids: Any, dec_ids: Any, enc_valid: Any, dec_valid: Any) -> tuple[Any, Any]:
    """megatron-core's own forward: (decoder logits [b, sd, V], encoder states [b, se, H])."""
    from unittest import mock

    import torch

    enc_mask, dec_mask, cross_mask = masks(enc_valid, dec_valid)
    with torch.no_grad(), mock.patch("torch.cuda.current_device", return_value="cpu"):
        states = model(enc_ids, dec_ids, enc_mask, dec_mask, cross_mask, output_encoder_hidden_only=True)
        logits = model(enc_ids, dec_ids, enc_mask, dec_mask, cross_mask)
    return logits, states.transpose(0, 1)


def legacy_state(model: Any, fast_glu: bool = False) -> dict[str, Any]:
    return nemo_t5.legacy_from_mcore(dict(model.state_dict()), fast_glu)


def legacy_tp_shards(model: Any, ranks: int, fast_glu: bool = False) -> list[dict[str, Any]]:
    """The model split into ``ranks`` tensor-parallel shards along megatron-core's own ``partition_dim`` marks
    (:func:`tests.support.megatron_gpt.tp_shards`), each renamed to NeMo's legacy names."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    shards = megatron_gpt.tp_shards(model, state, ranks, gated=True)
    return [nemo_t5.legacy_from_mcore({k[len("model."):]: v for k, v in s.items()}, fast_glu) for s in shards]
