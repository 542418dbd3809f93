"""Greedy decoding with the KV cache for decoder-only models: finished rows leave the batch, and tokens copied
from the prompt are verified many at a time (prompt lookup), with the same answers as one token per step.

Why: on a CPU a decoding step costs about as much per *row-token* as prefill does (the matmuls are small and
compute-bound here), so two things waste most of the time of plain batched greedy decoding:

* finished rows: a batch keeps decoding all its rows until the longest answer ends. Here a row leaves the batch
  (its cache row dropped) as soon as it hits EOS, a stop string or the token limit.
* one token per forward pass: extractive answers (SQuAD) are spans of the context. After each step the row's
  last ``ngram`` tokens are looked up in its own prompt + answer so far; the tokens that followed the match are
  proposed as a draft and verified in the next forward pass together with the row's last token. Every draft
  token that equals the model's greedy choice at its position is accepted, and the model's choice after the
  last accepted one comes free; rejected draft slots stay in the cache but are masked out (like padding), and
  position ids count only accepted tokens. The output is the greedy output: each emitted token is the argmax
  given exactly the tokens before it (logits equal to the one-token path up to float rounding from other
  matmul shapes). This is "prompt lookup decoding" (Saxena 2023; ``prompt_lookup_num_tokens`` in Hugging Face
  ``generate``, which supports only batch size 1), here batched, with per-row drafts of different lengths.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch


def draft_from(seq: Sequence[int], max_tokens: int, ngram: int = 3) -> list[int]:
    """Up to ``max_tokens`` tokens that followed the earliest earlier occurrence of ``seq``'s last n tokens in
    ``seq`` (n from ``ngram`` down to 1: longer matches are more likely to continue the same way); [] if none.
    Negative ids (virtual-token slots) never match."""
    if max_tokens <= 0:
        return []
    L = len(seq)
    for n in range(min(ngram, L - 1), 0, -1):
        tail = list(seq[L - n:])
        if min(tail) < 0:
            continue
        for start in range(L - n):           # a match needs at least one token after it
            if seq[start] == tail[0] and list(seq[start:start + n]) == tail:
                cont = []
                for t in seq[start + n:start + n + max_tokens]:
                    if t < 0:
                        break
                    cont.append(t)
                if cont:
                    return cont
    return []


def greedy_decode(model: Any, out: Any, mask: torch.Tensor, pos: torch.Tensor, sources: Sequence[Sequence[int]], *,
                  eos_ids: set[int], tokens_to_generate: int, is_done: Callable[[int, list[int]], bool],
                  prompt_lookup_num_tokens: int = 0, pass_budget: int | None = None, ngram: int = 3,
                  stats: dict[str, int] | None = None) -> list[list[int]]:
    """Continue a prefilled, left-padded batch greedily; returns the generated ids of each row (EOS excluded).

    ``out``: the prefill output (its ``past_key_values`` and last-position ``logits``); ``mask`` [B, L] the 2D
    attention mask of the cache slots; ``pos`` [B, L] their position ids. ``sources[i]``: row i's prompt ids
    (negative for virtual slots), where drafts are looked up together with the answer so far.
    ``prompt_lookup_num_tokens``: draft tokens per pass (0 = one token per pass); ``pass_budget``: drafts are
    shortened so that a pass carries at most this many row-tokens (rows x fed slots; at least one per row): on a
    CPU a pass costs more with every row-token, so wide drafts pay off only once few rows are left (``None``: no
    limit, e.g. on a GPU, where a pass costs about the same up to hundreds of tokens). ``is_done(i, generated)``
    implements stop strings; a row also ends at EOS or after ``tokens_to_generate`` tokens (EOS counted), as in a
    plain one-token loop.
    ``stats`` (optional) receives ``forward_passes``, ``row_tokens`` (row x slot positions run) and ``drafted`` /
    ``accepted`` draft tokens."""
    n_rows = len(sources)
    generated: list[list[int]] = [[] for _ in range(n_rows)]
    emitted = [0] * n_rows
    active = list(range(n_rows))                     # batch row j holds original row active[j]
    past = out.past_key_values
    logits = out.logits[:, -1:]                      # [b, W, V]: W fed slots of the last pass
    drafts: list[list[int]] = [[] for _ in range(n_rows)]
    next_pos = pos[:, -1] + 1                        # position of each row's next fed token
    fed_width = 0                                    # 0: logits come from the prefill, nothing to verify
    counts = {"forward_passes": 0, "row_tokens": 0, "drafted": 0, "accepted": 0}
    while True:
        preds = logits.argmax(-1).tolist()
        valid = []
        for j, i in enumerate(active):
            d, p = drafts[j], preds[j]
            a = 0
            while a < len(d) and d[a] == p[a]:
                a += 1
            counts["accepted"] += a
            valid.append(1 + a)                      # the fed last token + the accepted drafts are real slots now
            for tok in p[:a + 1]:
                emitted[i] += 1
                if tok in eos_ids:
                    done = True
                else:
                    generated[i].append(tok)
                    done = is_done(i, generated[i])
                if done or emitted[i] >= tokens_to_generate:
                    emitted[i] = -1                  # finished
                    break
        if fed_width:
            cols = torch.arange(fed_width, device=mask.device).unsqueeze(0) < torch.tensor(valid, device=mask.device).unsqueeze(1)
            mask = torch.cat([mask, cols.to(mask.dtype)], dim=1)
            next_pos = next_pos + torch.tensor(valid, device=next_pos.device)
        keep = [j for j, i in enumerate(active) if emitted[i] >= 0]
        if not keep:
            break
        if len(keep) < len(active):                  # finished rows leave the batch
            idx = torch.tensor(keep, dtype=torch.long, device=mask.device)
            past.batch_select_indices(idx)
            mask, next_pos = mask[idx], next_pos[idx]
            active = [active[j] for j in keep]
        unused = _trailing_unused(mask)
        if unused:                                   # rejected drafts at the end of every row: drop those slots
            past.crop(-unused)
            mask = mask[:, :-unused]
        k = prompt_lookup_num_tokens if pass_budget is None else min(prompt_lookup_num_tokens, pass_budget // len(active) - 1)
        drafts = [draft_from(list(sources[i]) + generated[i], min(k, tokens_to_generate - emitted[i] - 1), ngram)
                  if k > 0 else [] for i in active]
        fed_width = 1 + max(len(d) for d in drafts)
        feed = [[generated[i][-1]] + d + [generated[i][-1]] * (fed_width - 1 - len(d)) for i, d in zip(active, drafts)]
        ids = torch.tensor(feed, dtype=torch.long, device=mask.device)
        # filler slots repeat the row's last real position (never past the model's position budget)
        offs = torch.tensor([[min(s, len(d)) for s in range(fed_width)] for d in drafts], device=mask.device)
        fpos = next_pos.unsqueeze(1) + offs
        fmask = torch.cat([mask, mask.new_ones(len(active), fed_width)], dim=1)   # filler slots come last: causal
        out = model(input_ids=ids, attention_mask=fmask, position_ids=fpos, past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits
        counts["forward_passes"] += 1
        counts["row_tokens"] += len(active) * fed_width
        counts["drafted"] += sum(len(d) for d in drafts)
    if stats is not None:
        stats.update(counts)
    return generated


def _trailing_unused(mask: torch.Tensor) -> int:
    """Number of last cache slots masked out in every row."""
    used = mask.any(dim=0).nonzero()
    return int(mask.shape[1] - 1 - used.max()) if used.numel() else 0
