"""Shared-context prefixes for decoder-only models: run a prefix once, attend to its keys/values from many rows.

SQuAD has about five questions per paragraph, and the template puts [BOS] + virtual tokens + "Context:" + context
first. Causal attention means a prefix's hidden states and keys/values do not depend on what follows it, so:

* training (``shared_loss``): the distinct prefixes of a batch (``data.collate_shared``) run once, WITH
  gradients; their per-layer keys/values are index-selected per question row (``DynamicCache.batch_select_indices``,
  differentiable: every question's loss flows back through its prefix into the prompt table); the suffixes
  ("Question: ... Answer: ... </s>") run attending to them. Suffix labels start inside the suffix
  (``data.shared_prefix_len``), so no prefix logits are needed.
* generation (``prefill_shared``): each distinct prefix is prefilled once, its cache copied per question row; the
  left-padded suffixes are prefilled on top, then greedy decoding continues exactly as in the plain path.

Layout of one row's key/value slots: ``[prefix (right-padded to Lp)] [suffix]``; the 2D attention mask is 0 on
padding wherever it sits (HF builds the causal mask by slot index from the cache length), and position ids are
``prefix length + offset in the suffix``, so every real token sees exactly the tokens and positions it sees in the
plain path. Results equal the plain path up to float rounding (different matmul shapes), which the tests bound.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from . import data as D
from .prompts import PromptStore

SHARED_KEY = "prefix_row"   # a batch with this key came from data.collate_shared


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
    ready for the same greedy loop as the plain path. ``prefix_lens[i] >= 1`` and leaves a token after it."""
    device = next(model.parameters()).device
    keys: dict[tuple[Any, ...], int] = {}
    prow = [keys.setdefault((t, tuple(ids[:p]), tuple(v[:p])), len(keys)) for (ids, v, t), p in zip(rows, prefix_lens)]
    first: dict[int, int] = {}
    for i, r in enumerate(prow):
        first.setdefault(r, i)
    pre = [D.Example("", rows[i][0][:prefix_lens[i]], rows[i][1][:prefix_lens[i]], [D.IGNORE] * prefix_lens[i])
           for i in (first[r] for r in range(len(keys)))]
    ptask = [rows[first[r]][2] for r in range(len(keys))]
    cache, pmask = _prefill_prefixes(family, model, store, pre, ptask, pad_id, device)
    rows_t = torch.tensor(prow, dtype=torch.long, device=device)
    cache = expand_cache(cache, rows_t)
    suf = [D.Example("", ids[p:], v[p:], [D.IGNORE] * (len(ids) - p)) for (ids, v, _), p in zip(rows, prefix_lens)]
    sb = D.collate(suf, {"": 0}, pad_id, left=True)
    smask = sb["attention_mask"].to(device)
    task_ids = torch.tensor([t for _, _, t in rows], dtype=torch.long, device=device)
    x = family.embed(model, store, sb["input_ids"].to(device), sb["virtual_index"].to(device), task_ids)
    plen = torch.tensor(prefix_lens, dtype=torch.long, device=device).unsqueeze(1)
    pos = plen + (smask.cumsum(-1) - 1).clamp(min=0)
    mask = torch.cat([pmask[rows_t], smask], dim=1)
    kw = dict(inputs_embeds=x, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
    try:
        out = model(**kw, logits_to_keep=1)
    except TypeError:  # models without logits_to_keep
        out = model(**kw)
    return out, mask, pos


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


def _prefill_prefixes(family: Any, model: Any, store: PromptStore | None, pre: list[D.Example], tasks: list[int],
                      pad_id: int, device: Any) -> tuple[Any, torch.Tensor]:
    """Run the distinct generation prefixes in ``length_groups`` (no pass computes much padding: the prefixes of
    one batch can differ by 2x) and lay their caches out as one right-padded [P, Lp] cache with its 2D mask, as
    a single padded pass would (pad slots are zeros, masked out)."""
    lengths = [len(e.input_ids) for e in pre]
    lp = max(lengths)
    pmask = torch.zeros(len(pre), lp, dtype=torch.long, device=device)
    for i, n in enumerate(lengths):
        pmask[i, :n] = 1
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    for g in length_groups(lengths):
        pb = D.collate([pre[i] for i in g], {"": 0}, pad_id)
        part = run_prefixes(family, model, store, pb["input_ids"].to(device), pb["virtual_index"].to(device),
                            pb["attention_mask"].to(device), torch.tensor([tasks[i] for i in g], dtype=torch.long, device=device))
        idx = torch.tensor(g, dtype=torch.long, device=device)
        for layer, kv in enumerate(part.layers):
            if layer == len(keys):
                shape = (len(pre), kv.keys.shape[1], lp, kv.keys.shape[3])
                keys.append(kv.keys.new_zeros(shape))
                values.append(kv.values.new_zeros(shape[:3] + (kv.values.shape[3],)))
            keys[layer][idx, :, :kv.keys.shape[2]] = kv.keys
            values[layer][idx, :, :kv.values.shape[2]] = kv.values
    cache = _fresh_cache(model)
    for layer, (k, v) in enumerate(zip(keys, values)):
        cache.update(k, v, layer)
    return cache, pmask
