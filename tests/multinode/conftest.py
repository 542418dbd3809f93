"""The fixture of the tests on the two-node Slurm of .ci/slurm/start-multinode.sh (marked ``multinode``)."""
from __future__ import annotations

import os
import subprocess
from typing import Iterator

import pytest

from tests.support.multinode import CONF_ENV, MultinodeCluster, skip_reason


@pytest.fixture(scope="session")
def _multinode_conf() -> str:
    why = skip_reason()
    if why:
        pytest.skip(why)
    return os.environ[CONF_ENV]


@pytest.fixture
def multinode_cluster(_multinode_conf: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[MultinodeCluster]:
    """The multi-node cluster, with SLURM_CONF pointing at it for this test only (the one-node tests keep theirs).
    The cluster serves these tests alone: whatever a test left queued (it failed half-way) is cancelled after it."""
    monkeypatch.setenv("SLURM_CONF", _multinode_conf)
    yield MultinodeCluster(_multinode_conf)
    subprocess.run(["scancel", f"--user={os.getuid()}"], capture_output=True, timeout=60)
