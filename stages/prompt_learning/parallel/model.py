"""Soft prompt + frozen Llama, written as pipeline-stage modules.

Batch convention (shared with the engine)
-----------------------------------------
* ``input_ids`` [B, S] int64: real tokens are ``>= 0``; a virtual-token position holds ``-(k + 1)``,
  meaning "row ``k`` of the prompt table" (``k = 0..n_rows-1``). Several tasks or P-tuning splits are
  just different row ranges of one table. :func:`mark_virtual_tokens` builds such ids.
* ``attention_mask`` [B, S]: 1 for real (and virtual) tokens, 0 for padding (left or right).
* ``labels`` [B, S]: Hugging Face convention -- token ``t`` is predicted from position ``t - 1``
  (the shift happens inside the loss); ``-100`` = not scored (virtual tokens, padding, context).
* ``position_ids`` default to ``cumsum(attention_mask) - 1`` (equals ``arange`` for right padding).

Loss reduction (exact under any layout)
---------------------------------------
``loss = sum over every labelled token of the GLOBAL batch of CE / number of labelled tokens of the
global batch``. Every micro batch contributes ``sum_CE(micro batch) / N_global`` (``N_global`` is
counted before the step and all-reduced over data parallel); the per-micro-batch pieces are summed
(``scale_grads=False`` in the pipeline schedules, plain accumulation otherwise) and the prompt
gradients are SUM-all-reduced over data parallel. So TP, PP, DP and micro batching give the same
loss and gradient as one process on the full batch -- no mean of per-micro-batch means, which would
weight a token in a short micro batch more than one in a long one.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from stages.engine.examples import IGNORE



class SoftPrompt(nn.Module):
    """A plain trainable table ``weight`` [n_rows, hidden]; ``forward()`` returns it.

    Any module whose ``forward()`` returns a [n_rows, hidden] tensor can stand in (e.g. a P-tuning
    MLP/LSTM encoder): the trainer only calls it and reduces the gradients of its parameters.
    """

    def __init__(self, n_rows: int, hidden: int, init: torch.Tensor | None = None, std: float = 0.02) -> None:
        super().__init__()
        if init is None:
            init = torch.randn(n_rows, hidden) * std
        if tuple(init.shape) != (n_rows, hidden):
            raise ValueError(f"prompt init has shape {tuple(init.shape)}, expected {(n_rows, hidden)}")
        self.weight = nn.Parameter(init.detach().clone().float())

    def forward(self) -> torch.Tensor:
        return self.weight


def mark_virtual_tokens(input_ids: torch.Tensor, virtual_mask: torch.Tensor, first_row: int = 0) -> torch.Tensor:
    """Replace the positions of ``virtual_mask`` (bool [B, S]) by ids ``-(k+1)``; in each sequence the
    j-th virtual position gets table row ``first_row + j``."""
    k = torch.cumsum(virtual_mask.long(), dim=-1) - 1 + first_row
    return torch.where(virtual_mask, -(k + 1), input_ids)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def causal_padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4-D mask [B, 1, S, S]: 0 where query i may attend key j (j <= i and j not padding),
    the dtype's minimum elsewhere. Accepted by the eager and sdpa attention of every transformers version."""
    b, s = attention_mask.shape
    dev = attention_mask.device
    causal = torch.ones(s, s, dtype=torch.bool, device=dev).tril()
    allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]
    zero = torch.zeros((), dtype=dtype, device=dev)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=dev)
    return torch.where(allowed, zero, neg)


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of next-token cross entropy over the labelled tokens, computed in fp32."""
    logits = logits[:, :-1, :].float()
    target = labels[:, 1:].to(logits.device)
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def count_labelled(labels: torch.Tensor) -> torch.Tensor:
    """Number of tokens :func:`lm_loss_sum` scores (after the shift)."""
    return (labels[:, 1:] != IGNORE).sum()


def embed_with_prompt(embed_tokens: nn.Module, prompt_table: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Token embeddings where ids >= 0, prompt rows where ids = -(k+1)."""
    virtual = input_ids < 0
    embeds = embed_tokens(input_ids.clamp_min(0))
    rows = prompt_table.to(embeds.dtype)[(-input_ids - 1).clamp_min(0)]
    return torch.where(virtual[..., None], rows, embeds)


def split_layers(n_layers: int, pp: int) -> list[range]:
    """Contiguous, balanced decoder-layer ranges per pipeline stage (earlier stages get the extras)."""
    base, extra = divmod(n_layers, pp)
    out, start = [], 0
    for s in range(pp):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


class PromptedLlamaStage(nn.Module):
    """One pipeline stage of ``soft prompt + frozen LlamaForCausalLM`` (the whole model when pp == 1).

    * first stage: ``forward(input_ids, attention_mask=, position_ids=)`` embeds tokens and inserts the
      prompt rows; holds ``embed_tokens`` and ``prompt`` (the only trainable parameters).
    * later stages: ``forward(hidden_states, attention_mask=, position_ids=)``.
    * every stage rebuilds the causal+padding mask and the rotary cos/sin from the 2-D
      ``attention_mask`` / ``position_ids`` it receives as keyword arguments (the pipeline schedule
      passes the matching micro batch of them to every stage), so only the hidden states travel.
    * last stage: applies the final norm and ``lm_head`` and returns logits [B, S, vocab].
    """

    def __init__(
        self,
        model: nn.Module,
        prompt: nn.Module | None,
        layer_ids: Sequence[int] | Iterable[int],
        is_first: bool,
        is_last: bool,
    ) -> None:
        super().__init__()
        inner = model.model
        self.config = model.config
        self.is_first = is_first
        self.is_last = is_last
        self.layer_ids = list(layer_ids)
        self.embed_tokens = inner.embed_tokens if is_first else None
        self.prompt = prompt if is_first else None
        self.layers = nn.ModuleList([inner.layers[i] for i in self.layer_ids])
        self.rotary_emb = inner.rotary_emb
        self.norm = inner.norm if is_last else None
        self.lm_head = model.lm_head if is_last else None

    def forward(
        self, x: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.is_first:
            assert self.embed_tokens is not None and self.prompt is not None
            h = embed_with_prompt(self.embed_tokens, self.prompt(), x)
        else:
            h = x
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        mask = causal_padding_mask(attention_mask, h.dtype)
        cos_sin = self.rotary_emb(h, position_ids)
        for layer in self.layers:
            out = layer(h, attention_mask=mask, position_ids=position_ids, position_embeddings=cos_sin)
            h = out[0] if isinstance(out, tuple) else out  # transformers < 4.48 returns a tuple
        if self.is_last:
            assert self.norm is not None and self.lm_head is not None
            return self.lm_head(self.norm(h))
        return h


def reference_loss(model: nn.Module, prompt: nn.Module, batch: dict) -> torch.Tensor:
    """Single-process reference through the stock Hugging Face forward (``inputs_embeds``):
    global-token-mean loss of the whole batch. Used by the tests to check the stage modules."""
    ids = batch["input_ids"]
    mask = batch["attention_mask"]
    embeds = embed_with_prompt(model.get_input_embeddings(), prompt(), ids)
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
    n = count_labelled(batch["labels"]).clamp_min(1)
    return lm_loss_sum(out.logits, batch["labels"]) / n
