"""The fixture of the tests on a real Slurm (marked ``slurm``)."""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import pytest


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
