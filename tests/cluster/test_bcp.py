"""BCP executor: the bcprun script it renders, and the in-job side proven through tests/support/fake_bcprun/bcprun,
which starts nnodes x npernode local processes with the variables BCP gives them."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.bcp import BCPExecutor
from stages.common.errors import UserError
from cluster.jobspec import JobSpec
from stages.common.entry import init_distributed_env
from tests.support.cluster import FAKE_BIN, tiny_job, write_scripts
from tests.support.paths import ROOT

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR",
               "MASTER_PORT", "TORCHELASTIC_RUN_ID", "NGC_ARRAY_INDEX", "NGC_ARRAY_SIZE", "NGC_ARRAY_TYPE", "NGC_MASTER_ADDR")


def job_env(**extra: str) -> dict[str, str]:
    """This process's environment as a BCP job would see it: fake bcprun first on PATH, no Slurm or torchrun."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_")) and k not in LAUNCH_VARS}
    env["PATH"] = f"{FAKE_BIN}:{env['PATH']}"
    return {**env, **extra}


def test_script_runs_bcprun_with_the_stage_layout():
    spec = JobSpec(stage="prompt_learning", name="squad_gpt3_5b", results_dir="/r/pl", launcher_scripts_path="/opt/l",
                   python="python3", entry="/opt/l/stages/prompt_learning/run.py", config_path="/r/pl/c.yaml",
                   nodes=2, tasks_per_node=8, env=(("B", "x y"), ("A", "1")), secret_files=(("WANDB_API_KEY", "/k"),))
    script = BCPExecutor().render(spec)
    assert script.splitlines()[4:] == [
        "set -euo pipefail",
        "cd /opt/l",
        "export A=1",
        "export B='x y'",
        'export WANDB_API_KEY="$(cat /k)"  # secret read at job time',
        "bcprun --nnodes 2 --npernode 8 -no_redirect --workdir /opt/l \\",
        '  --env "A=${A}" \\',
        '  --env "B=${B}" \\',
        '  --env "WANDB_API_KEY=${WANDB_API_KEY}" \\',
        "  --env LOCAL_WORLD_SIZE=8 \\",
        "  --cmd 'python3 -u /opt/l/stages/prompt_learning/run.py --config /r/pl/c.yaml' \\",
        "  2>&1 | tee -a /r/pl/log-squad_gpt3_5b.out",
    ]


def test_container_is_noted_not_used_and_bad_names_are_refused():
    spec = JobSpec(stage="s", name="n", results_dir="/r", launcher_scripts_path="/l", python="p", entry="e", config_path="c")
    script = BCPExecutor().render(JobSpec(**{**spec.__dict__, "container": "nvcr.io/x:1"}))
    assert "# container nvcr.io/x:1 is not used here" in script and "nvcr.io/x:1" not in script.split("set -euo")[1]
    with pytest.raises(UserError, match="env_vars.A-B"):
        BCPExecutor().check(JobSpec(**{**spec.__dict__, "env": (("A-B", "1"),)}))


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
print(f"rank {rank}/{world} node {os.environ['NGC_ARRAY_INDEX']} local {os.environ['LOCAL_RANK']} sum {t.item()}", flush=True)
Path(sys.argv[2]).with_name(f"env-{rank}.json").write_text(json.dumps(dict(os.environ)))
dist.destroy_process_group()
"""


def test_two_nodes_of_two_processes_allreduce_and_agree_with_lightning(tmp_path, monkeypatch):
    from lightning_fabric.plugins.environments import LightningEnvironment, TorchElasticEnvironment

    record = tmp_path / "bcprun.jsonl"
    job = tiny_job(tmp_path, "allreduce", ALLREDUCE, nodes=2, tasks_per_node=2)
    (script,) = write_scripts(BCPExecutor(), [job])
    proc = subprocess.run(["bash", script], env=job_env(FAKE_BCPRUN_RECORD=str(record), MASTER_PORT="29617"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = Path(job.log_path).read_text()
    for rank, (node, local) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        assert f"rank {rank}/4 node {node} local {local} sum 10.0" in log.replace("\n", "")
        # Lightning, in the same environment, picks its default environment and computes the same rank.
        env = json.loads((Path(job.results_dir) / f"env-{rank}.json").read_text())
        monkeypatch.setattr(os, "environ", env)
        assert not TorchElasticEnvironment.detect() and "SLURM_NTASKS" not in env  # so Lightning uses its default
        lt = LightningEnvironment()
        assert lt.creates_processes_externally
        assert lt.node_rank() * job.tasks_per_node + lt.local_rank() == rank == int(env["RANK"])
        assert (lt.main_address, lt.main_port) == ("127.0.0.1", 29617)
    argv = json.loads(record.read_text())
    assert argv[:7] == ["--nnodes", "2", "--npernode", "2", "-no_redirect", "--workdir", str(ROOT)]
    assert argv[-4:] == ["--env", "LOCAL_WORLD_SIZE=2", "--cmd", f"{sys.executable} -u {job.entry} --config {job.config_path}"]


@pytest.mark.parametrize("array_type", ["PyTorchJob", "MPIJob"])
def test_rank_mapping_for_both_bcprun_modes(tmp_path, array_type):
    code = "from stages.common.entry import init_distributed_env; import os; init_distributed_env(); " \
           "e = os.environ; print(f\"R {e['RANK']} {e['WORLD_SIZE']} {e['NODE_RANK']} {e['LOCAL_RANK']}\")"
    job = tiny_job(tmp_path, "ranks", code, nodes=2, tasks_per_node=3)
    (script,) = write_scripts(BCPExecutor(), [job])
    proc = subprocess.run(["bash", script], env=job_env(NGC_ARRAY_TYPE=array_type), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    found = sorted(re.findall(r"R \d+ \d+ \d+ \d+", proc.stdout))  # unbuffered processes may share a line
    assert found == [f"R {n * 3 + l} 6 {n} {l}" for n in range(2) for l in range(3)]


def test_mapping_from_ngc_variables_alone():
    env = {"NGC_ARRAY_INDEX": "3", "NGC_ARRAY_SIZE": "4", "NGC_MASTER_ADDR": "launcher-svc-1", "LOCAL_RANK": "5",
           "LOCAL_WORLD_SIZE": "8"}
    assert init_distributed_env(env) == {"RANK": "29", "WORLD_SIZE": "32", "NODE_RANK": "3",
                                         "MASTER_ADDR": "launcher-svc-1", "MASTER_PORT": "29500"}


def test_launch_runs_stages_in_order_and_stops_at_the_first_failure(tmp_path, monkeypatch, capfd):
    jobs = [tiny_job(tmp_path, "one", "print('one ran')"), tiny_job(tmp_path, "two", "raise SystemExit(4)"),
            tiny_job(tmp_path, "three", "print('three ran')")]
    write_scripts(BCPExecutor(), jobs)
    monkeypatch.setenv("PATH", job_env()["PATH"])
    monkeypatch.delenv("NGC_ARRAY_SIZE", raising=False)
    assert BCPExecutor().launch(jobs) == 4
    out, err = capfd.readouterr()
    assert "one ran" in out and "three ran" not in out
    assert "stage 'two' failed with exit code 4" in err and "Not run: three" in err
    assert "one ran" in Path(jobs[0].log_path).read_text()
    assert not Path(jobs[2].log_path).exists()


def test_launch_errors_are_one_line(tmp_path, monkeypatch):
    jobs = [tiny_job(tmp_path, "big", "", nodes=4)]
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    with pytest.raises(UserError, match="bcprun: not found"):
        BCPExecutor().launch(jobs)
    monkeypatch.setenv("PATH", job_env()["PATH"])
    monkeypatch.setenv("NGC_ARRAY_SIZE", "2")
    with pytest.raises(UserError, match="big: needs 4 nodes but this BCP job has NGC_ARRAY_SIZE=2"):
        BCPExecutor().launch(jobs)
