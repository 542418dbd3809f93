"""The PEFT hand-off as a user runs it, for the tests that hold it against the engine's own answers.

A user loads ``PeftModel.from_pretrained(base, export/peft/<task>)``, fills the text that
``promptlaunch_input.json`` names with a record's fields, tokenises it with the call it names, and decodes
greedily. Two decoders: PEFT's ``generate`` (what every user calls) and a cache-free greedy loop over PEFT's
own forward pass, so a regression in PEFT's generation path shows as its own named failure while the loop
still proves the exported table right.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import torch

DECODERS = ("generate", "loop")


def input_spec(adapter: str | Path) -> dict[str, Any]:
    return json.loads((Path(adapter) / "promptlaunch_input.json").read_text(encoding="utf-8"))


def user_text(spec: dict[str, Any], record: dict[str, Any]) -> str:
    """The spec's text with the record's fields put in, as a user's f-string would."""
    return re.sub(r"\{(\w+)\}", lambda m: str(record[m.group(1)]), spec["text"])


def user_ids(tokenizer: Any, spec: dict[str, Any], record: dict[str, Any], *, text: str | None = None) -> list[int]:
    """Whole-text ids with the tokenizer call the spec names (``text`` overrides the filled-in text)."""
    text = user_text(spec, record) if text is None else text
    special = spec["tokenizer_call"] == "tokenizer(text)"
    return list(tokenizer(text, add_special_tokens=special).input_ids)


def load_peft(base_dir: str, adapter: str | Path, *, seq2seq: bool = False) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    return PeftModel.from_pretrained(auto.from_pretrained(base_dir), str(adapter)).eval()


@torch.no_grad()
def causal_answer(model: Any, ids: Sequence[int], *, max_new_tokens: int, eos_id: int | None, pad_id: int,
                  decoder: str) -> list[int]:
    """Greedy continuation of one unpadded prompt through PEFT, cut at EOS."""
    x = torch.tensor([list(ids)], dtype=torch.long)
    if decoder == "generate":
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, eos_token_id=eos_id, pad_token_id=pad_id)
        new = out[0, x.shape[1]:].tolist()
        return new[: new.index(eos_id)] if eos_id in new else new
    got: list[int] = []
    for _ in range(max_new_tokens):
        cur = torch.tensor([list(ids) + got], dtype=torch.long)
        tok = int(model(input_ids=cur, attention_mask=torch.ones_like(cur), use_cache=False).logits[0, -1].argmax())
        if tok == eos_id:
            break
        got.append(tok)
    return got


@torch.no_grad()
def seq2seq_answer(model: Any, ids: Sequence[int], *, max_new_tokens: int, stop_ids: set[int], sentinel: int,
                   vocab_limit: int, decoder: str) -> list[int]:
    """Greedy T5 answer through PEFT: a leading <extra_id_0> dropped, cut at </s> or the next sentinel, at most
    ``max_new_tokens`` answer tokens (the convention ``promptlaunch_input.json`` states)."""
    x = torch.tensor([list(ids)], dtype=torch.long)
    mask = torch.ones_like(x)
    if decoder == "generate":
        out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=max_new_tokens + 1, do_sample=False,
                             num_beams=1)
        raw = out[0, 1:].tolist()   # after the decoder start token
    else:
        start = int(model.config.decoder_start_token_id)
        raw = []
        for _ in range(max_new_tokens + 1):
            dec = torch.tensor([[start] + raw], dtype=torch.long)
            logits = model(input_ids=x, attention_mask=mask, decoder_input_ids=dec, use_cache=False).logits[0, -1]
            raw.append(int(logits[:vocab_limit].argmax()))
            if len(raw) > 1 and raw[-1] in stop_ids | {sentinel}:
                break
    if raw and raw[0] == sentinel:
        raw = raw[1:]
    got: list[int] = []
    for tok in raw:
        if tok in stop_ids or tok == sentinel or len(got) >= max_new_tokens:
            break
        got.append(tok)
    return got


def mismatches(engine: Sequence[str], peft: Sequence[str], records: Sequence[dict[str, Any]]) -> list[str]:
    """One line per question where PEFT's answer is not the engine's."""
    return [f"#{i} {r.get('question')!r}: engine {a!r}, PEFT {b!r}"
            for i, (r, a, b) in enumerate(zip(records, engine, peft)) if a != b]


def perturbed_copy(adapter: str | Path, dest: Path) -> Path:
    """A copy of an exported adapter whose table is replaced by a seeded random one of the same scale."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, dest)
    table = load_file(str(dest / "adapter_model.safetensors"))["prompt_embeddings"]
    other = torch.randn(table.shape, generator=torch.Generator().manual_seed(0)) * table.std()
    save_file({"prompt_embeddings": other.contiguous()}, str(dest / "adapter_model.safetensors"))
    return dest
