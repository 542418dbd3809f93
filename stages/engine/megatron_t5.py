"""NeMo's legacy Megatron T5 (``MegatronT5Model``, NeMo 1.x) as a Hugging Face ``PreTrainedModel``: what the NeMo
launcher's ``t5/220m.yaml`` and ``mt5/390m.yaml`` trained, computed exactly, in fp32 on any device.

Why our own class: no Hugging Face class computes it. HF T5/mT5 use relative position buckets, RMSNorm without
biases, unscaled attention and no LM-head bias; this model has learned absolute positions (one table shared by
encoder and decoder), pre-LN LayerNorm with biases, attention scaled by 1/sqrt(kv_channels), GeGLU feed-forward
with biases and a tied output layer plus a bias. Read from NeMo v1.23.0:
``nemo/collections/nlp/modules/common/megatron/`` ``token_level_encoder_decoder.py`` (embeddings, tokens head),
``transformer.py`` (``ParallelTransformerLayer_``: pre_ln encoder and decoder layers, final LayerNorms),
``attention.py`` (fused QKV rows ``[heads, 3, kv_channels]``, cross-attention query and ``key_value`` rows
``[heads, 2, kv_channels]``, masked scores set to -10000 before the softmax), ``mlp.py`` / ``fused_bias_geglu.py``
(``gelu_tanh(h_to_4h(x)) * h_to_4h_2(x)``, the tanh GELU with NeMo's constants when ``bias_activation_fusion``
is on, as the launcher ran it; the erf GELU otherwise). The config keys it accepts are checked in
:mod:`stages.engine.nemo.t5_config`.

Where NeMo's legacy model and megatron-core's ``T5Model`` differ (the tests compare with megatron-core, local
spec, learned absolute positions, gated GELU, biases): megatron-core fuses the gated halves into one
``linear_fc1`` ``[gate; up]`` (legacy: ``dense_h_to_4h`` and ``dense_h_to_4h_2``; the same numbers); its cross
attention is ``linear_q`` / ``linear_kv`` with the same row layouts; both scale scores by ``1/(sqrt(d)*layer)`` and
the softmax input back by ``layer`` with ``apply_query_key_layer_scaling`` (here: ``1/sqrt(d)`` once, the same
maths). Dropout is left out (the base model is frozen and run in eval mode).

Inputs follow the HF seq2seq conventions the ``t5`` family drives: ``input_ids`` or ``inputs_embeds`` (positions
are added to them, as NeMo's prompt-learning model adds them to the virtual rows), ``attention_mask`` /
``decoder_attention_mask`` (1 = real token), ``encoder_outputs``, and a KV cache ``past_key_values`` (one tuple
``(self_k, self_v, cross_k, cross_v)`` per decoder layer, decoder positions continuing after the cached ones).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

MODEL_TYPE = "megatron_t5"
_MASKED = -10000.0          # NeMo's attention_mask_func: masked_fill(mask, -10000.0)


class MegatronT5Config(PretrainedConfig):
    """The architecture of one NeMo Megatron T5 (both stacks share hidden size, heads, kv_channels and FFN size,
    as the launcher's configs have them; the layer counts may differ)."""

    model_type = MODEL_TYPE
    attribute_map = {"num_hidden_layers": "num_layers"}

    def __init__(self, vocab_size: int = 128, hidden_size: int = 64, num_layers: int = 2, num_decoder_layers: int = 2,
                 num_attention_heads: int = 4, kv_channels: int = 16, ffn_hidden_size: int = 128,
                 max_position_embeddings: int = 512, layernorm_epsilon: float = 1e-5, gelu: str = "tanh",
                 fast_glu: bool = False, is_encoder_decoder: bool = True, tie_word_embeddings: bool = False,
                 **kwargs: Any) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_decoder_layers = num_decoder_layers
        self.num_attention_heads = num_attention_heads
        self.kv_channels = kv_channels
        self.ffn_hidden_size = ffn_hidden_size
        self.max_position_embeddings = max_position_embeddings
        self.layernorm_epsilon = layernorm_epsilon
        self.gelu = gelu                # "tanh" (bias_activation_fusion / openai_gelu) or "erf"
        self.fast_glu = fast_glu        # informative: fast-geglu stored both halves in dense_h_to_4h
        super().__init__(is_encoder_decoder=is_encoder_decoder, tie_word_embeddings=tie_word_embeddings, **kwargs)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """NeMo's ``bias_gelu`` (and megatron-core's ``geglu``), with their constants."""
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


class _Attention(nn.Module):
    """Self attention (fused ``query_key_value``) or cross attention (``query`` + ``key_value``)."""

    def __init__(self, config: MegatronT5Config, cross: bool) -> None:
        super().__init__()
        h, self.heads, self.hd = config.hidden_size, config.num_attention_heads, config.kv_channels
        proj = self.heads * self.hd
        self.cross = cross
        if cross:
            self.query = nn.Linear(h, proj)
            self.key_value = nn.Linear(h, 2 * proj)
        else:
            self.query_key_value = nn.Linear(h, 3 * proj)
        self.dense = nn.Linear(proj, h)

    def _heads(self, x: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        b, s, _ = x.shape   # rows [heads, parts, kv_channels] -> parts x [b, heads, s, kv_channels]
        return tuple(t.transpose(1, 2) for t in x.view(b, s, self.heads, parts, self.hd).unbind(3))

    def kv(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._heads(self.key_value(states), 2)
        return k, v

    def forward(self, x: torch.Tensor, mask: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                past: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, tuple]:
        """``mask``: [b, 1, sq, sk], True = masked. Self attention appends to ``past``; cross attention uses ``kv``."""
        if self.cross:
            (q,) = self._heads(self.query(x), 1)
            k, v = kv
        else:
            q, k, v = self._heads(self.query_key_value(x), 3)
            if past is not None:
                k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.hd)
        probs = torch.softmax(scores.masked_fill(mask, _MASKED).float(), dim=-1).to(v.dtype)
        ctx = torch.matmul(probs, v).transpose(1, 2).reshape(x.shape[0], x.shape[1], self.heads * self.hd)
        return self.dense(ctx), (k, v)


class _MLP(nn.Module):
    def __init__(self, config: MegatronT5Config) -> None:
        super().__init__()
        h, f = config.hidden_size, config.ffn_hidden_size
        self.dense_h_to_4h = nn.Linear(h, f)      # activated half
        self.dense_h_to_4h_2 = nn.Linear(h, f)    # linear half
        self.dense_4h_to_h = nn.Linear(f, h)
        self.act = _gelu_tanh if config.gelu == "tanh" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)) * self.dense_h_to_4h_2(x))


class _Layer(nn.Module):
    """``ParallelTransformerLayer_`` with ``transformer_block_type: pre_ln`` (encoder, or decoder with cross attention)."""

    def __init__(self, config: MegatronT5Config, decoder: bool) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.layernorm_epsilon
        self.input_layernorm = nn.LayerNorm(h, eps=eps)
        self.self_attention = _Attention(config, cross=False)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=eps)
        if decoder:
            self.inter_attention = _Attention(config, cross=True)
            self.post_inter_attention_layernorm = nn.LayerNorm(h, eps=eps)
        self.mlp = _MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cross_kv: tuple | None = None,
                cross_mask: torch.Tensor | None = None, past: tuple | None = None) -> tuple[torch.Tensor, tuple]:
        out, self_kv = self.self_attention(self.input_layernorm(x), mask, past=past)
        x = x + out
        normed = self.post_attention_layernorm(x)
        if cross_kv is not None:
            x = x + self.inter_attention(normed, cross_mask, kv=cross_kv)[0]
            normed = self.post_inter_attention_layernorm(x)
        return x + self.mlp(normed), self_kv


class _Stack(nn.Module):
    def __init__(self, config: MegatronT5Config, num_layers: int, decoder: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Layer(config, decoder) for _ in range(num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


class _Embedding(nn.Module):
    """NeMo's ``Embedding``: word + learned absolute position embeddings, one module for encoder and decoder
    (``share_token_embeddings``)."""

    def __init__(self, config: MegatronT5Config) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, start: int = 0) -> torch.Tensor:
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        positions = torch.arange(start, start + x.shape[1], device=x.device)
        return x + self.position_embeddings(positions)[None]


def _padding_mask(q_valid: torch.Tensor, k_valid: torch.Tensor) -> torch.Tensor:
    """[b, 1, sq, sk], True = masked: NeMo's ``build_attention_mask_3d`` (padding) then ``attn_mask_postprocess``."""
    return ~(q_valid[:, None, :, None].bool() & k_valid[:, None, None, :].bool())


class _EncoderView:
    """What ``model.get_encoder()`` returns: the encoder half with the shared embedding (a view, no parameters of
    its own, so nothing is saved twice)."""

    def __init__(self, model: "MegatronT5ForConditionalGeneration") -> None:
        self.model = model

    def __call__(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 inputs_embeds: torch.Tensor | None = None, return_dict: bool = True, **_: Any) -> BaseModelOutput:
        return BaseModelOutput(last_hidden_state=self.model.encode(input_ids, attention_mask, inputs_embeds))


class MegatronT5ForConditionalGeneration(PreTrainedModel):
    """NeMo's ``MegatronTokenLevelEncoderDecoderModule`` (legacy, pre_ln, learned absolute positions, GeGLU)."""

    config_class = MegatronT5Config
    base_model_prefix = "megatron_t5"
    main_input_name = "input_ids"
    _no_split_modules = ["_Layer"]

    def __init__(self, config: MegatronT5Config) -> None:
        super().__init__(config)
        self.embedding = _Embedding(config)
        self.encoder = _Stack(config, config.num_layers, decoder=False)
        self.decoder = _Stack(config, config.num_decoder_layers, decoder=True)
        self.tokens_head_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Only for weights a checkpoint lacks (none, for a converted .nemo): NeMo's init_method_std 0.02."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embedding.word_embeddings = value

    def get_output_embeddings(self) -> None:
        return None     # the head reads the word embeddings in forward; nothing to tie

    def get_encoder(self) -> _EncoderView:
        return _EncoderView(self)

    def encode(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
               inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder states [b, s, hidden] after the encoder's final LayerNorm."""
        x = self.embedding(input_ids, inputs_embeds)
        valid = attention_mask if attention_mask is not None else torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
        mask = _padding_mask(valid, valid)
        for layer in self.encoder.layers:
            x = layer(x, mask)[0]
        return self.encoder.final_layernorm(x)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None,
                encoder_outputs: Any = None, inputs_embeds: torch.Tensor | None = None,
                past_key_values: tuple | None = None, use_cache: bool | None = None,
                return_dict: bool | None = None) -> Seq2SeqLMOutput:
        """Decoder logits over the padded vocabulary (the loss is the caller's: the ``t5`` family computes it)."""
        if encoder_outputs is None:
            enc = self.encode(input_ids, attention_mask, inputs_embeds)
        else:
            enc = encoder_outputs[0] if isinstance(encoder_outputs, (tuple, list)) else encoder_outputs.last_hidden_state
        b, se = enc.shape[:2]
        enc_valid = attention_mask if attention_mask is not None else torch.ones(b, se, dtype=torch.long, device=enc.device)
        start = 0 if past_key_values is None else int(past_key_values[0][0].shape[2])
        x = self.embedding(decoder_input_ids, None, start)
        sd = x.shape[1]
        total = start + sd
        dec_valid = (decoder_attention_mask if decoder_attention_mask is not None
                     else torch.ones(b, total, dtype=torch.long, device=x.device))
        if dec_valid.shape[1] != total:     # a mask for the new tokens only: the cached ones are real
            dec_valid = torch.cat([torch.ones(b, total - dec_valid.shape[1], dtype=dec_valid.dtype, device=x.device),
                                   dec_valid], dim=1)
        q_pos = torch.arange(start, total, device=x.device)
        causal = q_pos[:, None] >= torch.arange(total, device=x.device)[None, :]
        self_mask = _padding_mask(dec_valid[:, start:], dec_valid) | ~causal[None, None]
        cross_mask = _padding_mask(dec_valid[:, start:], enc_valid)
        cache = []
        for i, layer in enumerate(self.decoder.layers):
            if past_key_values is None:
                cross_kv = layer.inter_attention.kv(enc)
                past = None
            else:
                past, cross_kv = past_key_values[i][:2], past_key_values[i][2:]
            x, self_kv = layer(x, self_mask, cross_kv=cross_kv, cross_mask=cross_mask, past=past)
            cache.append((*self_kv, *cross_kv))
        hidden = self.decoder.final_layernorm(x)
        logits = F.linear(hidden, self.embedding.word_embeddings.weight, self.tokens_head_bias)
        return Seq2SeqLMOutput(logits=logits, past_key_values=tuple(cache) if use_cache else None,
                               encoder_last_hidden_state=enc)


def register() -> None:
    """Make ``AutoConfig`` / ``AutoModelForSeq2SeqLM`` open a converted folder (``model_type: megatron_t5``);
    the folders are ours, so no ``trust_remote_code``. Idempotent."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    try:
        AutoConfig.register(MODEL_TYPE, MegatronT5Config)
    except ValueError:      # already registered
        return
    AutoModelForSeq2SeqLM.register(MegatronT5Config, MegatronT5ForConditionalGeneration)
