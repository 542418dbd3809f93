"""Evaluation stage with a fake PromptedModel: outputs, per-task metrics, baseline, and every user error."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from stages.common.errors import UserError  # noqa: E402
from stages.evaluation import evaluate as ev  # noqa: E402
from stages.evaluation.metrics import bootstrap_ci  # noqa: E402
from tests.support.evaluation import SQUAD_RECORDS, FakeModel, make_artifact, make_cfg, write_jsonl  # noqa: E402
from tests.support.paths import ROOT  # noqa: E402
from tests.support.templates import SQUAD_T  # noqa: E402

RUN = ROOT / "stages" / "evaluation" / "run.py"
TRIVIA_T = {
    "taskname": "trivia",
    "prompt_template": "<|VIRTUAL_PROMPT_0|>Q: {question} A: {label}",
    "total_virtual_tokens": 2,
    "virtual_token_splits": [2],
    "truncate_field": None,
    "answer_only_loss": True,
    "answer_field": "label",
}
@pytest.fixture
def fake(monkeypatch):
    holder: dict[str, Any] = {}

    def load(s, precision="32"):
        specs = s.task_templates if s.baseline_only else [SQUAD_T, TRIVIA_T]
        holder["settings"] = s
        holder["model"] = FakeModel(specs, None if s.baseline_only else str(s.artifact_path))
        return holder["model"]

    monkeypatch.setattr(ev, "load_prompted_model", load)
    return holder


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_tuned_and_baseline_outputs(tmp_path, fake, caplog):
    test_ds = write_jsonl(tmp_path / "test.jsonl", SQUAD_RECORDS)
    cfg = make_cfg(tmp_path, test_ds, make_artifact(tmp_path))
    with caplog.at_level(logging.INFO, logger="promptlaunch.evaluation"):
        ev.evaluate(cfg)
    out = tmp_path / "results"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "predictions.jsonl", "predictions_baseline.jsonl", "summary.md"]

    preds = read_jsonl(out / "predictions.jsonl")
    assert [set(p) for p in preds] == [{"index", "id", "taskname", "question", "prediction", "answers", "em", "f1"}] * 4
    assert [(p["index"], p["id"], p["prediction"], p["em"]) for p in preds] == [
        (0, "q0", "the Paris", 1.0), (1, "q1", "1889", 1.0), (2, "q2", "Gustave Eiffel", 0.0), (3, "q3", "330 metres", 0.0)]
    assert preds[0]["answers"] == ["Paris", "in Paris"] and preds[3]["answers"] == ["330 m"]
    assert preds[2]["f1"] == pytest.approx(0.4)  # "eiffels" != "eiffel": P 1/2, R 1/3
    assert preds[3]["f1"] == pytest.approx(0.5)

    m = json.loads((out / "metrics.json").read_text())
    assert m["evaluated"] == "tuned"
    assert (m["exact_match"], m["f1"], m["total"]) == (50.0, pytest.approx(72.5), 4)
    assert "per_task" not in m  # one task only
    assert m["artifact"] == str(tmp_path / "prompt_artifact") and m["virtual_tokens"] == {"squad": 4}
    assert m["model"]["model"] == "fake-llm" and m["tokens_to_generate"] == 7 and m["batch_size"] == 3
    assert m["data"] == {"test_ds": str(test_ds), "offset": 0, "max_examples": None, "slice": [0, 4], "records_in_file": 4, "tasks": {"squad": 4}}
    assert m["seconds_per_example"] >= 0
    b = m["baseline"]
    assert (b["exact_match"], b["f1"], b["total"]) == (0.0, 0.0, 4)  # first word of the question
    assert b["delta"] == {"exact_match": 50.0, "f1": round(m["f1"], 4), "f1_ci95": bootstrap_ci([1.0, 1.0, 0.4, 0.5], paired=[0.0] * 4)}
    assert m["f1_ci95"] == bootstrap_ci([1.0, 1.0, 0.4, 0.5]) and m["f1_ci95"][0] <= m["f1"] <= m["f1_ci95"][1]
    assert b["predictions"] == "predictions_baseline.jsonl"
    assert [p["prediction"] for p in read_jsonl(out / "predictions_baseline.jsonl")] == ["Where", "When", "Who", "How"]

    calls = fake["model"].calls
    assert [c["use_virtual_prompt"] for c in calls] == [True, False]
    for c in calls:  # config reaches the engine; gold answers never do
        assert (c["tokens_to_generate"], c["batch_size"], c["stop_strings"]) == (7, 3, ("\n", "Question:"))
        assert all("answer" not in r and r["taskname"] == "squad" and "context" in r for r in c["records"])
    summary = [r.getMessage() for r in caplog.records if "n=4" in r.getMessage()]
    assert summary == [f"squad test.jsonl[0:4] n=4  tuned EM 50.0 F1 {m['f1']:.1f} (95% CI 45.0-100.0) | baseline EM 0.0 "
                       f"F1 0.0 (95% CI 0.0-0.0) | +{m['f1']:.1f} F1 (95% CI 45.0-100.0)"]
    assert "| squad | 4 | tuned | 50.00 |" in (out / "summary.md").read_text()


def test_slice_and_mixed_tasks_give_per_task_metrics(tmp_path, fake):
    trivia = [{"taskname": "trivia", "id": "t0", "question": "Capital of Japan?", "label": ["Tokyo", "東京"]},
              {"taskname": "trivia", "id": "t1", "question": "Largest planet?", "label": "Jupiter"}]
    recs = [SQUAD_RECORDS[0], trivia[0], SQUAD_RECORDS[1], "", trivia[1], SQUAD_RECORDS[2], SQUAD_RECORDS[3]]
    test_ds = write_jsonl(tmp_path / "mixed.jsonl", recs)  # line 4 is blank: not a record
    cfg = make_cfg(tmp_path, test_ds, make_artifact(tmp_path), **{"data.offset": 1, "data.max_examples": 4})
    ev.evaluate(cfg)
    preds = read_jsonl(tmp_path / "results" / "predictions.jsonl")
    assert [(p["index"], p["id"], p["taskname"]) for p in preds] == [(1, "t0", "trivia"), (2, "q1", "squad"), (3, "t1", "trivia"), (4, "q2", "squad")]
    assert len(fake["model"].calls[0]["records"]) == 4  # one mixed batch stream, in file order
    assert all("label" not in r for r in fake["model"].calls[0]["records"])
    m = json.loads((tmp_path / "results" / "metrics.json").read_text())
    assert m["data"]["slice"] == [1, 5] and m["data"]["records_in_file"] == 6 and m["data"]["tasks"] == {"squad": 2, "trivia": 2}
    assert m["virtual_tokens"] == {"squad": 4, "trivia": 2}
    assert m["per_task"]["trivia"]["exact_match"] == 50.0 and m["per_task"]["trivia"]["total"] == 2
    assert m["per_task"]["squad"]["exact_match"] == 50.0 and m["per_task"]["squad"]["f1"] == pytest.approx(70.0)
    assert m["exact_match"] == 50.0 and m["total"] == 4
    assert set(m["baseline"]["per_task"]) == {"squad", "trivia"}


def test_baseline_only_needs_no_artifact(tmp_path, fake):
    test_ds = write_jsonl(tmp_path / "test.jsonl", SQUAD_RECORDS)
    out = tmp_path / "results"
    out.mkdir()
    (out / "predictions.jsonl").write_text("stale\n")  # from an earlier tuned run: would contradict metrics.json
    cfg = make_cfg(tmp_path, test_ds, None, **{"inference.baseline_only": True, "model.language_model_path": "embedded:smollm2-135m-instruct"})
    ev.evaluate(cfg)
    s = fake["settings"]
    assert s.baseline_only and s.artifact_path is None and s.task_templates[0]["taskname"] == "squad"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "predictions_baseline.jsonl", "summary.md"]
    m = json.loads((out / "metrics.json").read_text())
    assert m["evaluated"] == "baseline" and m["artifact"] is None and m["virtual_tokens"] == {} and "baseline" not in m
    assert m["files"]["predictions"] == "predictions_baseline.jsonl"
    assert [c["use_virtual_prompt"] for c in fake["model"].calls] == [False]


def test_compare_baseline_off_writes_tuned_only(tmp_path, fake):
    test_ds = write_jsonl(tmp_path / "test.jsonl", SQUAD_RECORDS)
    ev.evaluate(make_cfg(tmp_path, test_ds, make_artifact(tmp_path), **{"inference.compare_baseline": False}))
    assert not (tmp_path / "results" / "predictions_baseline.jsonl").exists()
    assert "baseline" not in json.loads((tmp_path / "results" / "metrics.json").read_text())


def test_reuse_host_memory_is_applied_first(tmp_path, fake, monkeypatch):
    calls = []
    monkeypatch.setattr(ev, "reuse_host_memory", lambda *a: calls.append(a))
    test_ds = write_jsonl(tmp_path / "test.jsonl", SQUAD_RECORDS)
    ev.evaluate(make_cfg(tmp_path, test_ds, make_artifact(tmp_path)))
    ev.evaluate(make_cfg(tmp_path, test_ds, make_artifact(tmp_path), **{"trainer.reuse_host_memory": False}))
    assert calls == [(True, "evaluation.trainer.reuse_host_memory"), (False, "evaluation.trainer.reuse_host_memory")]


def test_share_prefix_reaches_generate(tmp_path, fake):
    test_ds = write_jsonl(tmp_path / "test.jsonl", SQUAD_RECORDS)
    ev.evaluate(make_cfg(tmp_path, test_ds, make_artifact(tmp_path), **{"inference.share_prefix": True}))
    assert [c.get("share_prefix") for c in fake["model"].calls] == [True, True]      # tuned and baseline
    ev.evaluate(make_cfg(tmp_path, test_ds, make_artifact(tmp_path)))
    assert "share_prefix" not in fake["model"].calls[0]                              # off: the old call, unchanged


def test_prompt_lookup_reaches_generate_and_its_counts_reach_metrics(tmp_path, fake, monkeypatch):
    test_ds = write_jsonl(tmp_path / "test.jsonl", SQUAD_RECORDS)
    real = FakeModel.generate

    def counting(self, records, **kw):
        kw["stats"].update(forward_passes=3, drafted=8, accepted=5, row_tokens=20)   # as the engine would count
        return real(self, records, **kw)

    monkeypatch.setattr(FakeModel, "generate", counting)
    ev.evaluate(make_cfg(tmp_path, test_ds, make_artifact(tmp_path), **{"inference.prompt_lookup_num_tokens": 4,
                                                                         "inference.prompt_lookup_pass_budget": 24}))
    assert [c.get("prompt_lookup_num_tokens") for c in fake["model"].calls] == [4, 4]   # tuned and baseline
    assert [c.get("prompt_lookup_pass_budget") for c in fake["model"].calls] == [24, 24]
    m = json.loads((tmp_path / "results" / "metrics.json").read_text())
    assert m["decoding"] == m["baseline"]["decoding"] == {"forward_passes": 3, "drafted": 8, "accepted": 5, "row_tokens": 20}
    monkeypatch.setattr(FakeModel, "generate", real)
    ev.evaluate(make_cfg(tmp_path, test_ds, make_artifact(tmp_path)))
    assert "prompt_lookup_num_tokens" not in fake["model"].calls[0] and "stats" not in fake["model"].calls[0]


# ---- user errors: one line naming the key or file:line and the fix ----
def _err(tmp_path, records, match, artifact=True, **over):
    test_ds = write_jsonl(tmp_path / "test.jsonl", records)
    cfg = make_cfg(tmp_path, test_ds, make_artifact(tmp_path) if artifact else None, **over)
    with pytest.raises(UserError, match=match) as info:
        ev.evaluate(cfg)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_artifact(tmp_path, fake):
    test_ds = write_jsonl(tmp_path / "test.jsonl", SQUAD_RECORDS)
    cfg = make_cfg(tmp_path, test_ds, tmp_path / "nowhere")
    with pytest.raises(UserError, match=r"evaluation\.model\.artifact_path: '.*nowhere' does not exist; run the prompt_learning stage first"):
        ev.evaluate(cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"evaluation\.model\.artifact_path: .*\(no artifact\.json\) nor a NeMo prompt-learning \.nemo; run the prompt_learning stage first"):
        ev.evaluate(make_cfg(tmp_path, test_ds, tmp_path / "empty"))
    assert "model" not in fake  # nothing loaded


def test_record_lacking_template_field(tmp_path, fake):
    bad = dict(SQUAD_RECORDS[1])
    del bad["context"]
    msg = _err(tmp_path, [SQUAD_RECORDS[0], bad], r"test\.jsonl:2: record lacks field 'context' that the template of task 'squad' needs")
    assert "Context: {context} Question: {question}" in msg


def test_malformed_line_number(tmp_path, fake):
    _err(tmp_path, [SQUAD_RECORDS[0], "", '{"taskname": "squad", "id": ', SQUAD_RECORDS[1]], r"test\.jsonl:3: malformed JSON")
    assert "model" not in fake  # reported before the (slow) model load
    _err(tmp_path, [SQUAD_RECORDS[0], "[1, 2]"], r"test\.jsonl:2: expected a JSON object")


def test_unknown_taskname_and_missing_gold(tmp_path, fake):
    _err(tmp_path, [dict(SQUAD_RECORDS[0], taskname="boolq")], r"test\.jsonl:1: taskname 'boolq' has no template in the prompt artifact .* \(have: \['squad', 'trivia'\]\)")
    no_gold = {k: v for k, v in SQUAD_RECORDS[0].items() if k != "answer"}
    _err(tmp_path, [no_gold], r"test\.jsonl:1: record has no gold answer 'answer'; .*squad_test_ground_truth\.jsonl")
    _err(tmp_path, [dict(SQUAD_RECORDS[0], answer=[])], r"test\.jsonl:1: 'answer' must be a non-empty list")


@pytest.mark.parametrize(
    "over,match",
    [
        ({"data.offset": 9}, r"evaluation\.data\.offset: 9 skips all 4 records"),
        ({"data.max_examples": 0}, r"evaluation\.data\.max_examples: must be an integer >= 1"),
        ({"data.batch_size": -1}, r"evaluation\.data\.batch_size"),
        ({"trainer.devices": 2}, r"evaluation\.trainer: devices x num_nodes = 2.*devices=1"),
        ({"inference.greedy": False}, r"evaluation\.inference\.greedy: only greedy"),
        ({"inference.tokens_to_generate": 0}, r"evaluation\.inference\.tokens_to_generate"),
        ({"inference.stop_strings": "[1]"}, r"evaluation\.inference\.stop_strings"),
        ({"inference.share_prefix": "maybe"}, r"^evaluation\.inference\.share_prefix: must be true or false, got 'maybe'$"),
        ({"trainer.reuse_host_memory": "maybe"}, r"^evaluation\.trainer\.reuse_host_memory: must be true or false, got 'maybe'$"),
        ({"inference.prompt_lookup_num_tokens": -1}, r"^evaluation\.inference\.prompt_lookup_num_tokens: must be an integer >= 0 \(0 = off\), got -1$"),
        ({"inference.prompt_lookup_pass_budget": 0}, r"^evaluation\.inference\.prompt_lookup_pass_budget: must be an integer >= 1 or null \(no limit\), got 0$"),
        ({"inference.baseline_only": True}, r"evaluation\.model\.language_model_path: required with evaluation\.inference\.baseline_only"),
        ({"inference.baseline_only": True, "model.language_model_path": "x/y", "model.task_templates": "null"},
         r"evaluation\.model\.task_templates: required"),
        ({"data.test_ds": "/nonexistent/squad_test_ground_truth.jsonl"}, r"evaluation\.data\.test_ds: .* does not exist; run the data_preparation"),
    ],
)
def test_config_errors(tmp_path, fake, over, match):
    _err(tmp_path, SQUAD_RECORDS, match, **over)


def test_entry_file_reports_one_error_line(tmp_path):
    test_ds = write_jsonl(tmp_path / "test.jsonl", SQUAD_RECORDS)
    cfg_path = tmp_path / "eval_hydra.yaml"
    cfg_path.write_text(OmegaConf.to_yaml(make_cfg(tmp_path, test_ds, tmp_path / "missing_artifact")))
    proc = subprocess.run([sys.executable, str(RUN), "--config", str(cfg_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: evaluation.model.artifact_path:") and "prompt_learning" in proc.stderr


# ---- conf/evaluation: three families, same keys, launcher accepts them ----
def _keys(node: Any, prefix: str = "") -> set[str]:
    if not isinstance(node, dict):
        return {prefix}
    out: set[str] = set()
    for k, v in node.items():
        out |= _keys(v, f"{prefix}.{k}" if prefix else k) if k != "task_templates" else {f"{prefix}.{k}"}
    return out


@pytest.mark.parametrize("option,train_name", [("gpt/squad", "smollm2_135m"), ("gpt/squad_cpu", "smollm2_135m"),
                                                ("t5/squad", "t5_220m"), ("mt5/squad", "mt5_390m")])
def test_conf_families_share_keys_and_validate(tmp_path, option, train_name):
    from launcher.schema import resolve_all
    from launcher.validate import validate
    from tests.support.launcher import compose_cfg

    for conf in (ROOT / "conf" / "evaluation").rglob("*.yaml"):
        assert conf.read_text().startswith("#") and "Usage:" in conf.read_text(), conf
    cfg = compose_cfg([f"evaluation={option}", "stages=[evaluation]", f"base_results_dir={tmp_path}", f"data_dir={tmp_path}/data",
                       "dry_run=true", "evaluation.trainer.accelerator=cpu"])
    resolve_all(cfg)
    checked = validate(cfg)
    assert any("evaluation.model.artifact_path" in w for w in checked.warnings)
    e = OmegaConf.to_container(cfg.evaluation)
    assert e["run"]["name"] == f"eval_prompt_squad_{train_name}"
    assert e["run"]["results_dir"] == f"{tmp_path}/{train_name}/evaluation_squad"
    assert e["model"]["artifact_path"] == f"{tmp_path}/{train_name}/prompt_learning_squad/results/prompt_artifact"
    assert e["inference"]["stop_strings"] == ["\n"]
    ref = compose_cfg(["evaluation=gpt/squad", f"base_results_dir={tmp_path}", f"data_dir={tmp_path}/data"])
    resolve_all(ref)
    assert _keys(e) == _keys(OmegaConf.to_container(ref.evaluation))


def test_the_launcher_and_the_stage_say_the_same_line_for_evaluation_keys(tmp_path):
    """The launcher runs the stage's own Settings check before submission: one rule, one wording."""
    from stages.common.errors import UserError
    from stages.evaluation.config import Settings
    from tests.support.launcher import compose_cfg, run_main

    override = "evaluation.inference.greedy=false"
    cfg = compose_cfg(["stages=[evaluation]", override]).evaluation
    with pytest.raises(UserError) as exc:
        Settings.from_cfg(cfg, in_job=False)
    proc = run_main(["stages=[evaluation]", "dry_run=true", f"base_results_dir={tmp_path}/r", f"data_dir={tmp_path}/d", override])
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {exc.value}", proc.stderr[-600:]
