"""Launcher helpers: compose configs in-process and run main.py as a user would; the pre-launch bad inputs."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from tests.support.paths import ROOT

if not OmegaConf.has_resolver("launcher_root"):
    OmegaConf.register_new_resolver("launcher_root", lambda: str(ROOT))


def compose_cfg(overrides: list[str]) -> DictConfig:
    """Compose conf/config.yaml with overrides, as main.py does."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(config_name="config", overrides=overrides)


def undigest(text: str) -> str:
    """``<name>_hydra-<digest>.yaml`` with the digest spelled ``<digest>``: it hashes the config, whose paths differ
    from run to run (tests/launcher/test_sweep.py checks the digest itself)."""
    return re.sub(r"_hydra-[0-9a-f]{10}\.yaml", "_hydra-<digest>.yaml", text)


# what a job needs to run offline with one thread (no hub access, no tokenizer thread pool)
OFFLINE_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_main(args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python3 main.py args`` in a subprocess and capture its output."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


# main.py's command-line mistakes: (arguments, a piece of the one error line); run by
# tests/launcher/test_launcher.py, counted by tests/e2e/test_bad_inputs.py
BAD_INPUTS = [
    (["stages=[data_preparation"], "command line:"),
    (["no_such_key=1"], "command line:"),
    (["prompt_learning=gpt3/nope"], "command line:"),
    (["stages=[training]"], "unknown stage 'training'"),
    (["cluster_type=aws"], "cluster_type: 'aws' is not one of"),
    (["prompt_learning.trainer.devices=abc"], "prompt_learning.trainer.devices: must be a positive integer"),
    (["prompt_learning.model.task_templates.0.virtual_token_splits=[5,5]"], "virtual_token_splits"),
    (["prompt_learning.model.task_templates.0.prompt_template='Context: {context} Q: {question} A: {answer} <|VIRTUAL_PROMPT_0|>'"],
     "must end with {answer}"),
    (["stages=[prompt_learning]"], "prompt_learning.model.data.train_ds"),
    (["base_results_dir=/etc/hostname/results"], "base_results_dir: cannot create"),
    (["prompt_learning.model.language_model_path=/models/gpt.nemo"], "language_model_path: '/models/gpt.nemo' does not exist"),
    (["base_results_dir=${nope}"], "cannot resolve interpolation"),
    (["+env_vars.BAD-NAME=1"], "env_vars.BAD-NAME"),
    (["data_preparation.source=local", "data_preparation.local_dir=/nonexistent"], "data_preparation.local_dir"),
    (["data_preparation.run.nodes=0"], "data_preparation.run.nodes: must be a positive integer"),
    (["prompt_learning.trainer.num_nodes=2", "prompt_learning.model.global_batch_size=16"], "cluster_type=local runs on this machine only"),
    (["stages=[evaluation]"], "evaluation.model.artifact_path"),
]
