"""Encoder-decoder adapter ("t5"): prompt learning for a frozen ``AutoModelForSeq2SeqLM`` (T5, T5 v1.1, mT5, ...).

Same interface as ``family.gpt.DecoderOnlyFamily`` (the ``Family`` protocol); the trainer, ``PromptedModel``
and the evaluation stage do not branch on the family. The data follow T5's span-corruption pretraining
convention, as NeMo does::

    encoder input  = the template up to {answer} (virtual tokens at its markers) + <extra_id_0>
    decoder target = <extra_id_0> answer </s>          (</s> only with model.data.add_eos=true)

    template  "<|VIRTUAL_PROMPT_0|> Question: {question} Context: {context} Answer: {answer}"
    encoder   [v0 .. v99] ▁Question : ▁What ... ▁Context : ▁The ... ▁Answer : <extra_id_0>
    labels    <extra_id_0> ▁Paris </s>              decoder input: <decoder_start> <extra_id_0> ▁Paris

Details:
  * Virtual positions of the encoder input get the task's prompt rows (``inputs_embeds``), exactly like the
    decoder-only family; nothing is added to the decoder.
  * Each template piece is tokenised on its own, without special tokens (as in ``examples.py``); the sentinel is
    the id of ``<extra_id_0>`` in the model's tokenizer (UserError if it has none). No EOS follows the sentinel.
  * ``model.data.max_seq_length`` limits the encoder input (virtual tokens + text + sentinel); only the
    template's ``truncate_field`` is cut (from its end); an example that still does not fit is dropped. The
    decoder target is never cut. ``answer_only_loss`` has no effect: the loss is always on the target only.
  * Batches are right-padded (relative position buckets: padding at the end changes nothing) with an
    attention mask; label padding is -100.
  * Greedy generation runs the encoder once and the decoder with its KV cache from ``decoder_start_token_id``.
    A leading ``<extra_id_0>`` is dropped (it does not count towards ``tokens_to_generate``); the answer ends
    at EOS or at any other sentinel (the start of the next span), or at a stop string.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from stages.common.errors import UserError
from stages.engine.template import TaskTemplate

from .. import collate as C
from .. import examples as D
from ..prompts import PromptStore, embed_inputs

SENTINEL = "<extra_id_0>"
_SENTINEL_RE = re.compile(r"^<extra_id_\d+>$")


def sentinel_ids(tokenizer: Any, key: str = "model.language_model_path") -> tuple[int, set[int]]:
    """(id of <extra_id_0>, ids of every <extra_id_N>); UserError if the tokenizer has no sentinels."""
    vocab = tokenizer.get_vocab()
    if SENTINEL not in vocab:
        raise UserError(
            f"{key}: the model is encoder-decoder but its tokenizer has no sentinel token {SENTINEL}; prompt learning "
            "for T5/mT5 follows their span-corruption convention (encoder input ends with <extra_id_0>, the target "
            "starts with it); use a T5/mT5 checkpoint with its own tokenizer"
        )
    return int(vocab[SENTINEL]), {int(i) for t, i in vocab.items() if _SENTINEL_RE.match(t)}


class EncoderDecoderFamily:
    name = "t5"
    auto_class = "AutoModelForSeq2SeqLM"
    shares_prefix = False   # the encoder is bidirectional: a prefix's states depend on what follows it
    prompt_lookup = False   # its own one-token decoding loop (drafts from the encoder input are not built)
    embed = staticmethod(embed_inputs)

    def __init__(self, tokenizer: Any = None) -> None:
        self.sentinel: int | None = None
        self.sentinels: set[int] = set()
        self.vocab_limit: int | None = None
        if tokenizer is not None:
            self.sentinel, self.sentinels = sentinel_ids(tokenizer)
            self.vocab_limit = len(tokenizer)   # real T5 pads its embedding matrix past the tokenizer (32128 > 32100)

    def _sentinel(self, info: D.TokenizerInfo) -> int:
        if self.sentinel is None:
            self.sentinel, self.sentinels = sentinel_ids(info.tok)
        return self.sentinel

    # ---- examples -------------------------------------------------------------------------------
    def _encoder_parts(self, template: TaskTemplate, record: dict[str, Any], info: D.TokenizerInfo, where: str,
                       use_virtual: bool = True) -> list[tuple[str, Any, Any]]:
        if template.answer_field is None:
            raise UserError(
                f"model.task_templates[{template.taskname}].answer_field: required for encoder-decoder models "
                "(the answer field becomes the decoder target); name the field holding the answer"
            )
        segs = D.render_segments(template, record, where, with_answer=False, use_virtual=use_virtual)
        return [(k, v if k == "virtual" else info.encode(v), n) for k, v, n in segs]

    def _encoder_ids(self, template: TaskTemplate, parts: list[tuple[str, Any, Any]], info: D.TokenizerInfo,
                     max_len: int | None, cut: D.Cut | None = None) -> tuple[list[int], list[int], bool]:
        """(input_ids, virtual_index, truncated); ids may still exceed max_len when no truncate field helps."""
        return D.layout_prompt(template, parts, info.pad_id, suffix=[self._sentinel(info)], max_len=max_len, cut=cut)

    def build_example(self, template: TaskTemplate, record: dict[str, Any], info: D.TokenizerInfo, *, max_seq_length: int,
                      add_eos: bool, where: str, stats: D.BuildStats | None = None,
                      cut: D.Cut | None = None) -> D.Example | None:
        """Example with ``input_ids``/``virtual_index`` = encoder input and ``labels`` = decoder target ids."""
        parts = self._encoder_parts(template, record, info, where)
        ids, vidx, truncated = self._encoder_ids(template, parts, info, max_seq_length, cut)
        if len(ids) > max_seq_length:
            if stats is not None:
                stats.dropped_too_long += 1
            return None
        answer = D.record_value(record, template.answer_field, where)
        target = [self._sentinel(info)] + info.encode(answer)
        if add_eos and info.eos_id is not None:
            target.append(info.eos_id)
        if stats is not None:
            stats.truncated += int(truncated)
        return D.Example(template.taskname, ids, vidx, target, where)

    def build_prompt(self, template: TaskTemplate, record: dict[str, Any], info: D.TokenizerInfo, *, where: str,
                     use_virtual: bool = True, max_len: int | None = None) -> tuple[list[int], list[int]]:
        """Encoder input for generation: the same tokens as in training."""
        parts = self._encoder_parts(template, record, info, where, use_virtual)
        ids, vidx, _ = self._encoder_ids(template, parts, info, max_len)
        return ids, vidx

    # ---- batches --------------------------------------------------------------------------------
    @staticmethod
    def collate(examples: Sequence[D.Example], task_ids: dict[str, int], pad_id: int, *,
                decoder_start_id: int | None = None) -> dict[str, Any]:
        """Right-padded encoder batch + decoder labels (-100 padding) and decoder inputs (labels shifted right)."""
        start = pad_id if decoder_start_id is None else decoder_start_id
        batch = C.collate([D.Example(e.task, e.input_ids, e.virtual_index, [D.IGNORE] * len(e.input_ids)) for e in examples],
                          task_ids, pad_id)
        del batch["labels"]
        n = max(len(e.labels) for e in examples)
        labels, dec_in, dec_mask = [], [], []
        for e in examples:
            pad = n - len(e.labels)
            labels.append(list(e.labels) + [D.IGNORE] * pad)
            dec_in.append([start] + [pad_id if t == D.IGNORE else t for t in e.labels[:-1]] + [pad_id] * pad)
            dec_mask.append([1] * len(e.labels) + [0] * pad)
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
        batch["decoder_input_ids"] = torch.tensor(dec_in, dtype=torch.long)
        batch["decoder_attention_mask"] = torch.tensor(dec_mask, dtype=torch.long)
        return batch

    # ---- training -------------------------------------------------------------------------------
    def loss(self, model: Any, store: PromptStore, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of target-token cross-entropies, number of target tokens)."""
        x = self.embed(model, store, batch["input_ids"], batch["virtual_index"], batch["task_ids"])
        dec_in = batch["decoder_input_ids"]
        start = _decoder_start(model)
        if start is not None and int(dec_in[0, 0]) != start:  # collated without the model's start id
            dec_in = dec_in.clone()
            dec_in[:, 0] = start
        out = model(inputs_embeds=x, attention_mask=batch["attention_mask"], decoder_input_ids=dec_in,
                    decoder_attention_mask=batch["decoder_attention_mask"], use_cache=False)
        labels = batch["labels"]
        sel = labels != D.IGNORE
        total = F.cross_entropy(out.logits[sel].float(), labels[sel], reduction="sum")
        return total, sel.sum()

    # ---- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, model: Any, store: PromptStore | None, rows: Sequence[tuple[list[int], list[int], int]], *,
                 pad_id: int, eos_ids: set[int], tokens_to_generate: int,
                 is_done: Callable[[int, list[int]], bool]) -> list[list[int]]:
        """Greedy decoding for one batch: right-padded encoder input (run once), decoder with the KV cache."""
        device = next(model.parameters()).device
        exs = [D.Example("", ids, vidx, [D.IGNORE] * len(ids)) for ids, vidx, _ in rows]
        batch = C.collate(exs, {"": 0}, pad_id)
        ids = batch["input_ids"].to(device)
        vidx = batch["virtual_index"].to(device)
        mask = batch["attention_mask"].to(device)
        task_ids = torch.tensor([t for _, _, t in rows], dtype=torch.long, device=device)
        x = self.embed(model, store, ids, vidx, task_ids)
        encoder_outputs = model.get_encoder()(inputs_embeds=x, attention_mask=mask, return_dict=True)
        start = _decoder_start(model)
        cur = torch.full((len(rows), 1), pad_id if start is None else start, dtype=torch.long, device=device)
        stop_ids = set(eos_ids) | (self.sentinels - {self.sentinel})
        generated: list[list[int]] = [[] for _ in rows]
        done = [False] * len(rows)
        past = None
        for step in range(tokens_to_generate + 1):   # +1: a leading <extra_id_0> is not part of the answer
            out = model(encoder_outputs=encoder_outputs, attention_mask=mask, decoder_input_ids=cur,
                        past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[:, -1]
            if self.vocab_limit is not None:
                logits = logits[:, : self.vocab_limit]
            nxt = logits.argmax(-1)
            for i, tok in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                if step == 0 and tok == self.sentinel:
                    continue
                if tok in stop_ids or tok == self.sentinel:
                    done[i] = True
                    continue
                generated[i].append(tok)
                if is_done(i, generated[i]) or len(generated[i]) >= tokens_to_generate:
                    done[i] = True
            if all(done):
                break
            cur = nxt.unsqueeze(1)
        return generated


def _decoder_start(model: Any) -> int | None:
    cfg = model.config
    start = getattr(cfg, "decoder_start_token_id", None)
    if start is None:
        start = getattr(getattr(model, "generation_config", None), "decoder_start_token_id", None)
    return None if start is None else int(start)
