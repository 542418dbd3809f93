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


_SECONDS: dict[str, float] = {name: 0.0 for name in MARKERS}   # wall time of the tests of each marker
_COUNT: dict[str, int] = {name: 0 for name in MARKERS}


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> None:
    """Adds setup, call and teardown time (a session fixture's start-up counts in its first test) to each marker."""
    for name in MARKERS:
        if item.get_closest_marker(name):
            _SECONDS[name] += call.duration
            _COUNT[name] += call.when == "call"


def pytest_terminal_summary(terminalreporter) -> None:
    """One line: how long each marker's tests took in this run (CI's log says what the cluster tests cost)."""
    ran = [f"{name} {_COUNT[name]} tests {_SECONDS[name]:.0f} s" for name in MARKERS if _COUNT[name]]
    if ran:
        terminalreporter.write_line("time per marker: " + "; ".join(ran))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The engine tests' tiny random Llama folder (``tests.support.tiny_models.make_model_dir``), built once per session."""
    from tests.support.tiny_models import make_model_dir

    return str(make_model_dir(tmp_path_factory.mktemp("tiny_llama")))
