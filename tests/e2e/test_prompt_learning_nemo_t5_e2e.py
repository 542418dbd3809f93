"""A NeMo T5 / mT5 ``.nemo`` base model end to end through main.py, as a NeMo launcher user points at one:
data_preparation (the SQuAD fixture) -> prompt_learning (``t5/squad_tiny`` / ``mt5/squad_tiny`` with
``prompt_learning.model.language_model_path=<dir>/megatron_t5.nemo``) -> evaluation (which takes the base model
from the artifact). The ``.nemo`` files are tiny RANDOMLY INITIALISED NeMo legacy T5/mT5 models
(:mod:`tests.support.nemo_t5`; no real T5 weights exist offline), so EM/F1 are meaningless (the random model
mostly answers with a sentinel, i.e. nothing): the run must complete and record the converted model.
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
    """The two .nemo files (as the launcher's convert_nemo stage names them), a model cache, the prepared data."""
    from tests.support import nemo_t5

    root = tmp_path_factory.mktemp("nemo_t5_e2e")
    data, results = root / "data", root / "results"
    for family in ("t5", "mt5"):
        cfg, tok = nemo_t5.t5_config(family), nemo_t5.tokenizer_member(family)
        state = nemo_t5.random_legacy_state(cfg, nemo_t5.nemo_vocab_size(family, tok, cfg))
        folder = root / f"{family}_tiny" / "convert_nemo" / "results"
        folder.mkdir(parents=True)
        nemo_t5.write(folder / f"megatron_{family}.nemo", cfg, {"model_weights.ckpt": state}, tok)
    env = {**ENV, "PROMPTLAUNCH_CACHE": str(root / "cache")}
    proc = run_main(["stages=[data_preparation]", f"base_results_dir={results}", f"data_dir={data}", *DATA_PREP], env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return root, data, results, env


@pytest.mark.parametrize("family", ["t5", "mt5"])
def test_main_py_on_a_nemo_t5(workspace, family):
    root, data, results, env = workspace
    nemo = root / f"{family}_tiny" / "convert_nemo" / "results" / f"megatron_{family}.nemo"
    proc = run_main(["stages=[prompt_learning,evaluation]", f"prompt_learning={family}/squad_tiny",
                     f"evaluation={family}/squad_tiny", f"base_results_dir={results}", f"data_dir={data}",
                     f"prompt_learning.model.language_model_path={nemo}"], env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "done: 2 stage(s) finished: prompt_learning, evaluation" in proc.stdout

    run = results / f"{family}_tiny"
    art = run / "prompt_learning_squad" / "results" / "prompt_artifact"
    meta = json.loads((art / "artifact.json").read_text())
    assert meta["family"] == "t5" and meta["base_model"]["model_type"] == "megatron_t5"
    assert meta["base_model"]["language_model_path"] == str(nemo)
    assert meta["training"]["steps"] == 6 and meta["training"]["train_examples"]["kept"] == 7
    assert [p.name for p in (root / "cache").iterdir() if p.name.startswith(f"megatron_{family}-nemo-")]
    m = json.loads((run / "evaluation_squad" / "metrics.json").read_text())
    assert m["total"] == 5 and m["model"]["family"] == "t5" and m["model"]["language_model_path"] == str(nemo)
    assert m["virtual_tokens"] == {"squad": 10}
    rows = [json.loads(x) for x in (run / "evaluation_squad" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ["d1", "d2", "d3", "d4", "d5"]
    assert all(isinstance(r["prediction"], str) and 0.0 <= r["f1"] <= 1.0 for r in rows)
