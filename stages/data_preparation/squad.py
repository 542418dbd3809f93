"""SQuAD v1.1 -> the JSONL files prompt learning and evaluation read.

One record per question, keys in this order: taskname, id, context, question, answer.
``squad_train``/``squad_val`` carry the first gold answer, ``squad_test_ground_truth`` the list of
all gold answers (duplicates kept, as the official evaluation expects), ``squad_test`` none.
A ``_SUCCESS.json`` marker, written last, makes a rerun with the same inputs a no-op.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import DictConfig

from stages.common.errors import UserError
from stages.common.io import remove_stale_tmp, write_json, write_jsonl

from .fetch import fetch_raw
from .config import GROUND_TRUTH, OUTPUTS, PREFIX, SPLITS, TEST, TRAIN, VAL, Settings

log = logging.getLogger("promptlaunch.data_preparation")

MARKER = "_SUCCESS.json"
SUMMARY = "data_preparation_summary.json"


class Question(NamedTuple):
    id: str
    context: str
    question: str
    answers: list[str]


def prepare(cfg: DictConfig) -> None:
    """Stage entry: fetch, verify, convert, mark done, summarise; skip when already done."""
    start = time.monotonic()
    settings = Settings.from_cfg(cfg)
    for key, folder in (
        ("output_dir", settings.output_dir),
        ("raw_dir", settings.raw_dir),
        ("run.results_dir", settings.results_dir),
    ):
        ensure_writable(folder, key)
    marker = None if settings.force else already_prepared(settings)
    skipped = marker is not None
    if marker is None:
        marker = _build(settings)
    else:
        log.info("%s already prepared, skipping (set %s.force=true to redo)", settings.output_dir, PREFIX)
    _report(settings, marker, skipped=skipped, seconds=time.monotonic() - start)


def ensure_writable(folder: Path, key: str) -> None:
    """Fail before any download if a folder cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UserError(
            f"{PREFIX}.{key}={folder} is not a writable folder ({exc.strerror or exc}); "
            f"set {PREFIX}.{key} to a folder you can write to"
        ) from None


def already_prepared(settings: Settings) -> dict[str, Any] | None:
    """The marker, if it matches this config (taskname, checksums, counts) and the outputs are intact."""
    path = settings.output_dir / MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
        matches = (
            marker["taskname"] == settings.taskname
            and marker["version"] == settings.version
            and all(settings.sha256[s] in (None, marker["inputs"][s]["sha256"]) for s in SPLITS)
            and all(settings.expected_counts[s] in (None, marker["counts"][s]) for s in SPLITS)
            and sorted(marker["outputs"]) == sorted(OUTPUTS)
            and all(_size(settings.output_dir / name) == info["bytes"] for name, info in marker["outputs"].items())
        )
    except (OSError, ValueError, KeyError, TypeError):
        matches = False
    if not matches:
        log.info("%s does not match this config or the outputs changed: preparing again", path)
        return None
    return marker


class Origin(NamedTuple):
    """The file to name in a data error (the user's own one for source=local) and how to fix it."""

    file: Path
    fix: str

    def error(self, detail: str) -> UserError:
        return UserError(f"{self.file}: {detail}; the file is not in SQuAD v1.1 format: {self.fix}")


def origin(settings: Settings, split: str) -> Origin:
    if settings.source == "local" and settings.local_dir is not None:
        local = settings.local_dir / settings.raw_path(split).name
        return Origin(local, f"fix it or point {PREFIX}.local_dir at the official files")
    return Origin(settings.raw_path(split), "delete it and rerun to fetch the official one")


def load_squad(path: Path, src: Origin) -> Any:
    """Parse one SQuAD file; bad JSON becomes an error naming the file, line and column."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise src.error(f"malformed JSON at line {exc.lineno}, column {exc.colno} ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise src.error(f"not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def questions(doc: Any, src: Origin) -> list[Question]:
    """Every question of a parsed SQuAD file, in file order; a structural problem names its JSON path."""
    found: list[Question] = []
    for i, article in enumerate(_field(doc, "data", list, "", src)):
        for j, paragraph in enumerate(_field(article, "paragraphs", list, f"data[{i}]", src)):
            where = f"data[{i}].paragraphs[{j}]"
            context = _field(paragraph, "context", str, where, src)
            for k, qa in enumerate(_field(paragraph, "qas", list, where, src)):
                found.append(_question(qa, context, f"{where}.qas[{k}]", src))
    return found


def _question(qa: Any, context: str, where: str, src: Origin) -> Question:
    answers = [
        _field(a, "text", str, f"{where}.answers[{m}]", src)
        for m, a in enumerate(_field(qa, "answers", list, where, src))
    ]
    if not answers:
        raise src.error(f"{where}.answers is empty, every question needs a gold answer")
    return Question(_field(qa, "id", str, where, src), context, _field(qa, "question", str, where, src), answers)


def _field(obj: Any, key: str, kind: type, where: str, src: Origin) -> Any:
    """``obj[key]`` checked to be of ``kind``; ``where`` is the JSON path of ``obj`` for the message."""
    full = f"{where}.{key}" if where else key
    if not isinstance(obj, dict):
        raise src.error(f"{where or 'the top level'} is {_kind(obj)}, expected an object with {key!r}")
    if key not in obj:
        raise src.error(f"{full} is missing")
    if not isinstance(obj[key], kind):
        raise src.error(f"{full} is {_kind(obj[key])}, expected {_kind(kind())}")
    return obj[key]


_KINDS = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}


def _kind(value: Any) -> str:
    """JSON name of a parsed value's type, for messages."""
    return _KINDS.get(type(value), "a number")


def records(
    taskname: str, qs: Iterable[Question], answer: Callable[[Question], Any] | None
) -> Iterator[dict[str, Any]]:
    """Output records in the fixed key order; ``answer`` picks the answer field (None: no answer key)."""
    for q in qs:
        record: dict[str, Any] = {"taskname": taskname, "id": q.id, "context": q.context, "question": q.question}
        if answer is not None:
            record["answer"] = answer(q)
        yield record


def _build(settings: Settings) -> dict[str, Any]:
    """Do the work; nothing is written to output_dir until both inputs parsed and counted correctly."""
    (settings.output_dir / MARKER).unlink(missing_ok=True)  # the outputs are about to change
    remove_stale_tmp(settings.output_dir, [*OUTPUTS, MARKER])  # leftovers of a killed earlier run (one writer)
    digests = fetch_raw(settings)
    parsed: dict[str, list[Question]] = {}
    for split in SPLITS:
        src = origin(settings, split)
        parsed[split] = questions(load_squad(settings.raw_path(split), src), src)
    counts = {split: len(qs) for split, qs in parsed.items()}
    _check_counts(settings, counts)
    first, every = (lambda q: q.answers[0]), (lambda q: list(q.answers))
    plan = {
        TRAIN: records(settings.taskname, parsed["train"], first),
        VAL: records(settings.taskname, parsed["dev"], first),
        GROUND_TRUTH: records(settings.taskname, parsed["dev"], every),
        TEST: records(settings.taskname, parsed["dev"], None),
    }
    outputs = {}
    for name, recs in plan.items():
        n = write_jsonl(settings.output_dir / name, recs)
        outputs[name] = {"records": n, "bytes": _size(settings.output_dir / name)}
    marker = {
        "taskname": settings.taskname,
        "version": settings.version,
        "inputs": {s: {"file": settings.raw_path(s).name, "sha256": digests[s]} for s in SPLITS},
        "counts": {**counts, "dev_answers": sum(len(q.answers) for q in parsed["dev"])},
        "outputs": outputs,
    }
    write_json(settings.output_dir / MARKER, marker)
    return marker


def _check_counts(settings: Settings, counts: dict[str, int]) -> None:
    for split, n in counts.items():
        expected = settings.expected_counts[split]
        if expected is not None and n != expected:
            src = origin(settings, split)
            raise UserError(
                f"{src.file} has {n} questions but {PREFIX}.expected_counts.{split}={expected}; "
                f"{src.fix}, or set {PREFIX}.expected_counts.{split}=null"
            )


def _report(settings: Settings, marker: dict[str, Any], skipped: bool, seconds: float) -> None:
    """Log the counts and paths and leave the same facts as JSON in the run's results_dir."""
    files = {name: str(settings.output_dir / name) for name in OUTPUTS}
    counts = marker["counts"]
    log.info(
        "train: %d questions, dev: %d questions (%d gold answers)",
        counts["train"],
        counts["dev"],
        counts["dev_answers"],
    )
    for path in files.values():
        log.info("  %s", path)
    summary = {
        **marker,
        "skipped": skipped,
        "seconds": round(seconds, 3),
        "raw_dir": str(settings.raw_dir),
        "files": files,
    }
    write_json(settings.results_dir / SUMMARY, summary)
    log.info("summary: %s", settings.results_dir / SUMMARY)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None
