"""Token examples -> padded tensor batches: dynamic padding (right for training, left for generation), and
training batches that carry each shared prefix once."""
from __future__ import annotations

from typing import Any, Sequence

from stages.engine.examples import IGNORE, Example


def collate(examples: Sequence[Example], task_ids: dict[str, int], pad_id: int, *, left: bool = False) -> dict[str, Any]:
    """Pad to the longest in the batch (right padding for training, left for generation)."""
    import torch

    n = max(len(e.input_ids) for e in examples)
    ids, vidx, labels, mask = [], [], [], []
    for e in examples:
        pad = n - len(e.input_ids)

        def fill(seq: list[int], value: int) -> list[int]:
            return [value] * pad + seq if left else seq + [value] * pad

        ids.append(fill(e.input_ids, pad_id))
        vidx.append(fill(e.virtual_index, -1))
        labels.append(fill(e.labels, IGNORE))
        mask.append(fill([1] * len(e.input_ids), 0))
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "virtual_index": torch.tensor(vidx, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
        "task_ids": torch.tensor([task_ids[e.task] for e in examples], dtype=torch.long),
    }


def prefix_key(e: Example) -> tuple[Any, ...]:
    """Examples with equal keys have identical prefix token ids, virtual rows and task: one prefix pass serves all."""
    p = e.prefix_len
    return (e.task, tuple(e.input_ids[:p]), tuple(e.virtual_index[:p]))


def prefix_groups(examples: Sequence[Example]) -> list[list[int]]:
    """Indices of examples grouped by ``prefix_key`` (first-appearance order); no prefix -> a group of one."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(prefix_key(e) if e.prefix_len > 0 else ("", i), []).append(i)
    return list(groups.values())


def collate_shared(examples: Sequence[Example], task_ids: dict[str, int], pad_id: int) -> dict[str, Any]:
    """Training batch whose examples share prefixes: each distinct prefix once, then every example's suffix.

    Keys: ``prefix_input_ids`` / ``prefix_virtual_index`` / ``prefix_attention_mask`` [P, Lp] and
    ``prefix_task_ids`` [P] (right-padded); ``input_ids`` / ``virtual_index`` / ``labels`` / ``attention_mask``
    [B, Ls] and ``task_ids`` [B] for the suffixes (right-padded); ``prefix_row`` [B] (the suffix's prefix) and
    ``prefix_lengths`` [B] (its real prefix length = position of the first suffix token). Suffix labels start
    inside the suffix (``shared_prefix_len``), so the loss needs no prefix logits. Returns the plain ``collate``
    when no two examples share a prefix (nothing to gain) or one has no prefix; ``DecoderOnlyFamily.loss``
    accepts both.
    """
    import torch

    keys: dict[tuple[Any, ...], int] = {}
    rows: list[int] = []
    for e in examples:
        if e.prefix_len < 1:
            return collate(examples, task_ids, pad_id)
        rows.append(keys.setdefault(prefix_key(e), len(keys)))
    if len(keys) == len(examples):
        return collate(examples, task_ids, pad_id)
    firsts: dict[int, Example] = {}
    for e, r in zip(examples, rows):
        firsts.setdefault(r, e)
    prefixes = [Example(firsts[r].task, firsts[r].input_ids[:firsts[r].prefix_len], firsts[r].virtual_index[:firsts[r].prefix_len],
                        [IGNORE] * firsts[r].prefix_len) for r in range(len(keys))]
    suffixes = [Example(e.task, e.input_ids[e.prefix_len:], e.virtual_index[e.prefix_len:], e.labels[e.prefix_len:])
                for e in examples]
    pre, suf = collate(prefixes, task_ids, pad_id), collate(suffixes, task_ids, pad_id)
    out = {f"prefix_{k}": v for k, v in pre.items() if k != "labels"}
    out.update(suf)
    out["prefix_row"] = torch.tensor(rows, dtype=torch.long)
    out["prefix_lengths"] = torch.tensor([e.prefix_len for e in examples], dtype=torch.long)
    return out
