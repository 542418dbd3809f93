"""The job spec: everything an executor needs to run one stage, and nothing about which cluster.

Executors turn a JobSpec into a script (a pure function of the spec) and run or submit it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class JobSpec:
    """One stage of the pipeline, planned.

    ``argv`` is the stage program (``python3 -u stages/<stage>/run.py --config <name>_hydra.yaml``);
    the executor decides how to start ``nodes * tasks_per_node`` copies of it.
    """

    stage: str
    name: str
    results_dir: str
    launcher_scripts_path: str
    python: str
    entry: str
    config_path: str
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    time_limit: str = "01:00:00"
    dependency: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    secret_files: tuple[tuple[str, str], ...] = ()  # (ENV_VAR, file) read inside the job, never rendered as values
    container: str | None = None
    container_mounts: tuple[str, ...] = ()
    signal: str | None = None  # the warning signal before a time limit that the stage handles, e.g. "USR1@120"
    data_dir: str | None = None  # mounted into the container (Slurm/pyxis) next to the results
    base_results_dir: str | None = None  # likewise; None: only this stage's results_dir is mounted

    @property
    def world_size(self) -> int:
        """Total number of processes the stage runs as."""
        return self.nodes * self.tasks_per_node

    @property
    def program(self) -> list[str]:
        """The stage program one process runs, without any launcher wrapper."""
        return [self.python, "-u", self.entry, "--config", self.config_path]

    def script_path(self, executor: str) -> str:
        """Where the rendered script lives: next to the config, named after the executor."""
        return str(Path(self.results_dir) / f"{self.name}_{executor}.sh")

    @property
    def log_path(self) -> str:
        """Combined stdout/stderr of a local or BCP run (Slurm adds its job id)."""
        return str(Path(self.results_dir) / f"log-{self.name}.out")
