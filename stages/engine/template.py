"""Task templates as NeMo users write them, parsed without torch.

A template such as ``"<|VIRTUAL_PROMPT_0|>Context: {context} Question: {question} Answer: {answer}"``
is split into literal text, ``{field}`` placeholders and virtual-prompt markers. The launcher uses
this to reject bad templates before submitting; the engine uses the same parse to build examples.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union

from stages.common.checks import check_keys
from stages.common.errors import UserError

MARKER_RE = re.compile(r"<\|VIRTUAL_PROMPT_(\d+)\|>")
FIELD_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
KEYS = ("taskname", "prompt_template", "total_virtual_tokens", "virtual_token_splits", "truncate_field",
        "answer_only_loss", "answer_field")   # the keys of a task_templates entry (TaskTemplate.to_dict)


@dataclass(frozen=True)
class Text:
    """Literal template text."""

    text: str


@dataclass(frozen=True)
class Field:
    """A ``{name}`` placeholder filled from the JSONL record."""

    name: str


@dataclass(frozen=True)
class Virtual:
    """``<|VIRTUAL_PROMPT_i|>``: ``count`` virtual tokens, rows ``start:start+count`` of the task's table."""

    index: int
    start: int
    count: int


Piece = Union[Text, Field, Virtual]


@dataclass(frozen=True)
class TaskTemplate:
    """One task's template, validated: markers in order 0..n-1, splits summing to the total."""

    taskname: str
    prompt_template: str
    total_virtual_tokens: int
    virtual_token_splits: tuple[int, ...]
    truncate_field: str | None
    answer_only_loss: bool
    answer_field: str | None
    pieces: tuple[Piece, ...] = field(default=(), compare=False)

    @property
    def fields(self) -> tuple[str, ...]:
        """Placeholder names in template order."""
        return tuple(p.name for p in self.pieces if isinstance(p, Field))

    @property
    def input_fields(self) -> tuple[str, ...]:
        """Fields a record must provide at inference (everything but the answer field)."""
        return tuple(f for f in self.fields if f != self.answer_field)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict as written in configs and artifacts."""
        return {
            "taskname": self.taskname,
            "prompt_template": self.prompt_template,
            "total_virtual_tokens": self.total_virtual_tokens,
            "virtual_token_splits": list(self.virtual_token_splits),
            "truncate_field": self.truncate_field,
            "answer_only_loss": self.answer_only_loss,
            "answer_field": self.answer_field,
        }


def _split(template: str) -> list[Piece]:
    pieces: list[Piece] = []
    pos = 0
    for m in re.finditer(f"{MARKER_RE.pattern}|{FIELD_RE.pattern}", template):
        if m.start() > pos:
            pieces.append(Text(template[pos : m.start()]))
        if m.group(1) is not None:
            pieces.append(Virtual(int(m.group(1)), 0, 0))
        else:
            pieces.append(Field(m.group(2)))
        pos = m.end()
    if pos < len(template):
        pieces.append(Text(template[pos:]))
    return pieces


def parse_template(spec: Mapping[str, Any], key: str = "model.task_templates") -> TaskTemplate:
    """Validate one ``task_templates`` entry; every problem is a one-line UserError naming ``key``."""
    check_keys(spec, KEYS, key)
    name = spec.get("taskname")
    if not name or not isinstance(name, str):
        raise UserError(f"{key}.taskname: missing or not a string; give each template a taskname")
    key = f"{key}[{name}]"
    template = spec.get("prompt_template")
    if not isinstance(template, str) or not template.strip():
        raise UserError(f"{key}.prompt_template: missing; write e.g. '<|VIRTUAL_PROMPT_0|> {{question}} Answer: {{answer}}'")
    total = spec.get("total_virtual_tokens")
    if not isinstance(total, int) or isinstance(total, bool) or total < 0:
        raise UserError(f"{key}.total_virtual_tokens: must be an integer >= 0, got {total!r}")
    splits_raw = spec.get("virtual_token_splits")
    if splits_raw is None:
        splits_raw = [total] if MARKER_RE.search(template) else []
    splits = tuple(splits_raw)
    if any(not isinstance(s, int) or isinstance(s, bool) or s <= 0 for s in splits):
        raise UserError(f"{key}.virtual_token_splits: every split must be a positive integer, got {list(splits)}")
    if sum(splits) != total:
        raise UserError(
            f"{key}.virtual_token_splits: {list(splits)} sums to {sum(splits)} but total_virtual_tokens is {total}; "
            "make them agree"
        )
    raw = _split(template)
    markers = [p.index for p in raw if isinstance(p, Virtual)]
    if markers != list(range(len(markers))):
        raise UserError(
            f"{key}.prompt_template: virtual prompt markers must be <|VIRTUAL_PROMPT_0|>, <|VIRTUAL_PROMPT_1|>, ... "
            f"each once and in order; found indices {markers}"
        )
    if len(markers) != len(splits):
        raise UserError(
            f"{key}: prompt_template has {len(markers)} <|VIRTUAL_PROMPT_n|> markers but virtual_token_splits has "
            f"{len(splits)} entries {list(splits)}; give one split per marker"
        )
    starts = [sum(splits[:i]) for i in range(len(splits))]
    pieces = tuple(Virtual(p.index, starts[p.index], splits[p.index]) if isinstance(p, Virtual) else p for p in raw)
    fields = [p.name for p in pieces if isinstance(p, Field)]
    answer_field = spec.get("answer_field")
    truncate_field = spec.get("truncate_field")
    answer_only_loss = bool(spec.get("answer_only_loss", False))
    if answer_field is not None and answer_field not in fields:
        raise UserError(f"{key}.answer_field: '{answer_field}' is not a {{field}} of prompt_template (fields: {fields})")
    if truncate_field is not None and truncate_field not in fields:
        raise UserError(f"{key}.truncate_field: '{truncate_field}' is not a {{field}} of prompt_template (fields: {fields})")
    if answer_only_loss:
        if answer_field is None:
            raise UserError(f"{key}.answer_field: required when answer_only_loss=true; name the template field holding the answer")
        last = pieces[-1]
        if not (isinstance(last, Field) and last.name == answer_field):
            raise UserError(
                f"{key}.prompt_template: with answer_only_loss=true the template must end with {{{answer_field}}}; "
                "move the answer field to the end"
            )
        if truncate_field == answer_field:
            raise UserError(f"{key}.truncate_field: must differ from answer_field '{answer_field}'; truncate the context instead")
    if len(set(fields)) != len(fields):
        raise UserError(f"{key}.prompt_template: a field appears twice ({fields}); use each {{field}} once")
    return TaskTemplate(
        taskname=name,
        prompt_template=template,
        total_virtual_tokens=total,
        virtual_token_splits=splits,
        truncate_field=truncate_field,
        answer_only_loss=answer_only_loss,
        answer_field=answer_field,
        pieces=pieces,
    )


def parse_templates(specs: Sequence[Mapping[str, Any]], key: str = "model.task_templates") -> dict[str, TaskTemplate]:
    """Parse all templates; tasknames must be unique."""
    out: dict[str, TaskTemplate] = {}
    for i, spec in enumerate(specs):
        t = parse_template(spec, f"{key}[{i}]")
        if t.taskname in out:
            raise UserError(f"{key}: taskname '{t.taskname}' appears twice; tasknames must be unique")
        out[t.taskname] = t
    return out
