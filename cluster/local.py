"""Local ("interactive") executor: runs the stages one after another on this machine.

Multi-process stages start through ``torch.distributed.run`` (torchrun) with the same interpreter.
Output goes to the terminal and to ``log-<name>.out`` in the stage's results folder.
"""
from __future__ import annotations

import sys
from typing import Sequence

from stages.common.errors import UserError
from launcher.jobspec import JobSpec
from cluster.base import stream
from launcher.render import env_lines, header, join, q


class LocalExecutor:
    """Run each stage's script with bash, in order, stopping at the first failure."""

    name = "interactive"

    def check(self, job: JobSpec) -> None:
        if job.nodes > 1:
            raise UserError(
                f"{job.stage}: {job.nodes} nodes requested but cluster_type=interactive runs on this machine only; "
                f"set {job.stage}.trainer.num_nodes=1 or use cluster_type=bcm"
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
        lines += [join(cmd), ""]
        return "\n".join(lines)

    def launch(self, jobs: Sequence[JobSpec]) -> int:
        for i, job in enumerate(jobs, 1):
            print(f"[{i}/{len(jobs)}] {job.stage}: {job.script_path(self.name)} (log: {job.log_path})", flush=True)
            with open(job.log_path, "ab") as log:
                rc = stream(["bash", job.script_path(self.name)], log)
            if rc != 0:
                left = ", ".join(j.stage for j in jobs[i:]) or "none"
                print(
                    f"error: stage '{job.stage}' failed with exit code {rc}; see {job.log_path}. Not run: {left}",
                    file=sys.stderr,
                    flush=True,
                )
                return rc
        print(f"done: {len(jobs)} stage(s) finished: {', '.join(j.stage for j in jobs)}", flush=True)
        return 0
