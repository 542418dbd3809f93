"""Exports of a prompt artifact for other tools, and the exact input those tools must be given.

    export/npy/<task>.npy                        the task's prompt table as a numpy array
    export/peft/<task>/adapter_config.json       a PEFT PROMPT_TUNING adapter ...
    export/peft/<task>/adapter_model.safetensors ... holding the same table
    export/peft/<task>/promptlaunch_input.json   what to feed that adapter (see below)
    export/nemo/<task>.nemo                      NeMo 1.20-1.23 prompt-learning file (encoder_type: embedding)
    export/nemo/nemo-1.17/<task>.nemo            the same for NeMo 1.17-1.19 (the table's indices persistent)
    export/nemo/nemo-1.16/<task>.nemo            NeMo <= 1.16 (virtual_prompt_style: inference)
    export/vllm/<task>/                          the table, template and script for vLLM's prompt_embeds
                                                 (decoder-only models; :mod:`stages.engine.prompt_embeds`)

The NeMo layouts and what was (and was not) checked: :mod:`stages.engine.nemo.prompts`.

Why ``promptlaunch_input.json``: the engine tokenises every template piece on its own (``examples.py``), while a PEFT
user tokenises the whole text. The two give the same ids for most records of a byte-level BPE vocabulary, not
for all of them, and a T5 tokenizer appends ``</s>`` unless asked not to. The file says which text to build,
which tokenizer call to make, on how many of the training run's own records that call gives exactly the
engine's ids (with the first record where it does not), and whether PEFT can express the template at all.
``artifact.peft_input_ids`` gives the engine's ids for any record, so a user who needs identical input always has them.

PEFT prepends all virtual tokens before the input it is given, so the export is exact only for one marker at
the very start of the template and no BOS (the engine puts BOS before the virtual tokens, PEFT would put it
after them). For the encoder-decoder family ("t5") the adapter is SEQ_2_SEQ_LM with
``num_transformer_submodules: 1``: PEFT then prepends the table to the ENCODER input only, which is what the
table was trained for (PEFT's seq2seq default, 2, expects a second block of rows for the decoder).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from stages.common.io import atomic_path, write_json
from stages.engine.template import TaskTemplate, Virtual

from . import examples as D
from .family.t5 import SENTINEL   # the encoder input of the t5 family ends with it

INPUT_SPEC = "promptlaunch_input.json"
CHECKED_RECORDS = 200       # records of the run whose whole-text tokenisation is compared with the engine's


def peft_exact(template: TaskTemplate, info: D.TokenizerInfo) -> tuple[bool, str]:
    """(whether a PEFT prompt-tuning adapter sees exactly the engine's sequence, why not)."""
    markers = [i for i, p in enumerate(template.pieces) if isinstance(p, Virtual) and p.count]
    if template.total_virtual_tokens == 0:
        return False, "the task has no virtual tokens"
    if markers != [0]:
        return False, ("PEFT prepends every virtual token before the text; this template has its markers at "
                       f"pieces {markers} of {template.prompt_template!r}")
    if info.bos_id is not None:
        return False, "the tokenizer adds BOS, which the engine puts before the virtual tokens and PEFT after them"
    return True, ""


def peft_text(template: TaskTemplate, record: dict[str, Any], family: str, where: str = "record") -> str:
    """The text a PEFT user tokenises: the template up to the answer field without its virtual markers, whitespace
    placed as the engine places it; the t5 family appends ``<extra_id_0>`` (the span the answer fills)."""
    segs = D.render_segments(template, record, where, with_answer=False, use_virtual=False)
    text = "".join(value for _, value, _ in segs)
    return text + SENTINEL if family == "t5" else text


def add_special_tokens(family: str) -> bool:
    """The tokenizer call that matches the engine: the default for decoder-only models (SmolLM2 and GPT-2 add
    nothing; one that adds BOS is not exact anyway), ``add_special_tokens=False`` for T5 (no ``</s>`` after the
    sentinel: the encoder input ends with ``<extra_id_0>``)."""
    return family != "t5"


def whole_text_ids(tokenizer: Any, template: TaskTemplate, record: dict[str, Any], family: str) -> list[int]:
    """The ids a PEFT user gets from the whole text with the tokenizer call the export names."""
    text = peft_text(template, record, family)
    return list(tokenizer(text, add_special_tokens=add_special_tokens(family)).input_ids)


def engine_ids(family: Any, template: TaskTemplate, record: dict[str, Any], info: D.TokenizerInfo,
               where: str = "record") -> list[int]:
    """The engine's prompt ids for ``record`` without the virtual slots: exactly what PEFT must be given so the
    model sees the training tokens (PEFT prepends the virtual rows itself)."""
    ids, _ = family.build_prompt(template, record, info, where=where, use_virtual=False)
    return list(ids)


def tokenisation_check(family: Any, template: TaskTemplate, records: Sequence[dict[str, Any]],
                       info: D.TokenizerInfo) -> dict[str, Any]:
    """Compare whole-text ids with the engine's on up to ``CHECKED_RECORDS`` records of this task."""
    mine = [r for r in records if r.get("taskname") == template.taskname][:CHECKED_RECORDS]
    identical, first = 0, None
    for i, rec in enumerate(mine):
        want = engine_ids(family, template, rec, info, where=f"records[{i}]")
        got = whole_text_ids(info.tok, template, rec, family.name)
        if got == want:
            identical += 1
        elif first is None:
            at = next((k for k, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
            near = slice(max(0, at - 3), at + 4)   # a few ids either side of where the two part
            first = {"record": i, "text": peft_text(template, rec, family.name), "position": at,
                     "engine_ids": want[near], "whole_text_ids": got[near],
                     "engine_tokens": info.tok.convert_ids_to_tokens(want[near]),
                     "whole_text_tokens": info.tok.convert_ids_to_tokens(got[near])}
    return {"records_checked": len(mine), "identical": identical, "first_difference": first}


def input_spec(family: Any, template: TaskTemplate, records: Sequence[dict[str, Any]], info: D.TokenizerInfo) -> dict[str, Any]:
    """The content of ``promptlaunch_input.json`` for one task."""
    exact, why = peft_exact(template, info)
    fields = {name: "{" + name + "}" for name in template.input_fields}
    call = "tokenizer(text)" if add_special_tokens(family.name) else "tokenizer(text, add_special_tokens=False)"
    spec: dict[str, Any] = {
        "peft_export_exact": exact,
        "why_not_exact": why or None,
        "text": peft_text(template, fields, family.name),
        "tokenizer_call": call,
        "whole_text_tokenisation": tokenisation_check(family, template, records, info),
        "identical_ids": "python: from stages.engine.artifact import peft_input_ids; "
                         "ids = peft_input_ids(artifact_path, tokenizer, record)",
    }
    if family.name == "t5":
        spec["answer"] = ("greedy decoder output: drop a leading <extra_id_0>, end at </s> or at the next "
                          "<extra_id_N> (the start of the next span)")
    else:
        spec["answer"] = "the generated tokens after the text, up to EOS (evaluation also stops at a newline)"
    return spec


def write_exports(folder: Path, tables: dict[str, torch.Tensor], base: dict[str, Any], family: str,
                  specs: dict[str, dict[str, Any]], templates: dict[str, TaskTemplate] | None = None) -> None:
    """``export/npy``, ``export/peft``, ``export/nemo`` and (decoder-only) ``export/vllm`` for every task (inside
    the artifact's temporary folder)."""
    import numpy as np
    from safetensors.torch import save_file

    for task, table in tables.items():
        with atomic_path(folder / "npy" / f"{task}.npy", suffix=".npy") as tmp:
            with open(tmp, "wb") as fh:   # a file object: np.save would append .npy to a path
                np.save(fh, table.numpy())
        if table.shape[0] == 0:
            continue
        peft = folder / "peft" / task
        peft.mkdir(parents=True, exist_ok=True)
        write_json(peft / "adapter_config.json", {
            "peft_type": "PROMPT_TUNING",
            "task_type": "SEQ_2_SEQ_LM" if family == "t5" else "CAUSAL_LM",
            "num_virtual_tokens": int(table.shape[0]),
            "token_dim": int(table.shape[1]),
            "num_transformer_submodules": 1,   # t5: the encoder only (see the module docstring)
            "num_attention_heads": base.get("num_attention_heads"),
            "num_layers": base.get("num_layers"),
            "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": None,
            "tokenizer_name_or_path": base.get("resolved"),
            "base_model_name_or_path": base.get("resolved"),
            "inference_mode": True,
            "revision": None,
        })
        with atomic_path(peft / "adapter_model.safetensors") as tmp:
            save_file({"prompt_embeddings": table.contiguous()}, str(tmp))
        if task in specs:
            write_json(peft / INPUT_SPEC, specs[task])
    if templates is not None:
        write_nemo_exports(folder / "nemo", tables, templates, base, family)
        if family == "gpt":
            from .prompt_embeds import write_vllm_exports

            write_vllm_exports(folder / "vllm", tables, templates, base)


NEMO_EXPORTS = {"1.20": "", "1.17": "nemo-1.17", "1.16": "nemo-1.16"}   # layout -> folder under export/nemo/


def write_nemo_exports(folder: Path, tables: dict[str, torch.Tensor], templates: dict[str, TaskTemplate],
                       base: dict[str, Any], family: str) -> None:
    """``export/nemo``: every task with virtual tokens, one ``.nemo`` per task and NeMo layout."""
    from .nemo import prompts as nemo_prompts

    for task, table in tables.items():
        if table.shape[0] == 0:
            continue
        for layout, sub in NEMO_EXPORTS.items():
            nemo_prompts.write(folder / sub / f"{task}.nemo", task, table, templates[task], layout,
                               base.get("language_model_path"), family)
