"""Slurm executor (``cluster_type=slurm``; NeMo's ``bcm``): one readable sbatch script per stage, submitted as an
``afterok`` chain. Its settings are ``SlurmConfig`` (``conf/cluster/slurm.yaml``).

The script is a pure function of the JobSpec and the settings: ``#SBATCH`` lines (sorted), then
``srun`` starting one task per process. Rank, world size and local rank come from Slurm's own
variables (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID), which Lightning's SLURMEnvironment and
``stages.common.entry.init_distributed_env`` both read; the script adds MASTER_ADDR/MASTER_PORT with the
values Lightning would pick, so plain torch.distributed agrees with Lightning.

Dependencies are added at submit time (``sbatch --dependency=afterok:<previous>[,singleton]``), so
the scripts stay independent of job ids. Wait mode polls ``squeue`` until the chain ends.

Every job is ``--requeue``-able with ``--open-mode=append`` (a requeued run appends to the same log). A stage
that checkpoints (prompt_learning) also gets ``--signal=USR1@<secs>`` from ``cluster.signal``: Slurm sends
SIGUSR1 to every srun task that many seconds before the time limit -- deliberately not ``B:USR1``, which
would signal only the batch shell and need a trap that forwards it while srun runs in the background. The
stage saves a checkpoint at its next step boundary, creates ``$PROMPTLAUNCH_REQUEUE_FILE`` and exits; the
script, seeing the file, runs ``scontrol requeue`` on the host (so it works inside containers too), and the
requeued job resumes from the checkpoint. ``scancel --signal=USR1 <job id>`` triggers the same path by hand.

A node failure: ``--requeue`` (needed by that self-requeue: Slurm refuses ``scontrol requeue`` of a ``--no-requeue``
job) also makes Slurm requeue a job whose node failed. ``cluster.node_failure`` decides what then happens: ``fail``
(the default) -- the script, restarted without having asked for it (no ``.requeue-asked-<job id>`` marker, which
only the self-requeue leaves), fails at once with one line, and Slurm cancels the dependants
(``--kill-on-invalid-dep=yes`` on every job); rerunning the same command resumes from the checkpoint --
or ``requeue``: the restarted job resumes on the nodes left and its dependants keep waiting.
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from omegaconf import OmegaConf

from stages.common import io
from stages.common.entry import SLURM_PORT_BASE, SLURM_PORT_SPAN
from stages.common.errors import UserError
from stages.common.typed import typed
from cluster.jobspec import JobSpec
from cluster.render import check_env_names, comment, env_lines, env_names, header, join, q

_SAFE_DIRECTIVE = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_JOB_ID = re.compile(r"^(\d+)(?:;\S+)?$")

NODE_FAILURE = ("fail", "requeue")   # cluster.node_failure

TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
                      "PREEMPTED", "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT"})


NODE_FAILURE_LINE = ("promptlaunch: job $SLURM_JOB_ID was restarted by Slurm, not by the stage: a node of its "
                     "previous run failed (or an administrator requeued it); cluster.node_failure=fail, so it fails "
                     "now and Slurm cancels its dependants. Rerun the same command once the nodes are back: "
                     "prompt_learning resumes from its last checkpoint (cluster.node_failure=requeue restarts on the "
                     "nodes left instead)")


def directive_value(value: str) -> str:
    """Quote a value for an ``#SBATCH`` line the way sbatch parses it (double quotes, backslash escapes).

    An ``#SBATCH`` line is a bash comment, so a newline in a value would end the comment and turn the
    rest into a command: control characters are refused outright (``check`` reports them first).
    """
    if _CONTROL.search(value):
        raise ValueError(f"control character in #SBATCH value {value!r}")
    if _SAFE_DIRECTIVE.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def slurm_log(results_dir: str, name: str, suffix: str, job_id: str = "%j") -> str:
    """``<results_dir>/log-<name>_<job id>.<suffix>``; as a pattern, a literal ``%`` is written ``%%``."""
    folder = results_dir.replace("%", "%%") if job_id == "%j" else results_dir
    return f"{folder}/log-{name}_{job_id}.{suffix}"


@dataclass
class SlurmConfig:
    """The Slurm executor's settings: the ``cluster`` key (``conf/cluster/slurm.yaml``, which documents each)."""

    partition: Optional[str] = None
    account: Optional[str] = None
    exclusive: bool = True
    gpus_per_task: Optional[int] = None
    gpus_per_node: Optional[int] = None
    mem: Optional[str] = "0"
    overcommit: bool = False
    job_name_prefix: str = "promptlaunch-"
    srun_args: list[str] = field(default_factory=list)
    signal: Optional[str] = None
    wait: bool = False
    poll_seconds: float = 10.0
    node_failure: str = "fail"

    @classmethod
    def from_cfg(cls, cluster_cfg: Any) -> "SlurmConfig":
        """Typed settings from the ``cluster`` node (or a plain dict, or None for the defaults)."""
        cfg = cluster_cfg if cluster_cfg is not None else {}
        if not OmegaConf.is_config(cfg):
            cfg = OmegaConf.create(dict(cfg))
        settings = typed(cls, cfg, "cluster")
        if settings.node_failure not in NODE_FAILURE:
            raise UserError(f"cluster.node_failure: '{settings.node_failure}' is not one of {', '.join(NODE_FAILURE)}; "
                            f"fail: a job whose node failed fails and its dependants are cancelled, requeue: it "
                            f"restarts on the nodes left")
        return settings


class SlurmExecutor:
    """Render sbatch scripts, submit them as a dependency chain, optionally wait for the chain."""

    name = "slurm"

    def __init__(self, cluster_cfg: Any = None) -> None:
        self.cfg = SlurmConfig.from_cfg(cluster_cfg)
        self.on_submit: Callable[[list[str]], None] | None = None   # told the chain's job ids after each sbatch

    # ---- pure part -------------------------------------------------------------------------
    def check(self, job: JobSpec) -> None:
        """Refuse what no sbatch script can express, before anything is written."""
        fields = {
            "base_results_dir / run.results_dir": job.results_dir,
            "cluster.job_name_prefix": self.cfg.job_name_prefix,
            "cluster.partition": self.cfg.partition or "",
            "cluster.account": self.cfg.account or "",
            "cluster.mem": str(self.cfg.mem or ""),
            "cluster.signal": job.signal or "",
            "run.time_limit": job.time_limit,
        }
        for key, value in fields.items():
            if _CONTROL.search(value):
                raise UserError(f"{key}: {value!r} contains a newline or control character, which an #SBATCH line "
                                f"cannot hold; remove it")
        if "\\" in job.results_dir:
            raise UserError(f"base_results_dir / run.results_dir: '{job.results_dir}' contains a backslash, which turns "
                            f"off Slurm's %j in --output; choose a folder without '\\'")
        bad = check_env_names(env_names(job))
        if bad:
            raise UserError(f"env_vars.{bad[0]}: not a valid environment variable name; use letters, digits and _")
        if job.container:
            for m in self._mounts(job):
                if "," in m:
                    raise UserError(f"container_mounts: '{m}' contains ',', which pyxis reads as a mount separator; "
                                    f"rename the folder")
        mismatches = self.plan_mismatches(job)
        if mismatches:
            raise UserError(*mismatches)

    def plan_mismatches(self, job: JobSpec) -> list[str]:
        """The multi-node planning check of what this executor asks of Slurm, one line per mismatch: processes per
        node, nodes and tasks that ``cluster.srun_args`` would re-set against the stage's plan (``--ntasks-per-node``
        = processes per node = the stage's trainer.devices), and the GPUs per node asked of Slurm against one GPU
        per process of a GPU stage."""
        c, lines = self.cfg, []
        planned = {"ntasks-per-node": (job.tasks_per_node, "processes per node", "trainer.devices"),
                   "nodes": (job.nodes, "node(s)", "trainer.num_nodes"),
                   "ntasks": (job.world_size, "processes in all", "trainer.num_nodes x trainer.devices")}
        for name, value in srun_layout_flags(c.srun_args).items():
            want, what, key = planned[name]
            if value != str(want):
                lines.append(f"cluster.srun_args: --{name}={value} but the {job.stage} job plans {want} {what} "
                             f"({job.stage}.{key}); remove --{name} from cluster.srun_args: the launcher sets it "
                             f"from {job.stage}.{key}")
        if job.gpus_per_node <= 0:   # a CPU stage: no GPU plan to compare with
            return lines
        n = job.tasks_per_node
        if c.gpus_per_task and c.gpus_per_task != 1:
            lines.append(f"cluster.gpus_per_task: {c.gpus_per_task} GPUs asked of Slurm per task, but each {job.stage} "
                         f"process drives one GPU, so {c.gpus_per_task - 1} of each task's would sit idle; set "
                         f"cluster.gpus_per_task=1 or null")
        if c.gpus_per_node and c.gpus_per_task and c.gpus_per_node != c.gpus_per_task * n:
            lines.append(f"cluster.gpus_per_node: {c.gpus_per_node} but cluster.gpus_per_task={c.gpus_per_task} x {n} "
                         f"processes per node ({job.stage}.trainer.devices) = {c.gpus_per_task * n}, and only "
                         f"gpus_per_task is asked of Slurm; set cluster.gpus_per_node=null")
        elif c.gpus_per_node and not c.gpus_per_task and c.gpus_per_node != n:
            effect = (f"{n - c.gpus_per_node} of them would have no GPU" if c.gpus_per_node < n
                      else f"{c.gpus_per_node - n} GPUs per node would sit idle")
            lines.append(f"cluster.gpus_per_node: {c.gpus_per_node} GPUs per node asked of Slurm, but {job.stage} starts "
                         f"{n} processes per node ({job.stage}.trainer.devices), one per GPU, so {effect}; set "
                         f"cluster.gpus_per_node={n} or null (null: the stage's trainer.devices)")
        return lines

    def directives(self, job: JobSpec) -> dict[str, str | None]:
        """``#SBATCH`` options (name -> value, None for a bare flag); dependencies are added at submit time."""
        c = self.cfg
        d: dict[str, str | None] = {
            "job-name": c.job_name_prefix + job.name,
            "nodes": str(job.nodes),
            "ntasks-per-node": str(job.tasks_per_node),
            "time": job.time_limit,
            "output": slurm_log(job.results_dir, job.name, "out"),
            "error": slurm_log(job.results_dir, job.name, "err"),
            "open-mode": "append",   # a requeued job keeps the log of its earlier runs
            "requeue": None,         # the stage's own preemption requeue needs it; a node failure: cluster.node_failure
            "kill-on-invalid-dep": "yes",   # a failed predecessor cancels this job instead of leaving it pending
        }
        if c.partition:
            d["partition"] = c.partition
        if c.account:
            d["account"] = c.account
        if c.gpus_per_task:
            d["gpus-per-task"] = str(c.gpus_per_task)
        elif c.gpus_per_node or job.gpus_per_node > 0:
            d["gpus-per-node"] = str(c.gpus_per_node or job.gpus_per_node)
        if c.mem is not None:
            d["mem"] = str(c.mem)
        if c.exclusive:
            d["exclusive"] = None
        if c.overcommit:
            d["overcommit"] = None
        if job.signal:
            d["signal"] = job.signal
        return d

    def _mounts(self, job: JobSpec) -> list[str]:
        """Container mounts: the data and results folders at the same path, then the user's own."""
        base = (job.base_results_dir or "").rstrip("/")
        under_base = bool(base) and job.results_dir.startswith(base + "/")
        folders = [job.data_dir, job.base_results_dir, None if under_base else job.results_dir]
        mounts = [f"{p}:{p}" for p in dict.fromkeys(f for f in folders if f)]
        return mounts + [m for m in job.container_mounts if m not in mounts]

    def srun_command(self, job: JobSpec) -> list[str]:
        """The srun line: one task per process, the container flags only when a container is set."""
        cmd = ["srun", "--kill-on-bad-exit=1", f"--nodes={job.nodes}", f"--ntasks-per-node={job.tasks_per_node}",
               *self.cfg.srun_args]
        if job.container:
            cmd += [f"--container-image={job.container}", f"--container-mounts={','.join(self._mounts(job))}",
                    f"--container-workdir={job.launcher_scripts_path}", "--no-container-mount-home"]
        return cmd + job.program

    def render(self, job: JobSpec) -> str:
        script = job.script_path(self.name)
        lines = header(job, self.name, f"sbatch {q(script)}")
        deps = ["afterok:<previous stage's job id>", *([job.dependency] if job.dependency else [])]
        lines.append(comment(f"The launcher adds --dependency={','.join(deps)} when it submits the chain."))
        for key, value in sorted(self.directives(job).items()):
            lines.append(f"#SBATCH --{key}" if value is None else f"#SBATCH --{key}={directive_value(value)}")
        lines.append("set -euo pipefail")
        if not job.container:
            lines.append(f"cd {q(job.launcher_scripts_path)}")
        lines += env_lines(job)
        lines += [
            "# rank, world size and local rank come from srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID);",
            "# the rendezvous address and port are the ones Lightning's SLURMEnvironment derives.",
            'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
            f"export MASTER_ADDR MASTER_PORT=$(({SLURM_PORT_BASE} + SLURM_JOB_ID % {SLURM_PORT_SPAN}))",
            'echo "promptlaunch: job $SLURM_JOB_ID starts (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST"',
        ]
        fail = self.cfg.node_failure == "fail"
        if fail:
            lines += [
                comment("cluster.node_failure=fail: Slurm restarts a --requeue job whose node failed; a restart this "
                        "script did not ask for (no marker) fails here, and Slurm cancels the dependants."),
                f"asked={q(job.results_dir + '/.requeue-asked-')}\"$SLURM_JOB_ID\"",
                'if (( ${SLURM_RESTART_COUNT:-0} > 0 )) && ! rm "$asked" 2>/dev/null; then',
                f'    why="{NODE_FAILURE_LINE}"',   # a constant: nothing in it but $SLURM_JOB_ID expands
                '    echo "$why"; echo "$why" >&2',   # both logs (tee /dev/stderr would reopen, truncating, the .err log)
                "    exit 1",
                "fi",
            ]
        if not job.signal:
            return "\n".join([*lines, join(self.srun_command(job)), ""])
        name, _, lead = job.signal.partition("@")
        name = name[3:] if name.upper().startswith("SIG") else name
        lines += [
            comment(f"Preemption: Slurm sends SIG{name} to every srun task {lead} s before the time limit (also: "
                    f"scancel --signal={name} <job id>). The stage saves a checkpoint at its next step boundary, "
                    f"creates $PROMPTLAUNCH_REQUEUE_FILE and exits; this script then requeues the job, which "
                    f"resumes from the checkpoint (exp_manager.resume_if_exists)."),
            f"export PROMPTLAUNCH_PREEMPT_SIGNAL={q(name)}",
            f"export PROMPTLAUNCH_REQUEUE_FILE={q(job.results_dir + '/.requeue-')}\"$SLURM_JOB_ID\"",
            'rm -f "$PROMPTLAUNCH_REQUEUE_FILE"',
            "rc=0",
            join(self.srun_command(job)) + " || rc=$?",
            'if [[ -e $PROMPTLAUNCH_REQUEUE_FILE ]]; then',
            '    rm -f "$PROMPTLAUNCH_REQUEUE_FILE"',
            '    echo "promptlaunch: requeueing job $SLURM_JOB_ID; it resumes from its checkpoint"',
            *(['    touch "$asked"'] if fail else []),
            '    scontrol requeue "$SLURM_JOB_ID"',
            "    exit 0",
            "fi",
            'exit "$rc"',
            "",
        ]
        return "\n".join(lines)

    # ---- side effects ----------------------------------------------------------------------
    def launch(self, jobs: Sequence[JobSpec]) -> int:
        submitted: list[tuple[JobSpec, str]] = []
        for job in jobs:
            parts = [f"afterok:{submitted[-1][1]}"] if submitted else []
            if job.dependency:
                parts.append(job.dependency)
            try:
                job_id = submit(job.script_path(self.name), ",".join(parts) or None)
            except UserError as exc:
                done = ", ".join(f"{j.stage}={i}" for j, i in submitted)
                raise UserError(f"{job.stage}: {exc}" + (f"; already submitted: {done} (scancel them if unwanted)" if done else ""))
            io.write_text(Path(job.results_dir) / "job_id", job_id + "\n")
            submitted.append((job, job_id))
            if self.on_submit is not None:
                self.on_submit([i for _, i in submitted])
        _print_table(["stage", "job id", "script", "log"],
                     [[j.stage, i, j.script_path(self.name), slurm_log(j.results_dir, j.name, "out", i)] for j, i in submitted])
        if not self.cfg.wait:
            print(f"submitted {len(submitted)} job(s); follow with: squeue -j {','.join(i for _, i in submitted)}", flush=True)
            return 0
        ids = [i for _, i in submitted]
        try:
            states = wait_for_chain(ids, poll_seconds=self.cfg.poll_seconds, node_failure=self.cfg.node_failure)
        except KeyboardInterrupt:
            print(f"\nstopped waiting; the jobs keep running: squeue -j {','.join(ids)}", file=sys.stderr, flush=True)
            return 130
        rows = [[j.stage, i, states[i].describe(), slurm_log(j.results_dir, j.name, "out", i)] for j, i in submitted]
        _print_table(["stage", "job id", "final state", "log"], rows)
        failed = [j.stage for j, i in submitted if states[i].state != "COMPLETED"]
        if failed:
            print(f"error: not completed: {', '.join(failed)}", file=sys.stderr, flush=True)
            return 1
        print(f"done: {len(submitted)} job(s) completed", flush=True)
        return 0


_SRUN_LAYOUT = {"--ntasks-per-node": "ntasks-per-node", "--nodes": "nodes", "-N": "nodes", "--ntasks": "ntasks", "-n": "ntasks"}


def srun_layout_flags(args: Sequence[str]) -> dict[str, str]:
    """The layout options in extra srun arguments (``--ntasks-per-node=4``, ``--nodes 2``, ``-N2``, ``-n 8``): name
    (``ntasks-per-node``, ``nodes``, ``ntasks``) -> value; srun takes the last one given, as here."""
    found: dict[str, str] = {}
    items = [str(a) for a in args]
    i = 0
    while i < len(items):
        arg = items[i]
        for flag, name in _SRUN_LAYOUT.items():
            if arg == flag and i + 1 < len(items):
                found[name] = items[i + 1]
                i += 1
                break
            if flag.startswith("--") and arg.startswith(flag + "="):
                found[name] = arg[len(flag) + 1:]
                break
            if not flag.startswith("--") and arg.startswith(flag) and len(arg) > 2:
                found[name] = arg[2:].lstrip("=")
                break
        i += 1
    return found


def submit(script: str, dependency: str | None = None) -> str:
    """``sbatch --parsable`` one script; return its job id or raise a one-line UserError."""
    cmd = ["sbatch", "--parsable", *([f"--dependency={dependency}"] if dependency else []), script]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise UserError("sbatch: not found on PATH; run on a Slurm login node or use cluster_type=local") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"sbatch {script}: no answer from Slurm in 120 s; check `sinfo` and retry") from None
    if proc.returncode != 0:
        why = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise UserError(f"sbatch {script} failed (exit {proc.returncode}): {why}")
    lines = [ln.strip() for ln in proc.stdout.splitlines() if ln.strip()]
    match = _JOB_ID.match(lines[-1]) if lines else None
    if not match:
        raise UserError(f"sbatch {script}: cannot read a job id from its output {proc.stdout.strip()!r}")
    return match.group(1)


@dataclass(frozen=True)
class JobState:
    """A job's Slurm state (e.g. PENDING, COMPLETED) and Slurm's reason, or ours for a job we cancelled."""

    job_id: str
    state: str
    reason: str = ""

    def describe(self) -> str:
        return f"{self.state} ({self.reason})" if self.reason and self.reason != "None" else self.state


def query_states(job_ids: Sequence[str]) -> dict[str, JobState]:
    """Current states from ``squeue --states=all`` (finished jobs stay there for MinJobAge), then ``sacct``
    for any job slurmctld has already forgotten. Jobs neither knows are left out."""
    out: dict[str, JobState] = {}
    proc = subprocess.run(["squeue", "--noheader", "--states=all", f"--jobs={','.join(job_ids)}", "--format=%i|%T|%r"],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
        raise RuntimeError(f"squeue failed (exit {proc.returncode}): {proc.stderr.strip()}")
    for line in proc.stdout.splitlines():
        jid, _, rest = line.strip().partition("|")
        state, _, reason = rest.partition("|")
        if jid in job_ids:
            out[jid] = JobState(jid, state, reason)
    missing = [j for j in job_ids if j not in out]
    for extra in ([], ["-c"]):  # accounting database first, then the job-completion log (no slurmdbd)
        if not missing:
            break
        acct = subprocess.run(["sacct", *extra, "-X", "--noheader", "--parsable2", "--format=JobID,State",
                               f"--jobs={','.join(missing)}"], capture_output=True, text=True, timeout=60)
        for line in acct.stdout.splitlines() if acct.returncode == 0 else []:
            jid, _, state = line.strip().partition("|")
            if jid in missing and state:
                out[jid] = JobState(jid, state.split()[0])
        missing = [j for j in missing if j not in out]
    return out


def wait_for_chain(job_ids: Sequence[str], poll_seconds: float = 10.0, timeout: float | None = None,
                   report: Callable[[str], None] = lambda s: print(s, flush=True),
                   node_failure: str = "fail") -> dict[str, JobState]:
    """Poll until every job of an ``afterok`` chain (in submission order) has ended; return the final states.

    A job that waits on a failed predecessor would stay PENDING forever, so as soon as one job ends
    other than COMPLETED (or Slurm reports DependencyNeverSatisfied) the later jobs are cancelled and
    reported as never run.
    """
    final: dict[str, JobState] = {}
    unseen: dict[str, int] = {}
    started: set[str] = set()   # seen RUNNING: PENDING again means Slurm requeued it (node failure, preemption)
    deadline = None if timeout is None else time.monotonic() + timeout
    polled = False
    while len(final) < len(job_ids):
        if polled:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"jobs still running after {timeout} s: {[j for j in job_ids if j not in final]}")
            time.sleep(poll_seconds)
        polled = True
        live = [j for j in job_ids if j not in final]
        try:
            states = query_states(live)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:  # slurmctld busy or restarting: ask again
            report(f"warning: {exc}; retrying")
            continue
        broken = next((final[j] for j in job_ids if j in final and final[j].state != "COMPLETED"), None)
        for jid in live:
            st = states.get(jid)
            if st is None:
                unseen[jid] = unseen.get(jid, 0) + 1
                if unseen[jid] < 3:
                    continue
                final[jid] = JobState(jid, "UNKNOWN", "in neither squeue nor sacct")
            elif st.state in TERMINAL:
                final[jid] = st
            elif st.state == "PENDING" and (broken or st.reason == "DependencyNeverSatisfied"):
                subprocess.run(["scancel", jid], capture_output=True, timeout=60)
                why = f"job {broken.job_id} ended {broken.state}" if broken else st.reason
                final[jid] = JobState(jid, "CANCELLED", f"never ran: dependency never satisfied, {why}")
            else:
                if st.state == "RUNNING":
                    started.add(jid)
                elif st.state == "PENDING" and jid in started:
                    started.discard(jid)
                    after = ("it resumes from its checkpoint when it starts again, its dependants wait"
                             if node_failure == "requeue" else "after its own preemption requeue it resumes from its "
                             "checkpoint; after a node failure it fails when it starts (cluster.node_failure=fail)")
                    report(f"job {jid}: requeued by Slurm (a node failed or the job was preempted), pending again "
                           f"({st.reason}); {after}")
                continue
            report(f"job {jid}: {final[jid].describe()}")
            if broken is None and final[jid].state != "COMPLETED":
                broken = final[jid]
    return final


def _print_table(head: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip(), flush=True)
