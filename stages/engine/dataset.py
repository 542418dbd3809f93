"""JSONL records -> token examples: read and check the records, keep a seeded sample (scattered records or
whole prefix groups), tokenise them with the family's builder and say why none fit when none do."""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any, Iterable

from stages.common.checks import Need
from stages.common.errors import UserError
from stages.common.io import text_lines
from stages.engine.examples import BuildStats, Example, TokenizerInfo, answer_window, build_example, prefix_fields
from stages.engine.template import TaskTemplate

log = logging.getLogger("promptlaunch.prompt_learning")


def read_jsonl(paths: Iterable[str], templates: dict[str, TaskTemplate], key: str) -> list[tuple[dict[str, Any], str]]:
    """Read and validate records (taskname known, template fields present); return (record, 'file:line')."""
    out: list[tuple[dict[str, Any], str]] = []
    if isinstance(paths, str):
        paths = [paths]
    for path in paths:
        p = Path(str(path))
        problem = Need.problem(str(p), key, "run the data_preparation stage first or fix the path")
        if problem:
            raise UserError(problem)
        n_file = 0
        for lineno, line in text_lines(p):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{where}: not valid JSON ({exc.msg}); fix or remove the line") from None
            if not isinstance(rec, dict):
                raise UserError(f"{where}: expected a JSON object per line")
            task = rec.get("taskname")
            if task not in templates:
                raise UserError(
                    f"{where}: taskname {task!r} is not one of the tasks being trained ({sorted(templates)}); "
                    "add it to model.new_tasks and model.task_templates or remove the record"
                )
            for name in templates[task].fields:
                if name not in rec or rec[name] is None:
                    raise UserError(f"{where}: record has no field '{name}' required by the template of task '{task}'; add it or fix the template")
                check_field_value(rec[name], name, templates[task], where)
            out.append((rec, where))
            n_file += 1
        if n_file == 0:
            raise UserError(f"{key}: {p} has no records; run the data_preparation stage again or fix the path")
    return out


def check_field_value(value: Any, name: str, template: TaskTemplate, where: str) -> None:
    """A template field holds text (a number is taken as text); the answer may be a list of answers, the first
    of which is trained on. Objects, booleans and empty answers are mistakes the model would silently learn."""
    is_answer = name == template.answer_field
    if isinstance(value, list) and is_answer:
        if not value or any(isinstance(v, (dict, list, bool)) or v is None for v in value):
            raise UserError(f"{where}: field '{name}' must be a non-empty list of answer strings, got {value!r:.80}; fix the record")
        value = value[0]
    if isinstance(value, (dict, list, bool)):
        raise UserError(f"{where}: field '{name}' must be text, got a {type(value).__name__} ({value!r:.60}); fix the record "
                        f"or the template of task '{template.taskname}'")
    if is_answer and not str(value).strip():
        raise UserError(f"{where}: field '{name}' (the answer) is empty, which would train the prompt to answer nothing; "
                        "give the record an answer or remove it")


def build_dataset(paths: Iterable[str], templates: dict[str, TaskTemplate], info: TokenizerInfo, *, key: str,
                  max_seq_length: int, min_seq_length: int, add_eos: bool, max_examples: int | None,
                  seed: int, records: list[tuple[dict[str, Any], str]] | None = None,
                  sample: bool = True, builder: Any = None, group_sample: bool = False,
                  keep_answer: bool = False) -> tuple[list[Example], BuildStats]:
    """Validate all records, keep ``max_examples`` of them, tokenise them.

    ``sample=True`` keeps a seeded random sample (training: varied examples); ``sample=False`` keeps the first
    ``max_examples`` records, a fixed slice, so validation never overlaps a held-out slice further down the file.
    ``group_sample=True`` samples whole groups of records with equal prefix fields (SQuAD: paragraphs, see
    ``prefix_fields``) instead of scattered records, so that shared-prefix training finds groups to share.
    ``builder``: the model family's ``build_example`` (default: this module's decoder-only one).
    ``keep_answer=True``: a too-long truncate field is cut to a window that holds the answer
    (``examples.answer_window``) instead of from its end.
    """
    if records is None:
        records = read_jsonl(paths, templates, key)
    if max_examples is not None and max_examples < len(records) and not sample:
        records = records[:max_examples]
    elif max_examples is not None and max_examples < len(records) and group_sample:
        records = [records[i] for i in sample_groups(records, templates, max_examples, seed)]
    elif max_examples is not None and max_examples < len(records):
        rng = random.Random(seed)
        idx = list(range(len(records)))
        rng.shuffle(idx)
        records = [records[i] for i in sorted(idx[:max_examples])]
    stats = BuildStats()
    examples: list[Example] = []
    for rec, where in records:
        template = templates[rec["taskname"]]
        cut = answer_window(template, rec, info) if keep_answer and template.truncate_field else None
        ex = (builder or build_example)(template, rec, info, max_seq_length=max_seq_length,
                                        add_eos=add_eos, where=where, stats=stats, cut=cut)
        if ex is None:
            continue
        if len(ex.input_ids) < min_seq_length:
            stats.dropped_too_short += 1
            continue
        examples.append(ex)
        stats.per_task[ex.task] = stats.per_task.get(ex.task, 0) + 1
    stats.kept = len(examples)
    log.info("%s: %d examples kept, %d truncated (field cut), %d dropped (too long), %d dropped (too short)",
             key, stats.kept, stats.truncated, stats.dropped_too_long, stats.dropped_too_short)
    if not examples:
        raise UserError(f"{key}: no usable examples (all {len(records)} dropped){_why_dropped(records, templates, info, max_seq_length, add_eos, builder)}")
    return examples, stats


def sample_groups(records: list[tuple[dict[str, Any], str]], templates: dict[str, TaskTemplate], n: int, seed: int) -> list[int]:
    """Indices (file order) of ``n`` records taken as whole groups (task + prefix field values), groups in a seeded
    random order; the last group taken is cut so that exactly ``n`` records are kept."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, (rec, _) in enumerate(records):
        tpl = templates[rec["taskname"]]
        fields = prefix_fields(tpl)
        key = (rec["taskname"], *(json.dumps(rec.get(f), sort_keys=True) for f in fields)) if fields else (rec["taskname"], i)
        groups.setdefault(key, []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    keep: list[int] = []
    for g in order:
        keep += g[: n - len(keep)]
        if len(keep) >= n:
            break
    return sorted(keep)


def _why_dropped(records: list[tuple[dict[str, Any], str]], templates: dict[str, TaskTemplate], info: TokenizerInfo,
                 max_seq_length: int, add_eos: bool, builder: Any) -> str:
    """``: e.g. f.jsonl:1 needs 230 tokens, 225 without its 'context' ...; raise ...`` for the first record."""
    if not records:
        return "; raise model.data.max_seq_length or set truncate_field"
    rec, where = records[0]
    template = templates[rec["taskname"]]
    build = builder or build_example
    try:
        full = build(template, rec, info, max_seq_length=1 << 30, add_eos=add_eos, where=where)
        field = template.truncate_field
        if field is None:
            return (f": e.g. {where} needs {len(full.input_ids)} tokens > model.data.max_seq_length={max_seq_length} and its "
                    f"template has no truncate_field; raise model.data.max_seq_length or set a truncate_field")
        rest = build(template, {**rec, field: "."}, info, max_seq_length=1 << 30, add_eos=add_eos, where=where)
        return (f": e.g. {where} needs {len(full.input_ids)} tokens, about {len(rest.input_ids)} of them outside its "
                f"'{field}', so model.data.max_seq_length={max_seq_length} leaves no room for any '{field}'; raise "
                f"model.data.max_seq_length or shorten the other fields")
    except Exception:   # the explanation is a courtesy; never hide the error itself
        return "; raise model.data.max_seq_length or set truncate_field"
