"""T5 and mT5 end to end through main.py, as a user runs it: data_preparation (the SQuAD fixture) -> prompt_learning
(``t5/squad_tiny`` / ``mt5/squad_tiny``) -> evaluation (``t5/squad_tiny`` / ``mt5/squad_tiny``), on tiny
RANDOMLY INITIALISED models built offline by ``tests.support.tiny_models``. EM/F1 are meaningless here.
"""
from __future__ import annotations

import json

import pytest

from tests.support.data_preparation import MAIN_OVERRIDES
from tests.support.launcher import OFFLINE_ENV, run_main

pytest.importorskip("torch")
pytest.importorskip("sentencepiece")

DATA_PREP = MAIN_OVERRIDES
ENV = OFFLINE_ENV


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """data_dir with both tiny model folders (where the squad_tiny configs look) and the prepared fixture data."""
    from tests.support.tiny_models import build

    root = tmp_path_factory.mktemp("t5_e2e")
    data, results = root / "data", root / "results"
    for family in ("t5", "mt5"):
        build(family, data / "tiny_models" / f"{family}_tiny_random")
    proc = run_main(["stages=[data_preparation]", f"base_results_dir={results}", f"data_dir={data}", *DATA_PREP], env=ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (data / "prompt_data" / "v1.1" / "squad_test_ground_truth.jsonl").is_file()
    return data, results


@pytest.mark.parametrize("family", ["t5", "mt5"])
def test_main_py_prompt_learning_and_evaluation(workspace, family):
    data, results = workspace
    proc = run_main(["stages=[prompt_learning,evaluation]", f"prompt_learning={family}/squad_tiny", f"evaluation={family}/squad_tiny",
                     f"base_results_dir={results}", f"data_dir={data}"], env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "done: 2 stage(s) finished: prompt_learning, evaluation" in proc.stdout

    run = results / f"{family}_tiny"
    art = run / "prompt_learning_squad" / "results" / "prompt_artifact"
    meta = json.loads((art / "artifact.json").read_text())
    assert meta["family"] == "t5" and meta["base_model"]["model_type"] == family
    assert meta["base_model"]["language_model_path"] == str(data / "tiny_models" / f"{family}_tiny_random")
    assert meta["virtual_prompt_style"] == ("p-tuning" if family == "t5" else "prompt-tuning")
    assert meta["training"]["steps"] == 6 and meta["training"]["train_examples"]["kept"] == 7
    assert (art / "export" / "npy" / "squad.npy").is_file()
    assert json.loads((art / "export" / "peft" / "squad" / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"

    ev = run / "evaluation_squad"
    m = json.loads((ev / "metrics.json").read_text())
    assert m["total"] == 5 and m["model"]["family"] == "t5" and m["virtual_tokens"] == {"squad": 10}
    assert m["artifact"] == str(art) and "baseline" in m
    rows = [json.loads(x) for x in (ev / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ["d1", "d2", "d3", "d4", "d5"]
    assert all(isinstance(r["prediction"], str) and 0.0 <= r["f1"] <= 1.0 for r in rows)
