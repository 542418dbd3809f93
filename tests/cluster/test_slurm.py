"""Slurm executor without a cluster: the sbatch script it renders, the chain it submits (through a fake
sbatch on PATH), its one-line errors, wait mode (stand-in squeue/sacct/scancel), and
init_distributed_env agreeing with Lightning under srun.

The same checks against a real Slurm are in tests/slurm/test_slurm_real.py. ``tiny_job``/``write_scripts``
(tests/support/cluster.py) are shared with the BCP, quoting and real-Slurm tests.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from cluster.slurm import SlurmExecutor, directive_value
from stages.common.errors import UserError
from cluster.jobspec import JobSpec
from stages.common.entry import init_distributed_env
from tests.support.cluster import fake_command, tiny_job, write_scripts


def _spec(**fields: Any) -> JobSpec:
    base = dict(stage="prompt_learning", name="squad_gpt3_5b", results_dir="/r/gpt3_5b/pl", launcher_scripts_path="/opt/pl",
                python="python3", entry="/opt/pl/stages/prompt_learning/run.py", config_path="/r/gpt3_5b/pl/c.yaml")
    return JobSpec(**{**base, **fields})


def _directives(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


# ---- rendering -----------------------------------------------------------------------------------

def test_gpu_stage_directives_sorted_and_complete():
    spec = _spec(nodes=2, tasks_per_node=8, gpus_per_node=8, time_limit="1-00:00:00", signal="USR1@120")
    script = SlurmExecutor({"partition": "batch", "account": "llm", "overcommit": True}).render(spec)
    assert _directives(script) == [
        "#SBATCH --account=llm",
        "#SBATCH --error=/r/gpt3_5b/pl/log-squad_gpt3_5b_%j.err",
        "#SBATCH --exclusive",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --job-name=promptlaunch-squad_gpt3_5b",
        "#SBATCH --kill-on-invalid-dep=yes",
        "#SBATCH --mem=0",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --open-mode=append",
        "#SBATCH --output=/r/gpt3_5b/pl/log-squad_gpt3_5b_%j.out",
        "#SBATCH --overcommit",
        "#SBATCH --partition=batch",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR1@120",
        "#SBATCH --time=1-00:00:00",
    ]
    assert "srun --kill-on-bad-exit=1 --nodes=2 --ntasks-per-node=8 python3 -u /opt/pl/stages/prompt_learning/run.py" in script
    # the preemption signal reaches the tasks; the script requeues when the stage left the marker file
    assert "export PROMPTLAUNCH_REQUEUE_FILE=/r/gpt3_5b/pl/.requeue-\"$SLURM_JOB_ID\"" in script
    assert " || rc=$?\nif [[ -e $PROMPTLAUNCH_REQUEUE_FILE ]]; then" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"\n    exit 0\nfi\nexit "$rc"\n' in script
    assert "PROMPTLAUNCH" not in SlurmExecutor().render(_spec())   # no signal: no requeue marker
    assert "--container" not in script
    assert script.index("#SBATCH") < script.index("set -euo pipefail")  # sbatch stops reading at the first command


def test_gpu_requests_follow_cluster_settings():
    cpu = _spec(gpus_per_node=0)
    assert not [d for d in _directives(SlurmExecutor().render(cpu)) if "gpus" in d]
    assert "#SBATCH --gpus-per-node=4" in SlurmExecutor({"gpus_per_node": 4}).render(cpu)
    per_task = SlurmExecutor({"gpus_per_task": 1}).render(_spec(gpus_per_node=8))
    assert "#SBATCH --gpus-per-task=1" in per_task and "gpus-per-node" not in per_task
    plain = SlurmExecutor({"mem": None, "exclusive": False, "job_name_prefix": ""}).render(cpu)
    assert "--mem" not in plain and "--exclusive" not in plain and "#SBATCH --job-name=squad_gpt3_5b" in plain


def test_container_flags_only_with_a_container():
    spec = _spec(container="nvcr.io/nvidia/pytorch:24.05-py3", container_mounts=("/lustre/models:/models",),
                 data_dir="/mount/data", base_results_dir="/r")
    srun = SlurmExecutor().srun_command(spec)
    assert "--container-image=nvcr.io/nvidia/pytorch:24.05-py3" in srun
    assert "--container-mounts=/mount/data:/mount/data,/r:/r,/lustre/models:/models" in srun
    assert "--container-workdir=/opt/pl" in srun and "--no-container-mount-home" in srun
    script = SlurmExecutor().render(spec)
    assert "\ncd " not in script  # the code lives in the container; srun sets the working folder there
    no_base = SlurmExecutor().srun_command(_spec(container="img"))
    assert "--container-mounts=/r/gpt3_5b/pl:/r/gpt3_5b/pl" in no_base


def test_render_is_pure(monkeypatch):
    spec = _spec(env=(("B", "2"), ("A", "1")), secret_files=(("WANDB_API_KEY", "/k"),))
    first = SlurmExecutor().render(spec)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.chdir("/")
    assert SlurmExecutor().render(spec) == first
    assert first.index("export A=1") < first.index("export B=2") < first.index('export WANDB_API_KEY="$(cat /k)"')


@pytest.mark.parametrize("value,expected", [
    ("batch", "batch"),
    ("/a b/log-%j.out", '"/a b/log-%j.out"'),
    ('say "hi" \\ $(x) `y`', '"say \\"hi\\" \\\\ $(x) `y`"'),
])
def test_directive_value_quoting(value, expected):
    assert directive_value(value) == expected


@pytest.mark.parametrize("fields,cluster,msg", [
    ({"results_dir": "/r/a\n$(touch /tmp/x)"}, {}, "newline or control character"),
    ({}, {"job_name_prefix": "p\n"}, "cluster.job_name_prefix"),
    ({"results_dir": "/r/a\\b"}, {}, "backslash"),
    ({"container": "img", "container_mounts": ("/a,b:/c",)}, {}, "mount separator"),
    ({"env": (("BAD NAME", "1"),)}, {}, "env_vars.BAD NAME"),
])
def test_check_refuses_what_sbatch_cannot_hold(fields, cluster, msg):
    with pytest.raises(UserError, match=msg):
        SlurmExecutor(cluster).check(_spec(**fields))


def test_render_never_emits_a_newline_in_a_directive():
    with pytest.raises(ValueError):
        SlurmExecutor().render(_spec(results_dir="/r/a\ntouch /tmp/pwned"))


# ---- submission through a fake sbatch -----------------------------------------------------------

FAKE_SBATCH = """\
n=$(( $(cat "$FAKE_DIR/count" 2>/dev/null || echo 0) + 1 )); echo $n > "$FAKE_DIR/count"
echo "$*" >> "$FAKE_DIR/calls"
[ "${FAKE_FAIL_AT:-0}" = "$n" ] && { echo "sbatch: error: Batch job submission failed: Invalid partition name specified" >&2; exit 1; }
[ -n "${FAKE_GARBAGE:-}" ] && { echo "Submitted batch job, maybe"; exit 0; }
echo "$((1000 + n));cluster"
"""


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    fake_command(tmp_path / "bin", "sbatch", FAKE_SBATCH)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    return tmp_path


def _chain(tmp: Path) -> list[JobSpec]:
    return [tiny_job(tmp, "prep", "", dependency="singleton"), tiny_job(tmp, "train", ""),
            tiny_job(tmp, "eval", "", dependency="singleton")]


def test_submits_an_afterok_chain_and_records_job_ids(fake_sbatch, capsys):
    jobs = _chain(fake_sbatch)
    scripts = write_scripts(SlurmExecutor(), jobs)
    assert SlurmExecutor().launch(jobs) == 0
    calls = (fake_sbatch / "calls").read_text().splitlines()
    assert calls == [f"--parsable --dependency=singleton {scripts[0]}",
                     f"--parsable --dependency=afterok:1001 {scripts[1]}",
                     f"--parsable --dependency=afterok:1002,singleton {scripts[2]}"]
    assert [Path(j.results_dir, "job_id").read_text() for j in jobs] == ["1001\n", "1002\n", "1003\n"]
    out = capsys.readouterr().out
    assert "stage" in out and "job id" in out
    assert f"{jobs[1].results_dir}/log-train_1002.out" in out and scripts[2] in out


def test_sbatch_failure_is_one_line_error_naming_what_was_submitted(fake_sbatch, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL_AT", "2")
    jobs = _chain(fake_sbatch)
    write_scripts(SlurmExecutor(), jobs)
    with pytest.raises(UserError) as err:
        SlurmExecutor().launch(jobs)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("train: sbatch ") and "Invalid partition name specified" in msg
    assert "already submitted: prep=1001" in msg


def test_unparsable_sbatch_output_is_a_user_error(fake_sbatch, monkeypatch):
    monkeypatch.setenv("FAKE_GARBAGE", "1")
    jobs = _chain(fake_sbatch)[:1]
    write_scripts(SlurmExecutor(), jobs)
    with pytest.raises(UserError, match="cannot read a job id"):
        SlurmExecutor().launch(jobs)


def test_missing_sbatch_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    jobs = _chain(tmp_path)[:1]
    with pytest.raises(UserError, match="sbatch: not found on PATH"):
        SlurmExecutor().launch(jobs)


# ---- the in-job side: init_distributed_env and Lightning agree ---------------------------------

def test_slurm_variables_give_lightning_and_torch_the_same_world(monkeypatch):
    from lightning_fabric.plugins.environments import SLURMEnvironment

    task = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
            "SLURM_STEP_TASKS_PER_NODE": "2(x4)", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NODELIST": "gpu[07-10]", "SLURM_JOB_NODELIST": "gpu[07-10]",
            "SLURM_NNODES": "4",
            "SLURM_JOB_ID": "4242424", "SLURM_JOB_NAME": "promptlaunch-x"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
                "GROUP_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in task.items():
        monkeypatch.setenv(key, value)
    lightning = SLURMEnvironment()
    assert SLURMEnvironment.detect()
    expected = {"RANK": lightning.global_rank(), "WORLD_SIZE": lightning.world_size(), "LOCAL_RANK": lightning.local_rank(),
                "NODE_RANK": lightning.node_rank(), "MASTER_ADDR": lightning.main_address, "MASTER_PORT": lightning.main_port}
    env = dict(task)
    added = init_distributed_env(env)
    assert {k: added[k] for k in expected} == {k: str(v) for k, v in expected.items()}
    assert added["MASTER_ADDR"] == "gpu07" and added["MASTER_PORT"] == str(15000 + 4242424 % 10000)
    assert added["LOCAL_WORLD_SIZE"] == "2"


def test_existing_values_win():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    init_distributed_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"], env["MASTER_PORT"]) == ("3", "4", "h", "1")
    assert init_distributed_env({}) == {}


# ---- wait mode against stand-ins for squeue/sacct/scancel (the real thing: tests/slurm/test_slurm_real.py) ---

FAKE_SQUEUE = 'cat "$FAKE_DIR/squeue" 2>/dev/null; true\n'
FAKE_SACCT = """\
if [[ $1 == -c ]]; then cat "$FAKE_DIR/jobcomp" 2>/dev/null; exit 0; fi
echo "Slurm accounting storage is disabled" >&2; exit 1
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    for name, body in (("squeue", FAKE_SQUEUE), ("sacct", FAKE_SACCT), ("scancel", 'echo "$1" >> "$FAKE_DIR/cancelled"\n')):
        fake_command(tmp_path / "bin", name, body)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    return tmp_path


def test_wait_cancels_dependants_of_a_failed_job(fake_slurm):
    from cluster.slurm import wait_for_chain

    (fake_slurm / "squeue").write_text("7|FAILED|NonZeroExitCode\n8|PENDING|Dependency\n9|PENDING|Dependency\n")
    seen: list[str] = []
    states = wait_for_chain(["7", "8", "9"], poll_seconds=0, timeout=5, report=seen.append)
    assert [states[j].state for j in "789"] == ["FAILED", "CANCELLED", "CANCELLED"]
    assert states["8"].reason == "never ran: dependency never satisfied, job 7 ended FAILED"
    assert (fake_slurm / "cancelled").read_text().split() == ["8", "9"]
    assert seen[0] == "job 7: FAILED (NonZeroExitCode)"


def test_wait_falls_back_to_the_job_completion_log(fake_slurm):
    from cluster.slurm import wait_for_chain

    (fake_slurm / "jobcomp").write_text("7|COMPLETED\n")  # slurmctld forgot job 7; sacct -c still knows it
    (fake_slurm / "squeue").write_text("8|RUNNING|None\n")
    with pytest.raises(TimeoutError, match="'8'"):
        wait_for_chain(["7", "8"], poll_seconds=0.01, timeout=0.2, report=lambda s: None)
    (fake_slurm / "squeue").write_text("8|COMPLETED|None\n")
    states = wait_for_chain(["7", "8"], poll_seconds=0, report=lambda s: None)
    assert (states["7"].state, states["8"].state) == ("COMPLETED", "COMPLETED")


# ---- the multi-node planning check: what is asked of Slurm against what the stage starts ------------------------

PLAN = [  # (cluster settings, job layout, the one line per mismatch)
    ({"srun_args": ["--ntasks-per-node=4"]}, dict(nodes=2, tasks_per_node=8),
     ["cluster.srun_args: --ntasks-per-node=4 but the prompt_learning job plans 8 processes per node "
      "(prompt_learning.trainer.devices); remove --ntasks-per-node from cluster.srun_args: the launcher sets it from "
      "prompt_learning.trainer.devices"]),
    ({"srun_args": ["--mpi=pmix", "-N", "1", "-n4"]}, dict(nodes=2, tasks_per_node=1),
     ["cluster.srun_args: --nodes=1 but the prompt_learning job plans 2 node(s) (prompt_learning.trainer.num_nodes); "
      "remove --nodes from cluster.srun_args: the launcher sets it from prompt_learning.trainer.num_nodes",
      "cluster.srun_args: --ntasks=4 but the prompt_learning job plans 2 processes in all (prompt_learning.trainer."
      "num_nodes x trainer.devices); remove --ntasks from cluster.srun_args: the launcher sets it from "
      "prompt_learning.trainer.num_nodes x trainer.devices"]),
    ({"gpus_per_node": 4}, dict(nodes=2, tasks_per_node=8, gpus_per_node=8),
     ["cluster.gpus_per_node: 4 GPUs per node asked of Slurm, but prompt_learning starts 8 processes per node "
      "(prompt_learning.trainer.devices), one per GPU, so 4 of them would have no GPU; set cluster.gpus_per_node=8 or "
      "null (null: the stage's trainer.devices)"]),
    ({"gpus_per_node": 8}, dict(nodes=2, tasks_per_node=2, gpus_per_node=2),
     ["cluster.gpus_per_node: 8 GPUs per node asked of Slurm, but prompt_learning starts 2 processes per node "
      "(prompt_learning.trainer.devices), one per GPU, so 6 GPUs per node would sit idle; set cluster.gpus_per_node=2 "
      "or null (null: the stage's trainer.devices)"]),
    ({"gpus_per_task": 2, "gpus_per_node": 8}, dict(nodes=2, tasks_per_node=8, gpus_per_node=8),
     ["cluster.gpus_per_task: 2 GPUs asked of Slurm per task, but each prompt_learning process drives one GPU, so 1 "
      "of each task's would sit idle; set cluster.gpus_per_task=1 or null",
      "cluster.gpus_per_node: 8 but cluster.gpus_per_task=2 x 8 processes per node (prompt_learning.trainer.devices) "
      "= 16, and only gpus_per_task is asked of Slurm; set cluster.gpus_per_node=null"]),
]


@pytest.mark.parametrize("cluster,layout,lines", PLAN)
def test_plan_mismatch_is_one_line_each_before_anything_is_written(cluster, layout, lines):
    executor = SlurmExecutor(cluster)
    with pytest.raises(UserError) as exc:
        executor.check(_spec(**layout))
    assert exc.value.lines == lines


@pytest.mark.parametrize("cluster,layout", [
    ({}, dict(nodes=2, tasks_per_node=8, gpus_per_node=8)),
    ({"gpus_per_node": 8, "srun_args": ["--ntasks-per-node=8", "--nodes", "2", "--mpi=pmix"]},
     dict(nodes=2, tasks_per_node=8, gpus_per_node=8)),
    ({"gpus_per_task": 1, "gpus_per_node": 8}, dict(nodes=4, tasks_per_node=8, gpus_per_node=8)),
    ({"gpus_per_node": 8}, dict(nodes=1, tasks_per_node=1, gpus_per_node=0)),   # a CPU stage: its GPUs are not planned
])
def test_a_consistent_plan_passes(cluster, layout):
    assert SlurmExecutor(cluster).plan_mismatches(_spec(**layout)) == []


def _run_script(tmp_path, executor: SlurmExecutor, restart: int, srun_body: str = "") -> tuple[Any, Path]:
    """Run a rendered prompt_learning script under bash with stand-in srun/scontrol (what Slurm runs on a start or
    a restart); returns the process and the folder the stand-ins log to."""
    import subprocess

    results = tmp_path / "pl"
    results.mkdir(exist_ok=True)
    script = tmp_path / "job.sh"
    script.write_text(executor.render(_spec(results_dir=str(results), launcher_scripts_path=str(tmp_path),
                                            signal="USR1@60")))
    fake_command(tmp_path / "bin", "srun", f'echo srun >> "{tmp_path}/calls"\n{srun_body}')
    fake_command(tmp_path / "bin", "scontrol", f'echo "scontrol $*" >> "{tmp_path}/calls"\n'
                 '[[ $1 == show ]] && echo node1 || true\n')
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", SLURM_JOB_ID="41",
               SLURM_JOB_NODELIST="node[1-2]", SLURM_RESTART_COUNT=str(restart))
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30), results


def _calls(tmp_path) -> list[str]:
    calls = tmp_path / "calls"
    return [c for c in calls.read_text().splitlines() if not c.startswith("scontrol show")] if calls.exists() else []


def test_node_failure_fail_fails_a_restart_the_stage_did_not_ask_for(tmp_path):
    """cluster.node_failure=fail (the default): a restart with no marker (a node failure) exits 1 with one line on
    both logs before srun; the stage's own requeue leaves the marker, so its restart runs and removes it."""
    proc, results = _run_script(tmp_path, SlurmExecutor(), restart=1)
    assert proc.returncode == 1 and _calls(tmp_path) == []
    line = ("promptlaunch: job 41 was restarted by Slurm, not by the stage: a node of its previous run failed (or an "
            "administrator requeued it); cluster.node_failure=fail")
    assert line in proc.stdout and line in proc.stderr and proc.stderr.count("\n") == 1
    # first run: srun leaves the requeue file (the stage saw SIGUSR1) -> marker + scontrol requeue
    proc, _ = _run_script(tmp_path, SlurmExecutor(), restart=0, srun_body='touch "$PROMPTLAUNCH_REQUEUE_FILE"\n')
    assert proc.returncode == 0 and _calls(tmp_path) == ["srun", "scontrol requeue 41"], proc.stderr
    assert (results / ".requeue-asked-41").exists()
    proc, _ = _run_script(tmp_path, SlurmExecutor(), restart=1)   # the restart it asked for runs, once
    assert proc.returncode == 0 and _calls(tmp_path)[-1] == "srun" and not (results / ".requeue-asked-41").exists()
    proc, _ = _run_script(tmp_path, SlurmExecutor(), restart=2)   # a node failure after that fails again
    assert proc.returncode == 1


def test_the_node_failure_line_appends_to_the_logs_of_the_earlier_run(tmp_path):
    """Slurm appends a restart's output to the earlier run's logs (--open-mode=append): the line must not truncate
    them (``tee /dev/stderr`` reopens the .err file and did)."""
    import subprocess

    script = tmp_path / "job.sh"
    script.write_text(SlurmExecutor().render(_spec(results_dir=str(tmp_path), launcher_scripts_path=str(tmp_path))))
    fake_command(tmp_path / "bin", "scontrol", "echo node1\n")
    out, err = tmp_path / "job.out", tmp_path / "job.err"
    out.write_text("first run out\n"), err.write_text("first run err\n")
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", SLURM_JOB_ID="41",
               SLURM_JOB_NODELIST="node1", SLURM_RESTART_COUNT="1")
    with out.open("a") as o, err.open("a") as e:
        assert subprocess.run(["bash", str(script)], env=env, stdout=o, stderr=e, timeout=30).returncode == 1
    assert err.read_text().startswith("first run err\npromptlaunch: job 41 was restarted by Slurm")
    assert out.read_text().startswith("first run out\npromptlaunch: job 41 starts (restart 1) on node1\n"
                                      "promptlaunch: job 41 was restarted by Slurm")


def test_node_failure_requeue_resumes_on_any_restart(tmp_path):
    proc, results = _run_script(tmp_path, SlurmExecutor({"node_failure": "requeue"}), restart=1)
    assert proc.returncode == 0 and _calls(tmp_path) == ["srun"], proc.stderr
    assert "promptlaunch: job 41 starts (restart 1) on node[1-2]" in proc.stdout
    assert "asked" not in SlurmExecutor({"node_failure": "requeue"}).render(_spec(signal="USR1@60"))


def test_node_failure_takes_fail_or_requeue():
    with pytest.raises(UserError, match=r"^cluster.node_failure: 'retry' is not one of fail, requeue; "):
        SlurmExecutor({"node_failure": "retry"})


@pytest.mark.parametrize("mode, after", [
    ("requeue", "it resumes from its checkpoint when it starts again, its dependants wait"),
    ("fail", "after its own preemption requeue it resumes from its checkpoint; after a node failure it fails when it "
             "starts (cluster.node_failure=fail)"),
])
def test_wait_says_when_slurm_requeues_a_running_job(fake_slurm, mode, after):
    """RUNNING -> PENDING is a requeue (node failure or preemption): said once per requeue; the dependant waits."""
    from cluster.slurm import wait_for_chain

    fake_command(fake_slurm / "bin", "squeue", 'n=$(cat "$FAKE_DIR/n" 2>/dev/null || echo 0)\n'
                 'cat "$FAKE_DIR/squeue.$n"\necho $((n < 3 ? n + 1 : n)) > "$FAKE_DIR/n"\n')
    for n, text in enumerate(["7|RUNNING|None\n8|PENDING|Dependency\n", "7|PENDING|BeginTime\n8|PENDING|Dependency\n",
                              "7|RUNNING|None\n8|PENDING|Dependency\n", "7|COMPLETED|None\n8|COMPLETED|None\n"]):
        (fake_slurm / f"squeue.{n}").write_text(text)
    seen: list[str] = []
    states = wait_for_chain(["7", "8"], poll_seconds=0, timeout=5, report=seen.append, node_failure=mode)
    assert [states[j].state for j in "78"] == ["COMPLETED", "COMPLETED"]
    assert seen == [f"job 7: requeued by Slurm (a node failed or the job was preempted), pending again (BeginTime); "
                    f"{after}",
                    "job 7: COMPLETED", "job 8: COMPLETED"]
    assert not (fake_slurm / "cancelled").exists()
