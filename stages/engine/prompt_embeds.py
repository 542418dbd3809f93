"""``export/vllm/<task>/``: a tuned prompt for engines that take the prompt as input embeddings.

vLLM removed prompt adapters (2025); its route for a soft prompt is ``prompt_embeds``: the whole prompt handed over
as embeddings (``LLM(..., enable_prompt_embeds=True)``, ``generate({"prompt_embeds": tensor})``, the server's
``--enable-prompt-embeds``); transformers' ``generate(inputs_embeds=...)`` and llama.cpp's ``llama_batch.embd``
take the same tensor. So the export holds the prompt table and the template, and :class:`PromptEmbedder` lays a
record out exactly as the engine does for generation (``examples.build_prompt``: BOS, each template piece
tokenised on its own, the truncate field cut to fit), with the tuned rows at the virtual markers and the base
model's own input embeddings everywhere else. Decoded greedily these give the engine's answers
(``tests/stages/engine/test_prompt_embeds.py``, through transformers).

    export/vllm/<task>/prompt_table.safetensors   {"prompt_table": [virtual tokens, hidden]}, float32
    export/vllm/<task>/promptlaunch_vllm.json     the template, the base model, how an answer is cut
    export/vllm/<task>/generate_vllm.py           records in, vLLM's answers out (a copy of generate_vllm.py here)

Decoder-only ("gpt") models only: vLLM's ``prompt_embeds`` is for decoder-only models.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stages.common.errors import UserError
from stages.common.io import atomic_path, write_json, write_text

from . import examples as D
from .template import TaskTemplate, parse_template

TABLE = "prompt_table.safetensors"
SPEC = "promptlaunch_vllm.json"
SCRIPT = "generate_vllm.py"
STOP_STRINGS = ("\n",)   # evaluation's default (conf/evaluation/*/squad.yaml inference.stop_strings)


def write_vllm_exports(folder: Path, tables: dict[str, torch.Tensor], templates: dict[str, TaskTemplate],
                       base: dict[str, Any]) -> None:
    """One folder per task with virtual tokens (inside the artifact's temporary folder)."""
    from safetensors.torch import save_file

    script = Path(__file__).with_name(SCRIPT).read_text(encoding="utf-8")
    for task, table in tables.items():
        if table.shape[0] == 0:
            continue
        out = Path(folder) / task
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / TABLE) as tmp:
            save_file({"prompt_table": table.to(torch.float32).contiguous()}, str(tmp))
        write_json(out / SPEC, {
            "task": task,
            "template": templates[task].to_dict(),
            "virtual_tokens": int(table.shape[0]),
            "hidden_size": int(table.shape[1]),
            "language_model_path": base.get("language_model_path"),
            "resolved_model": base.get("resolved"),
            "stop_strings": list(STOP_STRINGS),
            "answer": "greedy; leading whitespace dropped, cut at the first stop string, stripped (as evaluation does)",
        })
        write_text(out / SCRIPT, script)


@dataclass(frozen=True)
class VllmExport:
    """One task's ``export/vllm/<task>/`` folder, read back."""

    folder: Path
    task: str
    template: TaskTemplate
    table: torch.Tensor
    spec: dict[str, Any]

    @property
    def language_model_path(self) -> str:
        """The base model the table was trained with (its loadable location)."""
        return str(self.spec.get("resolved_model") or self.spec["language_model_path"])


def load_vllm_export(folder: str | Path) -> VllmExport:
    from safetensors.torch import load_file

    p = Path(folder)
    if not (p / SPEC).is_file() or not (p / TABLE).is_file():
        raise UserError(f"{folder}: not a vLLM prompt export (needs {SPEC} and {TABLE}); point at "
                        f"<artifact_path>/export/vllm/<task>")
    spec = json.loads((p / SPEC).read_text(encoding="utf-8"))
    return VllmExport(p, spec["task"], parse_template(spec["template"], f"{p / SPEC}:template"),
                      load_file(str(p / TABLE))["prompt_table"], spec)


class PromptEmbedder:
    """Records -> ``prompt_embeds`` ([tokens, hidden]) of one task: the base model's tokenizer and input embeddings
    with the export's prompt table at the virtual markers."""

    def __init__(self, export: VllmExport, tokenizer: Any, embeddings: torch.nn.Module,
                 max_positions: int | None = None) -> None:
        self.export = export
        self.info = D.TokenizerInfo(tokenizer)
        self.embeddings = embeddings
        self.max_positions = max_positions

    @classmethod
    def from_base_model(cls, export: VllmExport, language_model_path: str | None = None) -> "PromptEmbedder":
        """Load the base model's tokenizer and input embeddings (on CPU; the rest of the model is dropped)."""
        from .base_model import load_model, load_tokenizer, resolve

        resolved = resolve(language_model_path or export.language_model_path, "model")
        model = load_model(resolved.location, None, "model")
        emb = model.get_input_embeddings()
        if emb.weight.shape[1] != export.table.shape[1]:
            raise UserError(f"model: {resolved.given} has hidden size {emb.weight.shape[1]}, the prompt table "
                            f"{export.table.shape[1]}; use the base model the prompt was trained with")
        positions = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        return cls(export, load_tokenizer(resolved.location, "model"), emb, positions)

    @torch.no_grad()
    def __call__(self, record: dict[str, Any], tokens_to_generate: int = 32, where: str = "record") -> torch.Tensor:
        """The record's prompt as embeddings; the prompt is cut to leave ``tokens_to_generate`` positions, as
        evaluation cuts it (``PromptedModel.generate``)."""
        budget = self.max_positions - tokens_to_generate if self.max_positions else None
        ids, vidx = D.build_prompt(self.export.template, record, self.info, where=where, use_virtual=True, max_len=budget)
        device = self.embeddings.weight.device
        x = self.embeddings(torch.tensor([ids], device=device))[0].clone()
        virtual = torch.tensor(vidx, device=device)
        at = virtual >= 0
        x[at] = self.export.table.to(device=device, dtype=x.dtype)[virtual[at]]
        return x


def cut_answer(text: str, stop_strings: tuple[str, ...] | list[str] = STOP_STRINGS) -> str:
    """An answer as evaluation reports it: leading whitespace dropped, cut at the first stop string, stripped
    (``PromptedModel.cut_at_stop``)."""
    from .prompted_model import PromptedModel

    return PromptedModel.cut_at_stop(text, tuple(stop_strings))
