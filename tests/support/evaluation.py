"""The evaluation stage without a real model: a fake PromptedModel with known answers, SQuAD records for it, and the
stage config and files the stage reads."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from stages.engine.template import parse_templates
from tests.support.templates import SQUAD_T

SQUAD_RECORDS = [
    {"taskname": "squad", "id": "q0", "context": "The Eiffel Tower is in Paris.", "question": "Where is the tower?", "answer": ["Paris", "in Paris"]},
    {"taskname": "squad", "id": "q1", "context": "It opened in 1889.", "question": "When did it open?", "answer": ["1889"]},
    {"taskname": "squad", "id": "q2", "context": "Gustave Eiffel's company built it.", "question": "Who built it?", "answer": ["Gustave Eiffel's company"]},
    {"taskname": "squad", "id": "q3", "context": "It is 330 m tall.", "question": "How tall?", "answer": "330 m"},
]
TUNED = {"Where is the tower?": "the Paris", "When did it open?": "1889", "Who built it?": "Gustave Eiffel", "How tall?": "330 metres",
         "Capital of Japan?": "Tokyo", "Largest planet?": "Saturn"}


class FakeModel:
    """Implements the PromptedModel contract: templates, describe(), generate()."""

    def __init__(self, specs: list[dict[str, Any]], artifact: str | None) -> None:
        self.templates = parse_templates(specs)
        self.artifact = artifact
        self.calls: list[dict[str, Any]] = []

    def describe(self) -> dict[str, Any]:
        return {"model": "fake-llm", "artifact": self.artifact, "family": "gpt",
                "virtual_tokens": {t: v.total_virtual_tokens for t, v in self.templates.items()}}

    def generate(self, records, *, tokens_to_generate=32, batch_size=8, use_virtual_prompt=True, stop_strings=("\n",), progress=True,
                 **extra):
        self.calls.append(dict(records=[dict(r) for r in records], tokens_to_generate=tokens_to_generate, batch_size=batch_size,
                               use_virtual_prompt=use_virtual_prompt, stop_strings=tuple(stop_strings), **extra))
        return [TUNED[r["question"]] if use_virtual_prompt else r["question"].split()[0] for r in records]


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records), encoding="utf-8")
    return path


def make_artifact(tmp_path: Path) -> Path:
    art = tmp_path / "prompt_artifact"
    art.mkdir(exist_ok=True)
    (art / "artifact.json").write_text("{}")
    return art


def make_cfg(tmp_path: Path, test_ds: Path, artifact: Path | None, **over: Any):
    cfg = OmegaConf.create({
        "run": {"name": "eval_prompt_squad_tiny", "results_dir": str(tmp_path / "results")},
        "trainer": {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "precision": "32"},
        "model": {"artifact_path": str(artifact) if artifact else None, "language_model_path": None, "task_templates": [SQUAD_T]},
        "data": {"test_ds": str(test_ds), "batch_size": 3, "max_examples": None, "offset": 0},
        "inference": {"tokens_to_generate": 7, "greedy": True, "stop_strings": ["\n", "Question:"], "compare_baseline": True,
                      "baseline_only": False, "progress": False},
    })
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in over.items()]))
