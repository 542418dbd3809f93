"""The Slurm executor against a real Slurm (started by .ci/slurm/start.sh): chains, failures, srun ranks.

Stage programs here are tiny Python files, so these tests do not depend on the ML stages. Every test
skips cleanly when no Slurm is reachable (see the ``slurm_cluster`` fixture in conftest.py).
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from cluster.slurm import SlurmExecutor, slurm_log
from tests.support.cluster import tiny_job, write_scripts
from tests.support.launcher import ROOT, run_main

pytestmark = pytest.mark.slurm

STAGE = """\
import os, sys, time
from pathlib import Path
order = Path({order!r})
seen = order.read_text().split() if order.exists() else []
assert seen == {before!r}, f"ran out of order: {{seen}}"
time.sleep({sleep})
order.write_text(" ".join(seen + [{name!r}]))
print("hello from", {name!r}, "job", os.environ["SLURM_JOB_ID"], "rank", os.environ["SLURM_PROCID"])
sys.exit({code})
"""


def _stage(tmp: Path, name: str, before: list[str], code: int = 0, sleep: float = 0) -> object:
    program = STAGE.format(order=str(tmp / "order.txt"), before=before, name=name, code=code, sleep=sleep)
    return tiny_job(tmp, name, program, dependency="singleton")


def _executor(tmp: Path, **cluster: object) -> SlurmExecutor:
    """Job names unique to the test: ``singleton`` must not wait for jobs of another test or run."""
    return SlurmExecutor({"poll_seconds": 0.5, "job_name_prefix": f"pl-{tmp.name}-", **cluster})


def _squeue(fmt: str, job_id: str) -> str:
    return subprocess.run(["squeue", "--noheader", "--states=all", f"--jobs={job_id}", f"--format={fmt}"],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_three_stage_chain_runs_in_order(slurm_cluster, tmp_path, capsys):
    jobs = [_stage(tmp_path, "prep", [], sleep=3), _stage(tmp_path, "train", ["prep"]),
            _stage(tmp_path, "eval", ["prep", "train"])]
    executor = _executor(tmp_path)
    write_scripts(executor, jobs)
    assert executor.launch(jobs) == 0
    ids = [slurm_cluster.job_id(j.results_dir) for j in jobs]
    # While the first job sleeps, Slurm holds the others on the chain the launcher asked for.
    assert _squeue("%E", ids[1]).startswith(f"afterok:{ids[0]}(unfulfilled)")
    assert _squeue("%E", ids[2]).startswith(f"afterok:{ids[1]}(unfulfilled)")
    assert "submitted 3 job(s)" in capsys.readouterr().out
    states = slurm_cluster.wait(ids)
    assert [states[i].state for i in ids] == ["COMPLETED"] * 3
    assert (tmp_path / "order.txt").read_text() == "prep train eval"
    for job, job_id in zip(jobs, ids):
        log = Path(slurm_log(job.results_dir, job.name, "out", job_id))
        assert f"hello from {job.name} job {job_id} rank 0" in log.read_text()
        assert Path(slurm_log(job.results_dir, job.name, "err", job_id)).exists()


def test_failed_first_stage_cancels_dependants_and_fails_the_launch(slurm_cluster, tmp_path, capsys):
    jobs = [_stage(tmp_path, "prep", [], code=3), _stage(tmp_path, "train", ["prep"]), _stage(tmp_path, "eval", ["prep", "train"])]
    executor = _executor(tmp_path, wait=True)
    write_scripts(executor, jobs)
    assert executor.launch(jobs) == 1
    ids = [slurm_cluster.job_id(j.results_dir) for j in jobs]
    out, err = capsys.readouterr()
    assert f"job {ids[0]}: FAILED" in out
    for job_id in ids[1:]:
        assert f"job {job_id}: CANCELLED (never ran: dependency never satisfied, job {ids[0]} ended FAILED)" in out
        assert _squeue("%T", job_id) == "CANCELLED"
    assert "not completed: prep, train, eval" in err
    assert (tmp_path / "order.txt").read_text() == "prep"  # neither dependant ever started
    assert not Path(slurm_log(jobs[1].results_dir, "train", "out", ids[1])).exists()


ALLREDUCE = """\
import json, os, sys
from pathlib import Path
from stages.common.entry import init_distributed_env
added = init_distributed_env()
import torch, torch.distributed as dist
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
print(f"rank {rank}/{world} sum {t.item()} via {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} set {sorted(added)}")
env = {k: v for k, v in os.environ.items() if k.startswith(("SLURM_", "MASTER_")) or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK")}
Path(sys.argv[2]).with_name(f"env-{rank}.json").write_text(json.dumps(env))
dist.destroy_process_group()
"""


def test_two_srun_tasks_allreduce_with_gloo_and_agree_with_lightning(slurm_cluster, tmp_path, capsys, monkeypatch):
    from lightning_fabric.plugins.environments import SLURMEnvironment

    job = tiny_job(tmp_path, "allreduce", ALLREDUCE, tasks_per_node=2)
    executor = _executor(tmp_path, wait=True)
    write_scripts(executor, [job])
    assert executor.launch([job]) == 0, capsys.readouterr()
    job_id = slurm_cluster.job_id(job.results_dir)
    log = Path(slurm_log(job.results_dir, job.name, "out", job_id)).read_text()
    port = 15000 + int(job_id) % 10000
    for rank in (0, 1):
        assert f"rank {rank}/2 sum 3.0 via localhost:{port}" in log
        # Lightning, given the same task environment (MASTER_* from the script), sees the same world as torch did.
        env = json.loads((Path(job.results_dir) / f"env-{rank}.json").read_text())
        monkeypatch.setattr(os, "environ", dict(env))
        lt = SLURMEnvironment()
        assert SLURMEnvironment.detect()
        assert (lt.global_rank(), lt.world_size(), lt.local_rank(), lt.node_rank()) == (rank, 2, rank, 0)
        assert (lt.main_address, lt.main_port) == ("localhost", port)
        assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == (str(rank), "2", str(rank))
    assert "set ['LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'NODE_RANK', 'RANK', 'WORLD_SIZE']" in log  # MASTER_* came from the script


def test_hostile_results_dir_is_taken_literally_by_sbatch(slurm_cluster, tmp_path):
    marker = tmp_path / "PWNED"
    hostile = tmp_path / f"res ults \"dq\" 'sq' $(touch {marker}) `touch {marker}` ; touch {marker} 100%j & |"
    job = tiny_job(tmp_path, "hostile", "print('literal ok')", results_dir=hostile)
    executor = SlurmExecutor({"wait": True, "poll_seconds": 0.5, "job_name_prefix": "pl \"x\" $(touch M) "})
    write_scripts(executor, [job])
    assert executor.launch([job]) == 0
    job_id = slurm_cluster.job_id(job.results_dir)
    log = Path(job.results_dir) / f"log-hostile_{job_id}.out"  # '%j' in the folder name stayed literal
    assert log.read_text().strip().splitlines() == [f"promptlaunch: job {job_id} starts (restart 0) on localhost",
                                                    "literal ok"]
    assert not marker.exists()
    assert _squeue("%j", job_id) == 'pl "x" $(touch M) hostile'


def test_main_py_submits_and_waits(slurm_cluster, tmp_path):
    """The user's path end to end: main.py -> sbatch -> the data_preparation stage -> wait -> exit 0."""
    fixture = ROOT / "tests" / "fixtures" / "squad_tiny"
    proc = run_main(["stages=[data_preparation]", "prompt_learning=gpt/squad", "evaluation=gpt/squad",
                     "cluster_type=slurm", "cluster.wait=true", "cluster.poll_seconds=0.5",
                     f"cluster.job_name_prefix=pl-{tmp_path.name}-", f"base_results_dir={tmp_path}/results",
                     f"data_dir={tmp_path}/data", "data_preparation.source=local", f"data_preparation.local_dir={fixture}",
                     "data_preparation.sha256.train=null", "data_preparation.sha256.dev=null",
                     "data_preparation.expected_counts.train=7", "data_preparation.expected_counts.dev=5"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = tmp_path / "results" / "data_preparation"
    job_id = slurm_cluster.job_id(results)
    assert f"job {job_id}: COMPLETED" in proc.stdout and "done: 1 job(s) completed" in proc.stdout
    assert (results / f"log-download_squad_{job_id}.out").exists()
    assert (tmp_path / "data" / "prompt_data" / "v1.1" / "squad_test_ground_truth.jsonl").exists()
