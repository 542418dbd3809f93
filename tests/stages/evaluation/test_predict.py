"""``python3 -m stages.evaluation.predict``: a JSONL of mixed tasks without gold answers in, one prediction per record
out; the answers are transformers' own greedy answers from each record's prompt embeddings (the artifact's
``export/vllm/<task>``), on the tiny Llama with a two-task artifact (squad: one marker first; sentiment: two
markers mid-template)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from stages.evaluation.predict import main  # noqa: E402
from tests.support.hf_generate import transformers_answers  # noqa: E402
from tests.support.paths import ROOT  # noqa: E402
from tests.support.records import sent_records, squad_records  # noqa: E402
from tests.support.templates import SENT_T, SQUAD_T  # noqa: E402

TOKENS = 8


def two_task_artifact(folder: Path, model_dir: str) -> Path:
    """squad and sentiment prompt tables (seeded, scale 1) written by the engine's save_artifact."""
    from stages.engine.artifact import base_info, save_artifact
    from stages.engine.base_model import fingerprint, load_model
    from stages.engine.template import parse_templates

    model = load_model(model_dir)
    fp = fingerprint(model)
    g = torch.Generator().manual_seed(2)
    tables = {"squad": torch.randn(4, fp["hidden_size"], generator=g), "sentiment": torch.randn(6, fp["hidden_size"], generator=g)}
    return save_artifact(folder, tables=tables, templates=parse_templates([SQUAD_T, SENT_T]), style="prompt-tuning",
                         base=base_info(model_dir, model_dir, model, fp), add_eos=True, max_seq_length=256,
                         training={"note": "seeded tables for tests"})


def questions(path: Path) -> list[dict]:
    """Mixed tasks, no answers: squad and sentiment records interleaved."""
    squad = [{k: v for k, v in r.items() if k != "answer"} for r in squad_records(4, seed=6)]
    sent = [{k: v for k, v in r.items() if k != "label"} for r in sent_records(3, seed=2)]
    records = [squad[0], sent[0], squad[1], squad[2], sent[1], sent[2], squad[3]]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return records


def test_mixed_tasks_without_answers_get_transformers_own_greedy_answers(tmp_path, tiny):
    from stages.engine.base_model import load_model, load_tokenizer
    from stages.engine.prompt_embeds import PromptEmbedder, load_vllm_export

    art = two_task_artifact(tmp_path / "artifact", tiny)
    records = questions(tmp_path / "questions.jsonl")
    out = tmp_path / "predictions.jsonl"
    assert main(["--artifact", str(art), "--input", str(tmp_path / "questions.jsonl"), "--output", str(out),
                 "--tokens-to-generate", str(TOKENS), "--batch-size", "3", "--no-progress"]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in g.items() if k != "prediction"} for g in got] == records

    model, tokenizer = load_model(tiny), load_tokenizer(tiny)
    embedders = {t: PromptEmbedder.from_base_model(load_vllm_export(art / "export" / "vllm" / t)) for t in ("squad", "sentiment")}
    embeds = [embedders[r["taskname"]](r, TOKENS) for r in records]
    assert [g["prediction"] for g in got] == transformers_answers(model, tokenizer, embeds, TOKENS)
    assert any(g["prediction"] for g in got)


def test_a_record_lacking_a_field_is_one_line_before_the_model_loads(tmp_path, tiny):
    art = two_task_artifact(tmp_path / "artifact", tiny)
    bad = tmp_path / "questions.jsonl"
    bad.write_text(json.dumps({"taskname": "squad", "context": "c"}) + "\n" + json.dumps({"taskname": "sentiment"}) + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "stages.evaluation.predict", "--artifact", str(art), "--input", str(bad),
                           "--output", str(tmp_path / "out.jsonl")], capture_output=True, text=True, timeout=300, env=env,
                          cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {bad}:1: record lacks field 'question' that the template of task 'squad' needs "
        f"('<|VIRTUAL_PROMPT_0|>Context: {{context}} Question: {{question}} Answer: {{answer}}'); give every record a "
        f"text 'question' or use a matching template")
    assert not (tmp_path / "out.jsonl").exists()


def test_an_unknown_artifact_names_the_option(tmp_path, capsys):
    (tmp_path / "q.jsonl").write_text(json.dumps({"taskname": "squad", "context": "c", "question": "q"}) + "\n")
    assert main(["--artifact", str(tmp_path / "nowhere"), "--input", str(tmp_path / "q.jsonl"),
                 "--output", str(tmp_path / "out.jsonl")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --artifact={tmp_path / 'nowhere'}: not a prompt artifact")
