"""Planning: a validated config becomes one JobSpec per stage, plus the stage's resolved YAML.

Pure: reads only the config and the stages' own checks (resources, whether a stage takes the preemption
signal), so the same config always plans the same jobs. The YAML's file name carries a digest of its text
(``<name>_hydra-<digest>.yaml``), so a job reads the snapshot of its own launch: another launch with other settings
writes another file, and one with the same settings the same bytes.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from cluster.jobspec import JobSpec
from stages.common.checks import StageCheck


@dataclass(frozen=True)
class PlannedJob:
    """A job spec and the text of the ``<name>_hydra.yaml`` it runs with."""

    spec: JobSpec
    config_yaml: str


def plan(cfg: DictConfig, checks: dict[str, StageCheck]) -> list[PlannedJob]:
    """One PlannedJob per checked stage, in pipeline order (``checks`` keeps the order of ``stages``)."""
    root = os.path.abspath(str(cfg.launcher_scripts_path))
    env = tuple(sorted((str(k), str(v)) for k, v in (cfg.get("env_vars") or {}).items() if v is not None))
    secrets = (("WANDB_API_KEY", str(cfg.wandb_api_key_file)),) if cfg.get("wandb_api_key_file") else ()
    signal = (cfg.get("cluster") or {}).get("signal")
    jobs = []
    for stage, checked in checks.items():
        sc = cfg[stage]
        resources = checked.resources
        results_dir = os.path.abspath(str(sc.run.results_dir))
        name = str(sc.run.name)
        text = OmegaConf.to_yaml(sc, resolve=True)
        spec = JobSpec(
            stage=stage,
            name=name,
            results_dir=results_dir,
            launcher_scripts_path=root,
            data_dir=os.path.abspath(str(cfg.data_dir)),
            base_results_dir=os.path.abspath(str(cfg.base_results_dir)),
            python=str(cfg.python),
            entry=os.path.join(root, "stages", stage, "run.py"),
            config_path=os.path.join(results_dir, config_name(name, text)),
            nodes=resources.nodes,
            tasks_per_node=resources.tasks_per_node,
            gpus_per_node=resources.gpus_per_node,
            time_limit=str(sc.run.time_limit),
            dependency=sc.run.get("dependency"),
            env=env,
            secret_files=secrets,
            container=cfg.get("container"),
            container_mounts=tuple(str(m) for m in (cfg.get("container_mounts") or [])),
            # only a stage that checkpoints acts on the preemption signal (its default action would kill the others)
            signal=str(signal) if signal and checked.takes_signal else None,
        )
        jobs.append(PlannedJob(spec, text))
    return jobs


def config_name(name: str, text: str) -> str:
    """``<name>_hydra-<first 10 hex digits of the text's SHA-256>.yaml``."""
    return f"{name}_hydra-{hashlib.sha256(text.encode()).hexdigest()[:10]}.yaml"
