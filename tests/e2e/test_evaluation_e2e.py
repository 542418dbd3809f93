"""End to end through the entry file with the real engine: the engine tests' tiny random Llama + BPE tokenizer, a saved artifact."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.support.artifacts import save_tiny_artifact  # noqa: E402
from tests.support.paths import ROOT  # noqa: E402
from tests.support.templates import SQUAD_T  # noqa: E402
from tests.support.tiny_models import make_model_dir  # noqa: E402  (the engine's tiny random Llama + BPE tokenizer)

RUN = ROOT / "stages" / "evaluation" / "run.py"
DEV = ROOT / "tests" / "fixtures" / "squad_tiny" / "dev-v1.1.json"
TEMPLATE = SQUAD_T


def squad_records() -> list[dict]:
    """The fixture's dev questions in the data_preparation ground-truth format (all gold answers)."""
    doc = json.loads(DEV.read_text(encoding="utf-8"))
    return [
        {"taskname": "squad", "id": qa["id"], "context": p["context"], "question": qa["question"], "answer": [a["text"] for a in qa["answers"]]}
        for art in doc["data"] for p in art["paragraphs"] for qa in p["qas"]
    ]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("stages.engine.prompted_model", reason="the engine (stages/engine/prompted_model.py) is not there yet")
    root = tmp_path_factory.mktemp("tiny")
    recs = squad_records()
    model_dir = make_model_dir(root / "tiny_llama")
    artifact = save_tiny_artifact(root / "prompt_artifact", model_dir)
    test_ds = root / "squad_test_ground_truth.jsonl"
    test_ds.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    return {"root": root, "model": model_dir, "artifact": artifact, "test_ds": test_ds, "records": recs}


def stage_cfg(results: Path, tiny, **over):
    cfg = OmegaConf.create({
        "run": {"name": "eval_prompt_squad_tiny", "results_dir": str(results)},
        "trainer": {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "precision": "32"},
        "model": {"artifact_path": str(tiny["artifact"]), "language_model_path": None, "task_templates": [TEMPLATE]},
        "data": {"test_ds": str(tiny["test_ds"]), "batch_size": 2, "max_examples": 4, "offset": 1},
        "inference": {"tokens_to_generate": 6, "greedy": True, "stop_strings": ["\n"], "compare_baseline": True,
                      "baseline_only": False, "progress": True},
    })
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in over.items()]))


def run_entry(cfg, path: Path) -> subprocess.CompletedProcess:
    path.write_text(OmegaConf.to_yaml(cfg))
    return subprocess.run([sys.executable, str(RUN), "--config", str(path)], capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2",
                               "HOME": str(path.parent)})


def test_entry_file_end_to_end(tiny, tmp_path):
    from stages.evaluation.metrics import score
    from stages.engine.prompted_model import PromptedModel

    results = tmp_path / "results"
    proc = run_entry(stage_cfg(results, tiny), tmp_path / "eval_prompt_squad_tiny_hydra.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in results.iterdir()) == ["metrics.json", "predictions.jsonl", "predictions_baseline.jsonl", "summary.md"]
    assert "squad squad_test_ground_truth.jsonl[1:5] n=4  tuned EM" in proc.stdout

    m = json.loads((results / "metrics.json").read_text())
    assert m["total"] == 4 and m["data"]["slice"] == [1, 5] and m["virtual_tokens"] == {"squad": 4}
    assert m["artifact"] == str(tiny["artifact"]) and m["model"]["language_model_path"] == str(tiny["model"])
    assert set(m["baseline"]) >= {"exact_match", "f1", "total", "delta", "seconds_per_example"}

    # the files agree with the engine called directly, and with the metric
    pm = PromptedModel.load(str(tiny["artifact"]))
    inputs = [{k: v for k, v in r.items() if k != "answer"} for r in tiny["records"][1:5]]
    for name, virtual in (("predictions.jsonl", True), ("predictions_baseline.jsonl", False)):
        rows = [json.loads(x) for x in (results / name).read_text(encoding="utf-8").splitlines()]
        assert [r["id"] for r in rows] == ["d2", "d3", "d4", "d5"]
        assert [r["prediction"] for r in rows] == pm.generate(inputs, tokens_to_generate=6, batch_size=4, use_virtual_prompt=virtual, progress=False)
        for r, rec in zip(rows, tiny["records"][1:5]):
            s = score(r["prediction"], rec["answer"])
            assert (r["em"], r["f1"], r["answers"]) == (s.em, round(s.f1, 4), rec["answer"])
    tuned = [json.loads(x)["prediction"] for x in (results / "predictions.jsonl").read_text().splitlines()]
    base = [json.loads(x)["prediction"] for x in (results / "predictions_baseline.jsonl").read_text().splitlines()]
    assert tuned != base  # the virtual prompt is really applied


def test_baseline_only_with_real_engine(tiny, tmp_path):
    from stages.evaluation.evaluate import evaluate

    results = tmp_path / "results"
    evaluate(stage_cfg(results, tiny, **{"inference.baseline_only": True, "model.artifact_path": "null",
                                         "model.language_model_path": str(tiny["model"]), "inference.progress": False}))
    m = json.loads((results / "metrics.json").read_text())
    assert m["evaluated"] == "baseline" and m["total"] == 4 and m["artifact"] is None
    assert m["model"]["virtual_tokens"] == {"squad": 0}
    assert (results / "predictions_baseline.jsonl").is_file() and not (results / "predictions.jsonl").exists()


def test_wrong_base_model_is_a_user_error(tiny, tmp_path):
    from stages.common.errors import UserError
    from stages.evaluation.evaluate import evaluate

    other = make_model_dir(tmp_path / "other", seed=1)
    with pytest.raises(UserError, match=r"was trained on base model .*use the base model the prompts were tuned on"):
        evaluate(stage_cfg(tmp_path / "results", tiny, **{"model.language_model_path": str(other)}))
    with pytest.raises(UserError, match=r"^evaluation\.model\.language_model_path: '/nowhere/model' does not exist"):
        evaluate(stage_cfg(tmp_path / "results", tiny, **{"model.language_model_path": "/nowhere/model"}))


def test_entry_file_with_the_nemo_export(tiny, tmp_path):
    """evaluation.model.artifact_path may be a NeMo prompt-learning .nemo (here the artifact's own export, the base
    model named): the same predictions as the artifact folder."""
    runs = {}
    for name, over in (("artifact", {}),
                       ("nemo", {"model.artifact_path": str(tiny["artifact"] / "export" / "nemo" / "squad.nemo"),
                                 "model.language_model_path": str(tiny["model"]), "inference.compare_baseline": False})):
        results = tmp_path / name
        proc = run_entry(stage_cfg(results, tiny, **over), tmp_path / f"{name}_hydra.yaml")
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = (results / "predictions.jsonl").read_text()
    assert runs["nemo"] == runs["artifact"]
