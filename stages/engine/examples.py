"""Template + record -> token example with virtual-token slots (training) or generation prompt.

Reading JSONL files into examples is ``dataset.py``; padding examples into batches is ``collate.py``.

Tokenisation choices (the same code builds training examples and generation prompts, so they agree):
  * Every template piece (literal text or a field value) is tokenised on its own, without special tokens,
    so a field can be truncated exactly and a virtual marker sits between two known token runs.
  * Whitespace that ends a piece is moved to the start of the next text piece ("Answer: " + "Paris" becomes
    "Answer:" + " Paris"): BPE vocabularies attach the space to the following word, so the model sees
    natural tokens and the answer tokens are exactly what greedy generation after "...Answer:" must produce.
    The prefix is always tokenised separately from the answer.
  * A BOS token is prepended only if the tokenizer itself adds one (SmolLM2's does not); it precedes
    everything, including the first virtual tokens, in training and in generation alike.
  * Virtual positions carry a placeholder token id (the pad id) and ``virtual_index`` = row of the task's
    prompt table; the model replaces their input embeddings with those rows.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from stages.common.errors import UserError
from stages.engine.template import Field, TaskTemplate, Virtual

IGNORE = -100


@dataclass
class Example:
    task: str
    input_ids: list[int]
    virtual_index: list[int]           # -1 for real tokens, else row in the task's prompt table
    labels: list[int]                  # IGNORE where no loss
    source: str = ""
    prefix_len: int = 0                # leading tokens that may be shared with other examples (0: none); see shared_prefix_len


@dataclass
class BuildStats:
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_too_short: int = 0
    per_task: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"kept": self.kept, "truncated": self.truncated, "dropped_too_long": self.dropped_too_long,
                "dropped_too_short": self.dropped_too_short, "per_task": dict(self.per_task)}


class TokenizerInfo:
    """What example building needs from a HF tokenizer (cached token-id facts)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.eos_id = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        probe = tokenizer("a").input_ids
        bos = tokenizer.bos_token_id
        self.bos_id = bos if (bos is not None and probe and probe[0] == bos) else None

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False).input_ids) if text else []

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


def record_value(record: dict[str, Any], name: str, where: str) -> str:
    if name not in record or record[name] is None:
        raise UserError(f"{where}: record has no field '{name}' used by the task template; add it to every record or fix the template")
    v = record[name]
    if isinstance(v, list):  # e.g. several gold answers: train on the first
        if not v:
            raise UserError(f"{where}: field '{name}' is an empty list; give at least one value")
        v = v[0]
    return str(v)


def render_segments(template: TaskTemplate, record: dict[str, Any], where: str, *, with_answer: bool,
                    use_virtual: bool = True) -> list[tuple[str, Any]]:
    """Template -> [("text", str, field_name|None) | ("virtual", Virtual)] with whitespace moved forward.

    ``with_answer=False`` stops before the answer field (generation prompt); trailing whitespace of the
    prompt is dropped there, because the answer carries it (see module docstring).
    """
    segs: list[list[Any]] = []
    for piece in template.pieces:
        if isinstance(piece, Virtual):
            if use_virtual and piece.count:
                segs.append(["virtual", piece, None])
            continue
        if isinstance(piece, Field):
            if not with_answer and piece.name == template.answer_field:
                break
            segs.append(["text", record_value(record, piece.name, where), piece.name])
        else:
            segs.append(["text", piece.text, None])
    # move trailing whitespace of a text piece to the start of the next text piece
    for i in range(len(segs) - 1):
        a, b = segs[i], segs[i + 1]
        if a[0] == "text" and b[0] == "text":
            stripped = a[1].rstrip()
            if stripped != a[1] and not b[1][:1].isspace():
                b[1] = a[1][len(stripped):] + b[1]
                a[1] = stripped
    if not with_answer and segs and segs[-1][0] == "text":
        segs[-1][1] = segs[-1][1].rstrip()
    return [tuple(s) for s in segs]


def prefix_segment_count(template: TaskTemplate, segs: Sequence[tuple[Any, ...]]) -> int:
    """How many leading rendered segments form the shareable prefix: everything up to and including the first
    non-answer field (SQuAD: [BOS] + virtual + "Context:" + context). Questions of one paragraph then have
    identical prefix token ids, because every piece is tokenised on its own."""
    for i, seg in enumerate(segs):
        if seg[0] == "text" and seg[2] is not None:
            return i + 1 if seg[2] != template.answer_field else i
    return 0


def prefix_fields(template: TaskTemplate) -> tuple[str, ...]:
    """The record fields inside the shareable prefix (SQuAD: ("context",)): records with equal values share it."""
    for piece in template.pieces:
        if isinstance(piece, Field):
            return (piece.name,) if piece.name != template.answer_field else ()
    return ()


def shared_prefix_len(natural: int, labels: Sequence[int] | None, length: int) -> int:
    """Cut the natural prefix so that it carries no loss: the prefix may not contain a label, nor predict one
    (the token right after it is predicted from the prefix's last position), and at least one token must follow
    it. Labels inside the prefix (answer_only_loss=false) therefore shrink it to the tokens before them; the
    shared path never needs logits of prefix positions."""
    cut = min(natural, length - 1)
    if labels is not None:
        first = next((i for i, t in enumerate(labels) if t != IGNORE), length)
        cut = min(cut, first - 1)
    return max(cut, 0)


Cut = Callable[[list[int], int], list[int]]


def end_cut(ids: list[int], keep: int) -> list[int]:
    """NeMo's truncation: the field's first ``keep`` tokens."""
    return ids[:keep]


def answer_window(template: TaskTemplate, record: dict[str, Any], info: TokenizerInfo) -> Cut:
    """A cut of the truncate field that keeps the answer: a window of ``keep`` tokens around the first place the
    answer occurs in the field, at a position drawn from the record itself (a CRC of its text, so the same record
    is always cut the same way and a resumed run sees the same examples, while the answer is not always in the
    middle). Where the answer is not in the field, or does not fit, it is :func:`end_cut`.

    Why: cutting a SQuAD context from its end loses the answer in many long paragraphs, so the example teaches the
    prompt to answer with a span that is not there; dropping long examples instead loses half the training data
    at a short ``max_seq_length``."""
    text = str(record.get(template.truncate_field or "", ""))
    answer = str(record.get(template.answer_field or "", "")).strip()
    pos = text.find(answer) if answer else -1

    def cut(ids: list[int], keep: int) -> list[int]:
        if pos < 0 or keep <= 0:
            return end_cut(ids, keep)
        start = len(info.encode(text[:pos]))
        end = min(len(ids), len(info.encode(text[:pos + len(answer)])) + 1)   # + 1: a boundary merge
        start = max(0, start - 1)
        if end - start > keep:
            return end_cut(ids, keep)
        lo, hi = max(0, end - keep), min(start, len(ids) - keep)        # window starts that hold [start, end)
        first = lo + zlib.crc32(f"{text}\x00{answer}".encode("utf-8")) % (hi - lo + 1)
        return ids[first:first + keep]

    return cut


def build_example(template: TaskTemplate, record: dict[str, Any], info: TokenizerInfo, *, max_seq_length: int,
                  add_eos: bool, where: str, stats: BuildStats | None = None,
                  cut: Cut | None = None) -> Example | None:
    """One training/validation example; None when it cannot fit even after truncation (counted in stats).
    ``cut``: how the truncate field is shortened (default :func:`end_cut`; :func:`answer_window`)."""
    segs = render_segments(template, record, where, with_answer=True)
    parts: list[tuple[str, list[int], Any]] = []   # (kind, ids or Virtual, field)
    for kind, val, name in segs:
        if kind == "virtual":
            parts.append(("virtual", val, None))
        else:
            parts.append(("text", info.encode(val), name))
    eos = [info.eos_id] if (add_eos and info.eos_id is not None) else []
    bos = [info.bos_id] if info.bos_id is not None else []

    def length() -> int:
        return len(bos) + len(eos) + sum(p[1].count if p[0] == "virtual" else len(p[1]) for p in parts)

    truncated = False
    excess = length() - max_seq_length
    if excess > 0 and template.truncate_field is not None:
        for i, (kind, ids, name) in enumerate(parts):
            if kind == "text" and name == template.truncate_field:
                keep = max(0, len(ids) - excess)
                parts[i] = (kind, (cut or end_cut)(ids, keep), name)
                truncated = True
                break
    no_room = truncated and not any(kind == "text" and name == template.truncate_field and ids for kind, ids, name in parts)
    if length() > max_seq_length or no_room:   # without any of its truncate_field (the context), nothing to learn from
        if stats is not None:
            stats.dropped_too_long += 1
        return None
    input_ids, vidx, labels = list(bos), [-1] * len(bos), [IGNORE] * len(bos)
    seen_virtual = False
    for kind, val, name in parts:
        if kind == "virtual":
            input_ids += [info.pad_id] * val.count
            vidx += list(range(val.start, val.start + val.count))
            labels += [IGNORE] * val.count
            seen_virtual = True
            continue
        input_ids += val
        vidx += [-1] * len(val)
        if template.answer_only_loss:
            labels += list(val) if name == template.answer_field else [IGNORE] * len(val)
        else:  # loss on every real token after the (last) virtual tokens
            labels += list(val) if (seen_virtual or template.total_virtual_tokens == 0) else [IGNORE] * len(val)
    input_ids += eos
    vidx += [-1] * len(eos)
    labels += list(eos)
    if stats is not None:
        stats.truncated += int(truncated)
    k = prefix_segment_count(template, segs)
    natural = len(bos) + sum(p[1].count if p[0] == "virtual" else len(p[1]) for p in parts[:k])
    return Example(template.taskname, input_ids, vidx, labels, where, shared_prefix_len(natural, labels, len(input_ids)))


def layout_prompt(template: TaskTemplate, parts: list[tuple[str, Any, Any]], pad_id: int, *, prefix: Sequence[int] = (),
                  suffix: Sequence[int] = (), max_len: int | None = None,
                  cut: Cut | None = None) -> tuple[list[int], list[int], bool]:
    """Lay encoded template pieces out as ``prefix + pieces + suffix``: (input_ids, virtual_index, truncated).

    Virtual markers become pad placeholders whose prompt-table rows are in virtual_index (-1 elsewhere). When the
    result is longer than ``max_len`` only the template's truncate_field is cut, from its end; it may still be
    too long when that does not help (the caller decides what to do then).
    """
    total = sum(p[1].count if p[0] == "virtual" else len(p[1]) for p in parts) + len(prefix) + len(suffix)
    truncated = False
    if max_len is not None and total > max_len and template.truncate_field is not None:
        for i, (k, ids, n) in enumerate(parts):
            if k == "text" and n == template.truncate_field:
                parts[i] = (k, (cut or end_cut)(ids, max(0, len(ids) - (total - max_len))), n)
                truncated = True
                break
    out: list[int] = list(prefix)
    vidx: list[int] = [-1] * len(out)
    for k, v, _ in parts:
        if k == "virtual":
            out += [pad_id] * v.count
            vidx += list(range(v.start, v.start + v.count))
        else:
            out += v
            vidx += [-1] * len(v)
    return out + list(suffix), vidx + [-1] * len(suffix), truncated


def build_prompt(template: TaskTemplate, record: dict[str, Any], info: TokenizerInfo, *, where: str,
                 use_virtual: bool = True, max_len: int | None = None) -> tuple[list[int], list[int]]:
    """Generation prompt (everything before the answer field): (input_ids, virtual_index)."""
    ids, vidx, _ = build_prompt_split(template, record, info, where=where, use_virtual=use_virtual, max_len=max_len)
    return ids, vidx


def build_prompt_split(template: TaskTemplate, record: dict[str, Any], info: TokenizerInfo, *, where: str,
                       use_virtual: bool = True, max_len: int | None = None) -> tuple[list[int], list[int], int]:
    """``build_prompt`` plus the length of its shareable prefix (same ids as ``build_prompt``; at least one
    token is left after the prefix, whose logits start the answer)."""
    segs = render_segments(template, record, where, with_answer=False, use_virtual=use_virtual)
    parts = [(k, v if k == "virtual" else info.encode(v), n) for k, v, n in segs]
    prefix = [info.bos_id] if info.bos_id is not None else []
    ids, vidx, _ = layout_prompt(template, parts, info.pad_id, prefix=prefix, max_len=max_len)   # may cut parts in place
    k = prefix_segment_count(template, segs)
    natural = len(prefix) + sum(p[1].count if p[0] == "virtual" else len(p[1]) for p in parts[:k])
    return ids, vidx, shared_prefix_len(natural, None, len(ids))
