"""Local executor (``cluster_type=local``; NeMo's ``interactive``): runs the stages one after another on this machine.

Multi-process stages start through ``torch.distributed.run`` (torchrun) with the same interpreter.
Output goes to the terminal and to ``log-<name>.out`` in the stage's results folder.
"""
from __future__ import annotations

from typing import Sequence

from stages.common.errors import UserError
from cluster.base import StopSignals, run_in_order, stream
from cluster.jobspec import JobSpec
from cluster.render import env_lines, header, join, q


class LocalExecutor:
    """Run each stage's script with bash, in order, stopping at the first failure."""

    name = "local"

    def check(self, job: JobSpec) -> None:
        if job.nodes > 1:
            raise UserError(
                f"{job.stage}: {job.nodes} nodes requested but cluster_type=local runs on this machine only; "
                f"set {job.stage}.trainer.num_nodes=1 or use cluster_type=slurm"
            )

    def render(self, job: JobSpec) -> str:
        script = job.script_path(self.name)
        if job.tasks_per_node > 1:
            cmd = [job.python, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                   f"--nproc_per_node={job.tasks_per_node}", job.entry, "--config", job.config_path]
        else:
            cmd = job.program
        lines = header(job, self.name, f"bash {q(script)}")
        lines += ["set -euo pipefail", f"cd {q(job.launcher_scripts_path)}"]
        lines += env_lines(job)
        lines += ["exec " + join(cmd), ""]   # the stage replaces bash: a stop signal reaches it, its exit code is the script's
        return "\n".join(lines)

    def launch(self, jobs: Sequence[JobSpec]) -> int:
        def run_one(job: JobSpec, stop: StopSignals) -> tuple[int, str | None]:
            with open(job.log_path, "ab") as log:
                return stream(["bash", job.script_path(self.name)], log, stop=stop)

        return run_in_order(jobs, self.name, run_one)
