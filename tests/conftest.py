"""Shared pytest setup: the markers (add yours to MARKERS) and the engine tests' tiny random Llama folder, used under
tests/stages/ and tests/e2e/. Fixtures used in one folder only live in that folder's conftest.py; helpers that are not
fixtures live in tests/support/."""
from __future__ import annotations

import pytest

MARKERS = {  # name -> description; append new markers here
    "slurm": "needs a running Slurm (bash .ci/slurm/start.sh && source /tmp/promptlaunch-slurm/env.sh); "
             "skipped when SLURM_CONF is unset or sinfo fails",
    "slow": "loads the real SmolLM2-135M model (GGUF conversion on first use), or runs bench/gpu_check.sh --dry-run "
            "end to end; a few minutes on CPU",
    "multinode": "needs the two-node Slurm of .ci/slurm/start-multinode.sh (then source /tmp/promptlaunch-slurm-mn/env.sh); "
                 "skipped with the reason when PROMPTLAUNCH_MULTINODE_SLURM_CONF is unset or its nodes are not up",
    "dist": "forks 2-8 gloo CPU processes (torch.distributed): TP/PP/DP prompt-learning equivalence; "
            "~1 min on 2 busy cores; deselect with -m 'not dist'",
}


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The engine tests' tiny random Llama folder (``tests.support.tiny_models.make_model_dir``), built once per session."""
    from tests.support.tiny_models import make_model_dir

    return str(make_model_dir(tmp_path_factory.mktemp("tiny_llama")))
