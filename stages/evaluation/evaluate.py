"""Evaluation stage: answer a fixed slice of the test set with the tuned prompts and score SQuAD EM/F1.

Flow: check the config -> parse the test JSONL slice -> load the prompted model (the engine's
``PromptedModel``; family-agnostic) -> check every record against its task template -> greedy batched
generation (tuned prompt, and the same template without virtual tokens when ``compare_baseline``) ->
per-example and aggregate scores -> ``predictions.jsonl``, ``predictions_baseline.jsonl``,
``metrics.json`` and ``summary.md`` in ``run.results_dir``, all written atomically.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig

from stages.common import precision
from stages.common.errors import UserError
from stages.common.io import remove_stale_tmp, write_json, write_jsonl, write_text
from stages.engine.host_memory import reuse_host_memory

from .data import Example, TestSlice, check_examples, read_slice
from .metrics import Score, aggregate, bootstrap_ci, score
from .config import PREFIX, Settings

log = logging.getLogger("promptlaunch.evaluation")

PREDICTIONS = "predictions.jsonl"
PREDICTIONS_BASELINE = "predictions_baseline.jsonl"
METRICS = "metrics.json"
SUMMARY = "summary.md"


@dataclass
class Run:
    """One pass over the slice: ``tuned`` (virtual prompt on) or ``baseline`` (same template, no virtual tokens)."""

    kind: str
    predictions: list[str]
    scores: list[Score]
    seconds: float
    decoding: dict[str, int] | None = None   # forward passes, drafted / accepted tokens (decoder-only models)

    def metrics(self, examples: Sequence[Example]) -> dict[str, Any]:
        out: dict[str, Any] = _rounded(aggregate(self.scores))
        tasks = sorted({e.taskname for e in examples})
        if len(tasks) > 1:
            out["per_task"] = {
                t: _rounded(aggregate(s for s, e in zip(self.scores, examples) if e.taskname == t)) for t in tasks
            }
        out["seconds"] = round(self.seconds, 3)
        out["seconds_per_example"] = round(self.seconds / max(1, len(examples)), 4)
        if self.decoding:
            out["decoding"] = dict(self.decoding)
        return out


def load_prompted_model(s: Settings, precision: str = "32") -> Any:
    """The engine's PromptedModel: tuned (from the artifact) or the untuned baseline (templates from config)."""
    from stages.engine.prompted_model import PromptedModel

    try:
        if s.baseline_only:
            return PromptedModel.load(None, s.language_model_path, task_templates=s.task_templates, device=s.device,
                                      precision=precision)
        return PromptedModel.load(str(s.artifact_path), s.language_model_path, device=s.device, precision=precision)
    except UserError as exc:  # the engine names its own arguments; name the config keys instead
        msg = str(exc)
        if msg.startswith(("artifact_path", "language_model_path", "task_templates")):
            raise UserError(f"{PREFIX}.model.{msg}") from None
        raise


def evaluate(cfg: DictConfig) -> None:
    """Stage entry (called by ``run_stage``)."""
    s = Settings.from_cfg(cfg)
    reuse_host_memory(s.reuse_host_memory, f"{PREFIX}.trainer.reuse_host_memory")
    _ensure_writable(s.results_dir)
    data = read_slice(s.test_ds, s.offset, s.max_examples)  # cheap checks before the slow model load
    log.info("test set: %s (%d of %d records)", data.label, len(data.lines), data.records_in_file)
    given = s.trainer.precision if s.trainer else "32"
    accel = s.trainer.accelerator if s.trainer else "cpu"
    chosen = precision.resolve(given, accel, f"{PREFIX}.trainer.precision")
    log.info("%s", precision.explain(given, chosen, accel))
    t0 = time.monotonic()
    model = load_prompted_model(s, chosen)
    log.info("model loaded in %.1fs: %s", time.monotonic() - t0, model.describe())
    source = f"{PREFIX}.model.task_templates" if s.baseline_only else f"the prompt artifact {s.artifact_path}"
    examples = check_examples(data, model.templates, source)

    runs: dict[str, Run] = {}
    with _autocast(chosen, s.device):
        if not s.baseline_only:
            runs["tuned"] = _run(model, examples, s, "tuned")
        if s.baseline_only or s.compare_baseline:
            runs["baseline"] = _run(model, examples, s, "baseline")
    metrics = write_outputs(s, data, examples, runs, model)
    for line in summary_lines(data, metrics):
        log.info("%s", line)
    log.info("wrote %s", ", ".join(str(s.results_dir / f) for f in metrics["files"].values()))
    if s.trackers:
        from .trackers import log_evaluation

        log_evaluation(s.trackers, s.results_dir, s.run_name, metrics, [e.inputs.get("context") for e in examples])


def _autocast(chosen: str, device: str) -> Any:
    """``bf16-mixed``: generation under autocast (bf16 products, fp32 weights); otherwise nothing."""
    import contextlib

    if chosen != "bf16-mixed":
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device_type="cuda" if str(device).startswith("cuda") else "cpu", dtype=torch.bfloat16)


def _ensure_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{PREFIX}.run.results_dir: cannot create '{folder}' ({exc.strerror or exc}); choose a folder you can write to") from None


def _run(model: Any, examples: list[Example], s: Settings, kind: str) -> Run:
    log.info("generating %s answers for %d questions (batch %d, up to %d tokens)", kind, len(examples), s.batch_size, s.tokens_to_generate)
    t0 = time.monotonic()
    decoding: dict[str, int] = {}
    preds = model.generate(
        [e.inputs for e in examples],
        tokens_to_generate=s.tokens_to_generate,
        batch_size=s.batch_size,
        use_virtual_prompt=(kind == "tuned"),
        stop_strings=s.stop_strings,
        progress=s.progress,
        **({"share_prefix": True} if s.share_prefix else {}),   # only when asked: older generate() contracts stay valid
        **({"prompt_lookup_num_tokens": s.prompt_lookup_num_tokens, "prompt_lookup_pass_budget": s.prompt_lookup_pass_budget,
            "stats": decoding} if s.prompt_lookup_num_tokens else {}),
    )
    seconds = time.monotonic() - t0
    if len(preds) != len(examples):
        raise RuntimeError(f"PromptedModel.generate returned {len(preds)} answers for {len(examples)} records")
    preds = [str(p).strip() for p in preds]
    if decoding.get("drafted"):
        log.info("%s: %d decoding passes, %d of %d drafted tokens accepted (prompt lookup)", kind,
                 decoding["forward_passes"], decoding["accepted"], decoding["drafted"])
    return Run(kind, preds, [score(p, e.golds) for p, e in zip(preds, examples)], seconds, decoding or None)


def _rounded(m: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}


def prediction_records(examples: Sequence[Example], run: Run) -> list[dict[str, Any]]:
    """One line per question: where it came from, the answer, the gold answers and its EM/F1 in [0, 1]."""
    return [
        {
            "index": e.index,
            "id": e.id,
            "taskname": e.taskname,
            "question": e.inputs.get("question"),
            "prediction": p,
            "answers": list(e.golds),
            "em": sc.em,
            "f1": round(sc.f1, 4),
        }
        for e, p, sc in zip(examples, run.predictions, run.scores)
    ]


def write_outputs(s: Settings, data: TestSlice, examples: list[Example], runs: dict[str, Run], model: Any) -> dict[str, Any]:
    """predictions(_baseline).jsonl, metrics.json and summary.md; returns the metrics dict."""
    files = {}
    main_kind = "baseline" if s.baseline_only else "tuned"
    # metrics.json is written last and marks a complete set: drop the old one first, so a kill between the
    # files below never leaves new predictions next to metrics of an earlier run
    (s.results_dir / METRICS).unlink(missing_ok=True)
    remove_stale_tmp(s.results_dir, [PREDICTIONS, PREDICTIONS_BASELINE, METRICS, SUMMARY])
    for kind, run in runs.items():
        name = PREDICTIONS if kind == "tuned" else PREDICTIONS_BASELINE
        write_jsonl(s.results_dir / name, prediction_records(examples, run))
        files[kind] = name
    for stale in {PREDICTIONS, PREDICTIONS_BASELINE} - set(files.values()):
        (s.results_dir / stale).unlink(missing_ok=True)  # an earlier run's file would no longer match metrics.json

    main = runs[main_kind]
    metrics: dict[str, Any] = {"evaluated": main_kind, **main.metrics(examples)}
    described = _jsonable(model.describe())
    metrics.update(
        model=described,
        language_model_path=described.get("language_model_path", s.language_model_path),  # effective base model
        artifact=None if s.baseline_only else str(s.artifact_path),
        virtual_tokens={} if s.baseline_only else {t: model.templates[t].total_virtual_tokens for t in sorted({e.taskname for e in examples})},
        tokens_to_generate=s.tokens_to_generate,
        batch_size=s.batch_size,
        stop_strings=list(s.stop_strings),
        data={
            "test_ds": str(s.test_ds),
            "offset": s.offset,
            "max_examples": s.max_examples,
            "slice": [data.start, data.end],
            "records_in_file": data.records_in_file,
            "tasks": {t: sum(e.taskname == t for e in examples) for t in sorted({e.taskname for e in examples})},
        },
        files={"predictions": files[main_kind], "metrics": METRICS, "summary": SUMMARY},
    )
    if "baseline" in runs and main_kind == "tuned":
        base = runs["baseline"].metrics(examples)
        base["delta"] = {k: round(metrics[k] - base[k], 4) for k in ("exact_match", "f1")}
        tuned_f1, base_f1 = [sc.f1 for sc in main.scores], [sc.f1 for sc in runs["baseline"].scores]
        base["delta"]["f1_ci95"] = bootstrap_ci(tuned_f1, paired=base_f1)   # paired: the same questions resampled
        base["predictions"] = PREDICTIONS_BASELINE
        metrics["baseline"] = base
        metrics["files"]["predictions_baseline"] = PREDICTIONS_BASELINE
    write_text(s.results_dir / SUMMARY, summary_markdown(data, metrics))
    write_json(s.results_dir / METRICS, metrics)   # last: its presence means the set is complete
    return metrics


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def _em_f1(m: dict[str, Any]) -> str:
    return f"EM {m['exact_match']:.1f} F1 {m['f1']:.1f}{_ci(m.get('f1_ci95'))}"


def _ci(ci: list[float] | None) -> str:
    return f" (95% CI {ci[0]:.1f}-{ci[1]:.1f})" if ci else ""


def summary_lines(data: TestSlice, metrics: dict[str, Any]) -> list[str]:
    """``squad squad_test_ground_truth.jsonl[5000:5200] n=200  tuned EM 41.0 F1 55.3 | baseline EM 12.0 F1 30.1 | +25.2 F1``."""
    tasks = "+".join(metrics["data"]["tasks"])
    head = f"{tasks} {data.label} n={metrics['total']}  {metrics['evaluated']} {_em_f1(metrics)}"
    base = metrics.get("baseline")
    if base:
        head += f" | baseline {_em_f1(base)} | {base['delta']['f1']:+.1f} F1{_ci(base['delta'].get('f1_ci95'))}"
    lines = [head]
    for task, m in metrics.get("per_task", {}).items():
        line = f"  {task}: n={m['total']}  {metrics['evaluated']} {_em_f1(m)}"
        if base:
            line += f" | baseline {_em_f1(base['per_task'][task])}"
        lines.append(line)
    lines.append(
        f"  {metrics['seconds_per_example']:.3f} s/example ({metrics['evaluated']})"
        + (f", {base['seconds_per_example']:.3f} s/example (baseline)" if base else "")
    )
    return lines


def _ci_cell(ci: list[float] | None, signed: bool = False) -> str:
    if not ci:
        return ""
    return f"{ci[0]:+.1f} to {ci[1]:+.1f}" if signed else f"{ci[0]:.1f}-{ci[1]:.1f}"


def summary_markdown(data: TestSlice, metrics: dict[str, Any]) -> str:
    """A small table for humans; metrics.json holds the same numbers."""
    base = metrics.get("baseline")
    rows = [("all" if "per_task" in metrics else "+".join(metrics["data"]["tasks"]), metrics, base)]
    rows += [(t, m, base["per_task"][t] if base else None) for t, m in metrics.get("per_task", {}).items()]
    out = [
        f"# Evaluation: {data.label}",
        "",
        f"- base model: {metrics['language_model_path']}",
        f"- prompt artifact: {metrics['artifact'] or 'none (untuned baseline only)'}",
        f"- virtual tokens: {metrics['virtual_tokens'] or 0}",
        f"- test set: {metrics['data']['test_ds']} records [{data.start}:{data.end}] of {data.records_in_file}",
        f"- greedy, tokens_to_generate: {metrics['tokens_to_generate']}, batch_size: {metrics['batch_size']}, "
        f"stop_strings: {metrics['stop_strings']}",
        "",
        "| task | n | prompt | EM | F1 | F1 95% CI | s/example |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for task, m, b in rows:
        out.append(f"| {task} | {m['total']} | {metrics['evaluated']} | {m['exact_match']:.2f} | {m['f1']:.2f} | "
                   f"{_ci_cell(m.get('f1_ci95'))} | {metrics['seconds_per_example']:.3f} |")
        if b:
            out.append(f"| {task} | {b['total']} | baseline | {b['exact_match']:.2f} | {b['f1']:.2f} | "
                       f"{_ci_cell(b.get('f1_ci95'))} | {base['seconds_per_example']:.3f} |")
            delta_ci = base["delta"].get("f1_ci95") if task == rows[0][0] else None   # paired CI: all questions
            out.append(f"| {task} | | delta | {m['exact_match'] - b['exact_match']:+.2f} | {m['f1'] - b['f1']:+.2f} | "
                       f"{_ci_cell(delta_ci, signed=True)} | |")
    return "\n".join(out) + "\n"
