"""NVIDIA Base Command Platform executor (``cluster_type=bcp``): main.py runs inside the BCP job and starts each stage
with ``bcprun`` on the job's nodes, one stage after another.

Each stage script calls ``bcprun --nnodes N --npernode M`` with that stage's own layout. bcprun starts
the processes on every node, possibly through ssh/mpirun, so the exported variables are handed over
explicitly with ``--env NAME=value`` (values expanded at job time: a secret read from its file never
appears in the script). Inside the processes, ``stages.common.entry.init_distributed_env`` turns the NGC
variables bcprun sets (NGC_ARRAY_INDEX, NGC_ARRAY_SIZE, NGC_MASTER_ADDR, LOCAL_RANK or Open MPI's
OMPI_COMM_WORLD_*) into torch's RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT.
"""
from __future__ import annotations

import os
import shutil
from typing import Sequence

from cluster.base import run_in_order, stream
from cluster.jobspec import JobSpec
from cluster.render import check_env_names, comment, env_lines, env_names, header, join, q
from stages.common.errors import UserError


class BCPExecutor:
    """Render one bcprun script per stage; run them in order inside the BCP job, stopping at the first failure."""

    name = "bcp"

    def check(self, job: JobSpec) -> None:
        bad = check_env_names(env_names(job))
        if bad:
            raise UserError(f"env_vars.{bad[0]}: not a valid environment variable name; use letters, digits and _")

    def render(self, job: JobSpec) -> str:
        names = env_names(job)
        if check_env_names(names):  # each name lands unquoted in "${NAME}"
            raise ValueError(f"invalid environment variable names: {check_env_names(names)}")
        args = [join(["bcprun", "--nnodes", job.nodes, "--npernode", job.tasks_per_node, "-no_redirect",
                      "--workdir", job.launcher_scripts_path])]
        args += [f'--env "{n}=${{{n}}}"' for n in names]  # the value exported above, expanded at job time
        args += [f"--env LOCAL_WORLD_SIZE={job.tasks_per_node}", f"--cmd {q(join(job.program))}"]
        lines = header(job, self.name, f"bash {q(job.script_path(self.name))} (inside the BCP job)")
        if job.container:
            lines.append(comment(f"container {job.container} is not used here: on BCP every process runs in the "
                                 f"image the job was started with (ngc batch run --image)"))
        lines += ["set -euo pipefail", f"cd {q(job.launcher_scripts_path)}"]
        lines += env_lines(job)
        lines += [" \\\n  ".join(args) + f" \\\n  2>&1 | tee -a {q(job.log_path)}", ""]
        return "\n".join(lines)

    def launch(self, jobs: Sequence[JobSpec]) -> int:
        if shutil.which("bcprun") is None:
            raise UserError("bcprun: not found; cluster_type=bcp runs inside a Base Command Platform job "
                            "(ngc batch run ... --commandline 'python3 main.py ... cluster_type=bcp'); "
                            "elsewhere use cluster_type=local or slurm")
        size = os.environ.get("NGC_ARRAY_SIZE")
        for job in jobs:
            if size and size.isdigit() and job.nodes > int(size):
                raise UserError(f"{job.stage}: needs {job.nodes} nodes but this BCP job has NGC_ARRAY_SIZE={size}; "
                                f"lower {job.stage}.trainer.num_nodes or submit the BCP job with more replicas")
        return run_in_order(jobs, self.name, lambda job, stop: stream(["bash", job.script_path(self.name)], None, stop=stop))
