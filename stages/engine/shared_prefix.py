"""Shared-context prefixes for decoder-only models: run a prefix once, attend to its keys/values from many rows.

SQuAD has about five questions per paragraph, and the template puts [BOS] + virtual tokens + "Context:" + context
first. Causal attention means a prefix's hidden states and keys/values do not depend on what follows it, so:

* training (``shared_loss``): the distinct prefixes of a batch (``collate.collate_shared``) run once, WITH
  gradients; their per-layer keys/values are index-selected per question row (``DynamicCache.batch_select_indices``,
  differentiable: every question's loss flows back through its prefix into the prompt table); the suffixes
  ("Question: ... Answer: ... </s>") run attending to them. Suffix labels start inside the suffix
  (``examples.shared_prefix_len``), so no prefix logits are needed.
* generation (``prefill_shared``): each distinct prefix and the suffixes of its questions run as one packed
  sequence with a block mask (no suffix padding); each question's cache is gathered from it, then greedy decoding
  continues exactly as in the plain path.

Layout of one row's key/value slots: ``[prefix (right-padded to Lp)] [suffix]``; the 2D attention mask is 0 on
padding wherever it sits (HF builds the causal mask by slot index from the cache length), and position ids are
``prefix length + offset in the suffix``, so every real token sees exactly the tokens and positions it sees in the
plain path. Results equal the plain path up to float rounding (different matmul shapes), which the tests bound.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import collate as C
from . import examples as D
from .prompts import PromptStore

SHARED_KEY = "prefix_row"   # a batch with this key came from collate.collate_shared


def is_shared(batch: dict[str, Any]) -> bool:
    return SHARED_KEY in batch


def body_and_head(model: Any) -> tuple[Any, Any]:
    """(decoder stack returning hidden states, LM head), or (None, None) when the model does not expose them."""
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is None or body is model or head is None:
        return None, None
    return body, head


def _fresh_cache(model: Any) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def run_prefixes(family: Any, model: Any, store: PromptStore | None, ids: torch.Tensor, vidx: torch.Tensor,
                 mask: torch.Tensor, task_ids: torch.Tensor) -> Any:
    """Run right-padded prefixes [P, Lp] (positions 0..len-1) and return their cache (keys/values, with grad
    when enabled). Only the decoder stack runs: prefix positions need no logits."""
    x = family.embed(model, store, ids, vidx, task_ids)
    cache = _fresh_cache(model)
    body, _ = body_and_head(model)
    runner = body if body is not None else model
    out = runner(inputs_embeds=x, attention_mask=mask, past_key_values=cache, use_cache=True)
    return out.past_key_values


def expand_cache(cache: Any, rows: torch.Tensor) -> Any:
    """The prefix cache with one batch row per suffix (``rows``: prefix row of each suffix); a differentiable copy."""
    cache.batch_select_indices(rows)
    return cache


def shared_loss(family: Any, model: Any, store: PromptStore, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies, number of label tokens) of a ``collate_shared`` batch; equals the plain loss."""
    cache = run_prefixes(family, model, store, batch["prefix_input_ids"], batch["prefix_virtual_index"],
                         batch["prefix_attention_mask"], batch["prefix_task_ids"])
    rows = batch["prefix_row"]
    cache = expand_cache(cache, rows)
    smask = batch["attention_mask"]
    mask = torch.cat([batch["prefix_attention_mask"][rows], smask], dim=1)
    pos = batch["prefix_lengths"].unsqueeze(1) + torch.arange(smask.shape[1], device=smask.device).unsqueeze(0)
    x = family.embed(model, store, batch["input_ids"], batch["virtual_index"], batch["task_ids"])
    labels = batch["labels"][:, 1:]
    sel = labels != D.IGNORE
    body, head = body_and_head(model)
    kw = dict(inputs_embeds=x, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
    if body is not None:
        logits = head(body(**kw).last_hidden_state[:, :-1][sel])
    else:
        logits = model(**kw).logits[:, :-1][sel]
    total = F.cross_entropy(logits.float(), labels[sel], reduction="sum")
    return total, sel.sum()


def prefill_shared(family: Any, model: Any, store: PromptStore | None, rows: list[tuple[list[int], list[int], int]],
                   prefix_lens: list[int], pad_id: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """Generation prefill with each distinct prefix run once: (model output of the last position, 2D mask, position ids),
    ready for the same greedy loop as the plain path. ``prefix_lens[i] >= 1`` and leaves a token after it.

    One packed sequence per distinct prefix, ``[prefix] [suffix of question 1] [suffix of question 2] ...``, runs in
    a single forward pass with a block mask (prefix causal; each suffix sees the prefix and itself, causally) and
    position ids restarting after the prefix for every suffix: no suffix padding is computed, the prefix keys/values
    are not copied per question before the suffixes run, and prefix and suffixes share one pass (larger matmuls).
    Sequences of very different lengths run in separate passes (``length_groups``). The decoding cache is then
    gathered per question in the plain layout ``[prefix (right-padded)] [suffix (left-padded)]``."""
    device = next(model.parameters()).device
    keys: dict[tuple[Any, ...], int] = {}
    prow = [keys.setdefault((t, tuple(ids[:p]), tuple(v[:p])), len(keys)) for (ids, v, t), p in zip(rows, prefix_lens)]
    members: list[list[int]] = [[] for _ in keys]
    for i, r in enumerate(prow):
        members[r].append(i)
    packed = [_pack([rows[i] for i in m], prefix_lens[m[0]]) for m in members]
    # where each question's prefix and suffix slots sit in the flattened (pass, row, slot) bank of keys/values
    slot_of: dict[int, tuple[int, int]] = {}   # question -> (bank offset of its packed row, start of its suffix)
    banks: list[list[torch.Tensor]] = []
    last_hidden: list[torch.Tensor | None] = [None] * len(rows)
    offset = 0
    for g in length_groups([len(p.ids) for p in packed]):
        states, cache = _run_packed(family, model, store, [packed[r] for r in g], pad_id, device)
        width = states.shape[1]
        for k, r in enumerate(g):
            for q, (start, end) in zip(members[r], packed[r].spans):
                slot_of[q] = (offset + k * width, start)
                last_hidden[q] = states[k, end - 1]
        banks.append([torch.cat([kv.keys, kv.values], dim=1).transpose(1, 2).reshape(len(g) * width, -1, kv.keys.shape[-1])
                      for kv in cache.layers])
        offset += len(g) * width
    # gather index [B, Lp + Ls] into the bank (index ``offset`` = an all-zero slot for padding) and the 2D mask
    lp, ls = max(prefix_lens), max(len(ids) - p for (ids, _, _), p in zip(rows, prefix_lens))
    index = torch.full((len(rows), lp + ls), offset, dtype=torch.long)
    mask = torch.zeros(len(rows), lp + ls, dtype=torch.long)
    for q, ((ids, _, _), p) in enumerate(zip(rows, prefix_lens)):
        base, start = slot_of[q]
        s = len(ids) - p
        index[q, :p] = torch.arange(base, base + p)
        index[q, lp + ls - s:] = torch.arange(base + start, base + start + s)
        mask[q, :p] = 1
        mask[q, lp + ls - s:] = 1
    index, mask = index.to(device), mask.to(device)
    cache = _fresh_cache(model)
    for layer in range(len(banks[0])):
        bank = torch.cat([b[layer] for b in banks] + [banks[0][layer].new_zeros(1, *banks[0][layer].shape[1:])])
        kv = bank[index].transpose(1, 2)                   # [B, 2 x kv heads, L, head dim]
        half = kv.shape[1] // 2
        cache.update(kv[:, :half].contiguous(), kv[:, half:].contiguous(), layer)
    states = torch.stack(last_hidden).unsqueeze(1)          # [B, 1, H] (or [B, 1, V] without a separate head)
    _, head = body_and_head(model)
    out = PrefillOutput(head(states) if head is not None else states, cache)
    pos = torch.tensor(prefix_lens, dtype=torch.long, device=device).unsqueeze(1) + (mask[:, lp:].cumsum(-1) - 1).clamp(min=0)
    return out, mask, pos


@dataclass
class PrefillOutput:
    """What ``decoding.greedy_decode`` reads from a prefill: last-position logits [B, 1, V] and the cache."""
    logits: torch.Tensor
    past_key_values: Any


@dataclass
class Packed:
    """One distinct prefix followed by the suffixes of its questions; ``spans``: [start, end) of each suffix."""
    ids: list[int]
    vidx: list[int]
    task: int
    prefix_len: int
    spans: list[tuple[int, int]]


def _pack(rows: list[tuple[list[int], list[int], int]], p: int) -> Packed:
    ids, vidx = list(rows[0][0][:p]), list(rows[0][1][:p])
    spans = []
    for r_ids, r_vidx, _ in rows:
        spans.append((len(ids), len(ids) + len(r_ids) - p))
        ids += r_ids[p:]
        vidx += r_vidx[p:]
    return Packed(ids, vidx, rows[0][2], p, spans)


def _run_packed(family: Any, model: Any, store: PromptStore | None, packs: list[Packed], pad_id: int,
                device: Any) -> tuple[torch.Tensor, Any]:
    """One forward pass over right-padded packed sequences [R, T]: (last hidden states [R, T, H] — logits
    [R, T, V] for a model without a separate head —, cache). Block mask: a prefix token sees the prefix causally, a suffix
    token the prefix and its own suffix causally (padding sees only padding); suffix positions restart after the
    prefix, so every token sees exactly the tokens and positions of its plain prompt."""
    width = max(len(pk.ids) for pk in packs)
    seg = torch.full((len(packs), width), -1, dtype=torch.long)      # 0 prefix, j + 1 suffix j, -1 padding
    pos = torch.zeros(len(packs), width, dtype=torch.long)
    for r, pk in enumerate(packs):
        seg[r, :pk.prefix_len] = 0
        pos[r, :pk.prefix_len] = torch.arange(pk.prefix_len)
        for j, (a, b) in enumerate(pk.spans):
            seg[r, a:b] = j + 1
            pos[r, a:b] = torch.arange(pk.prefix_len, pk.prefix_len + b - a)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    sq, sk = seg.unsqueeze(2), seg.unsqueeze(1)
    allowed = causal & ((sk == sq) | ((sk == 0) & (sq > 0)))
    dtype = next(model.parameters()).dtype
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)
    batch = C.collate([D.Example("", pk.ids, pk.vidx, [D.IGNORE] * len(pk.ids)) for pk in packs], {"": 0}, pad_id)
    x = family.embed(model, store, batch["input_ids"].to(device), batch["virtual_index"].to(device),
                     torch.tensor([pk.task for pk in packs], dtype=torch.long, device=device))
    body, _ = body_and_head(model)
    kw = dict(inputs_embeds=x, attention_mask=mask.to(device), position_ids=pos.to(device),
              past_key_values=_fresh_cache(model), use_cache=True)
    if body is not None:
        out = body(**kw)
        return out.last_hidden_state, out.past_key_values
    out = model(**kw)
    return out.logits, out.past_key_values


def length_groups(lengths: list[int], slack: float = 0.15) -> list[list[int]]:
    """Indices grouped so that padding each group to its longest adds at most ``slack`` x its real tokens (longest
    first): prefixes of similar length share a forward pass, very different ones do not pay for padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        g = groups[-1] if groups else None
        if g is not None and lengths[g[0]] * (len(g) + 1) <= (1 + slack) * (sum(lengths[j] for j in g) + lengths[i]):
            g.append(i)
        else:
            groups.append([i])
    return groups
