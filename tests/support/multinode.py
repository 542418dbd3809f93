"""The multi-node Slurm (three nodes) of ``.ci/slurm/start-multinode.sh`` as the tests marked ``multinode`` see it: is it up, which
nodes it has, following jobs, pulling a node's plug and starting it again."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from tests.support.paths import ROOT

CONF_ENV = "PROMPTLAUNCH_MULTINODE_SLURM_CONF"
START = ROOT / ".ci" / "slurm" / "start-multinode.sh"
STOP = ROOT / ".ci" / "slurm" / "stop-multinode.sh"
UP = ("idle", "mixed", "allocated", "completing")


def skip_reason() -> str | None:
    """None when the multi-node cluster answers with at least two usable nodes, else why the tests skip."""
    conf = os.environ.get(CONF_ENV)
    if not conf:
        return (f"no multi-node Slurm: {CONF_ENV} is unset; run bash .ci/slurm/start-multinode.sh and "
                f"source /tmp/promptlaunch-slurm-mn/env.sh")
    if shutil.which("sinfo") is None:
        return "no multi-node Slurm: sinfo is not on PATH"
    try:
        states = node_states(conf)
    except (subprocess.TimeoutExpired, RuntimeError) as exc:
        return f"no multi-node Slurm: {exc}"
    up = [n for n, s in states.items() if s.rstrip("*~#") in UP]
    if len(up) < 2:
        return f"the multi-node Slurm ({conf}) has fewer than 2 usable nodes: {states}"
    return None


def node_states(conf: str) -> dict[str, str]:
    proc = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%N %T"], capture_output=True, text=True,
                          timeout=30, env=dict(os.environ, SLURM_CONF=conf))
    if proc.returncode != 0:
        raise RuntimeError(f"sinfo exit {proc.returncode}: {proc.stderr.strip()}")
    return dict(line.split() for line in proc.stdout.splitlines() if line.strip())


def wait_for(what: str, check: Callable[[], object], timeout: float, poll: float = 0.5) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@dataclass(frozen=True)
class MultinodeCluster:
    """A reachable multi-node Slurm (``SLURM_CONF`` points at it for the test's duration)."""

    conf: str

    @property
    def nodes(self) -> list[str]:
        return sorted(node_states(self.conf))

    def wait(self, job_ids: Sequence[str], timeout: float = 300.0) -> dict:
        """Final JobState per job id of an afterok chain (dependants of a failed job get cancelled)."""
        from cluster.slurm import wait_for_chain

        return wait_for_chain(list(job_ids), poll_seconds=0.5, timeout=timeout, report=lambda s: None)

    @staticmethod
    def job_id(results_dir: str | Path) -> str:
        return (Path(results_dir) / "job_id").read_text().strip()

    @staticmethod
    def job(job_id: str) -> dict[str, str]:
        out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    @staticmethod
    def hostnames(node_list: str) -> list[str]:
        """``pln[1-2]`` -> ``[pln1, pln2]`` (Slurm's own expansion)."""
        return subprocess.run(["scontrol", "show", "hostnames", node_list], capture_output=True, text=True,
                              check=True, timeout=30).stdout.split()

    @staticmethod
    def node_addr(name: str) -> str:
        """The address slurm.conf gives a node (NodeAddr)."""
        out = subprocess.run(["scontrol", "show", "node", name], capture_output=True, text=True, check=True, timeout=30).stdout
        return re.search(r"NodeAddr=(\S+)", out).group(1)

    def kill_node(self, name: str) -> None:
        """Pull the plug: the node's slurmd and every process on it die at once (its PID namespace ends)."""
        subprocess.run(["bash", str(STOP), "--node", name], check=True, timeout=60, env=self._env())

    def start_nodes(self) -> None:
        """Start every node that is not running (start-multinode.sh is idempotent) and wait until all are usable."""
        subprocess.run(["bash", str(START)], check=True, timeout=180, env=self._env(), capture_output=True)

    def _env(self) -> dict[str, str]:
        return dict(os.environ, SLURM_CONF=self.conf, PROMPTLAUNCH_SLURM_MN_DIR=str(Path(self.conf).parent))


# ---- prompt learning on the multi-node cluster, and the one-process reference --------------------------------
RANK_LINE = re.compile(r"promptlaunch: rank (\d+)/(\d+) on host (\S+) \((\S+)\), node rank (\d+), local rank (\d+), "
                       r"master (\S+):(\d+)")


def prompt_learning_args(tmp: Path, model: Path, *, nodes: int, devices: int, tp: int = 1, steps: int = 4,
                         extra: Sequence[str] = ()) -> list[str]:
    """main.py arguments: prompt_learning on the tiny Llama and toy SQuAD data as one Slurm job of ``nodes`` x
    ``devices`` processes (global batch 4, micro batch 2 per data-parallel rank when there are several)."""
    from tests.support.records import squad_records, write_jsonl

    train = write_jsonl(tmp / "train.jsonl", squad_records(24))
    val = write_jsonl(tmp / "val.jsonl", squad_records(8, seed=5))
    world = nodes * devices
    return [
        "stages=[prompt_learning]", "cluster_type=slurm", "cluster.exclusive=false", "cluster.mem=null",
        f"cluster.job_name_prefix=pl-{os.getpid()}-{tmp.name}-", f"base_results_dir={tmp}/results", f"data_dir={tmp}/data",
        "env_vars.OMP_NUM_THREADS=1", "env_vars.HF_HUB_OFFLINE=1", "prompt_learning.run.model_train_name=tiny_llama",
        f"prompt_learning.model.language_model_path={model}", f"prompt_learning.model.data.train_ds=[{train}]",
        f"prompt_learning.model.data.validation_ds=[{val}]", f"prompt_learning.trainer.num_nodes={nodes}",
        f"prompt_learning.trainer.devices={devices}", f"prompt_learning.model.tensor_model_parallel_size={tp}",
        "prompt_learning.model.global_batch_size=4", f"prompt_learning.model.micro_batch_size={4 if world == 1 else 2}",
        f"prompt_learning.trainer.max_steps={steps}", "prompt_learning.trainer.val_check_interval=2",
        "prompt_learning.trainer.enable_progress_bar=false", "prompt_learning.model.data.share_prefix=false",
        "prompt_learning.model.data.length_bucketing=false", "prompt_learning.model.data.max_seq_length=256",
        "prompt_learning.model.task_templates.0.truncate_field=context",
        "prompt_learning.trainer.precision=32",   # the 1e-5 equality with one process is an fp32 claim (auto may pick bf16)
        *extra,
    ]


def stage_outputs(cfg) -> dict:
    """Per-step train and val losses and the prompt tables a prompt_learning run wrote."""
    import json

    from safetensors.torch import load_file

    hist = json.loads((Path(cfg.exp_manager.explicit_log_dir) / "loss_history.json").read_text())
    return {"train": hist["train"], "val": hist["val"],
            "tables": load_file(str(Path(cfg.model.artifact_path) / "prompts.safetensors"))}


def one_process_reference(stage_dir: Path, out: Path) -> dict:
    """The job's own stage config run again here as ONE process (TP=1, the whole global batch as one micro batch)."""
    from omegaconf import OmegaConf

    from tests.support.training import train_single_thread

    cfg = OmegaConf.load(next(stage_dir.glob("*_hydra-*.yaml")))
    for key, value in {"run.results_dir": str(out), "exp_manager.explicit_log_dir": str(out / "results"),
                       "model.artifact_path": str(out / "artifact"), "trainer.devices": 1, "trainer.num_nodes": 1,
                       "model.tensor_model_parallel_size": 1, "model.micro_batch_size": cfg.model.global_batch_size}.items():
        OmegaConf.update(cfg, key, value, merge=False)
    train_single_thread(cfg)
    return stage_outputs(cfg)


def assert_same_run(got: dict, ref: dict, what: str, steps: int = 4) -> None:
    """Same steps, train and val losses and prompt tables to 1e-5."""
    import torch

    tol = dict(atol=1e-5, rtol=1e-5)
    assert [s for s, _ in got["train"]] == [s for s, _ in ref["train"]] == list(range(1, steps + 1)), what
    assert [s for s, _ in got["val"]] == [s for s, _ in ref["val"]], what
    for part in ("train", "val"):
        torch.testing.assert_close(torch.tensor([v for _, v in got[part]]), torch.tensor([v for _, v in ref[part]]),
                                   **tol, msg=lambda m: f"{what} {part} losses: {m}")
    assert sorted(got["tables"]) == sorted(ref["tables"])
    for k in ref["tables"]:
        torch.testing.assert_close(got["tables"][k], ref["tables"][k], **tol, msg=lambda m: f"{what} {k}: {m}")
