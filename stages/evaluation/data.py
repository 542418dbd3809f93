"""The test JSONL: a fixed slice of records, checked against the task templates before any generation.

Records look like ``{"taskname", "id", "context", "question", "answer"}`` where ``answer`` (the
template's answer field) is the list of gold answers or a single string. Blank lines are skipped; the
record index counts the other lines, so ``offset``/``max_examples`` pick the same questions every run.
Every problem is a UserError naming ``file:line``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from stages.common.checks import Need
from stages.common.errors import UserError
from stages.common.io import text_lines
from stages.engine.template import TaskTemplate

from .config import PREFIX

DEFAULT_ANSWER_FIELD = "answer"


@dataclass(frozen=True)
class Line:
    """A parsed JSONL record and where it came from."""

    index: int          # 0-based record index in the file (blank lines not counted)
    line: int           # 1-based line number
    record: dict[str, Any]


@dataclass(frozen=True)
class TestSlice:
    """``records[start:end]`` of ``path`` (which holds ``records_in_file`` records)."""

    path: Path
    lines: list[Line]
    start: int
    end: int
    records_in_file: int

    @property
    def label(self) -> str:
        return f"{self.path.name}[{self.start}:{self.end}]"


@dataclass(frozen=True)
class Example:
    """One question to answer: the generation inputs (answer field removed) and its gold answers."""

    index: int
    line: int
    id: Any
    taskname: str
    inputs: dict[str, Any]
    golds: tuple[str, ...]


def read_slice(path: Path, offset: int, max_examples: int | None, key: str = f"{PREFIX}.data.test_ds") -> TestSlice:
    """Parse every line of ``path`` (a malformed line anywhere is an error); keep the requested slice. ``key`` names
    the file in messages."""
    problem = Need.problem(str(path), key, "run the data_preparation stage first or fix the path")
    if problem:
        raise UserError(problem)
    end = None if max_examples is None else offset + max_examples
    kept: list[Line] = []
    n = 0
    for lineno, text in text_lines(path):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno}); fix or delete that line "
                "(one JSON object per line)"
            ) from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object per line, got {type(record).__name__}; fix that line")
        if n >= offset and (end is None or n < end):
            kept.append(Line(n, lineno, record))
        n += 1
    if n == 0:
        raise UserError(f"{key}: '{path}' has no records; run the data_preparation stage again or fix the path")
    if not kept:
        raise UserError(f"{PREFIX}.data.offset: {offset} skips all {n} records of {path}; set it below {n}")
    return TestSlice(path, kept, offset, kept[-1].index + 1, n)


def check_examples(data: TestSlice, templates: Mapping[str, TaskTemplate], source: str) -> list[Example]:
    """Match each record to its task template; ``source`` names where the templates came from."""
    out = []
    for ln in data.lines:
        rec, where = ln.record, f"{data.path}:{ln.line}"
        template = template_for(rec, where, templates, source)
        answer_field = template.answer_field or DEFAULT_ANSWER_FIELD
        golds = _golds(rec.get(answer_field), answer_field, where)
        inputs = {k: v for k, v in rec.items() if k != answer_field}
        out.append(Example(ln.index, ln.line, rec.get("id"), template.taskname, inputs, golds))
    return out


def template_for(rec: dict[str, Any], where: str, templates: Mapping[str, TaskTemplate], source: str) -> TaskTemplate:
    """The record's task template, with every input field it needs present as text (gold answers not needed)."""
    task = rec.get("taskname")
    if not isinstance(task, str) or not task:
        raise UserError(f"{where}: record has no 'taskname'; add one of {sorted(templates)} to every record")
    template = templates.get(task)
    if template is None:
        raise UserError(
            f"{where}: taskname '{task}' has no template in {source} (have: {sorted(templates)}); "
            "evaluate a file of those tasks or a prompt artifact trained on this task"
        )
    for field in template.input_fields:
        value = rec.get(field)
        if value is None or isinstance(value, (dict, list, bool)):
            what = "lacks" if value is None else f"has a {type(value).__name__} in"
            raise UserError(
                f"{where}: record {what} field '{field}' that the template of task '{task}' needs "
                f"({template.prompt_template!r}); give every record a text '{field}' or use a matching template"
            )
    return template


def _golds(value: Any, field: str, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    if value is None:
        raise UserError(
            f"{where}: record has no gold answer '{field}'; evaluate the ground-truth file "
            "(squad_test_ground_truth.jsonl, not squad_test.jsonl) or add the answers"
        )
    raise UserError(f"{where}: '{field}' must be a non-empty list of answer strings or one string, got {value!r:.80}")
