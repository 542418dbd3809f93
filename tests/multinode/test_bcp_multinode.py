"""Multi-node BCP, EMULATED: the NeMo launcher's documented BCP command line for prompt learning, run end to end on
the tiny Llama through tests/support/emulated_bcprun/bcprun -- an emulation of NVIDIA's bcprun, not the real tool:
each "node" is its own UTS + mount namespace with its own hostname (bcpn0, bcpn1) and loopback address
(127.0.0.21, 127.0.0.22), and the ranks get NGC_ARRAY_INDEX / NGC_ARRAY_SIZE / NGC_MASTER_ADDR / LOCAL_RANK and the
--env variables as on BCP. 2 nodes x 2 processes, TP=2 x DP=2 over gloo: the same losses and prompt as one process.

NeMo-Megatron-Launcher's README, "prompt learning on BCP" (it "must be launched in a multi-node job"):
    python3 /opt/NeMo-Megatron-Launcher/launcher_scripts/main.py prompt_learning=gpt3/squad \
        stages=[prompt_learning] cluster_type=bcp \
        launcher_scripts_path=/opt/NeMo-Megatron-Launcher/launcher_scripts data_dir=/mount/data \
        base_results_dir=/mount/results prompt_learning.run.model_train_name=gpt3_5b \
        prompt_learning.model.language_model_path=/mount/results/gpt3_5b/convert_nemo/results/megatron_gpt.nemo \
        >> /results/prompt_learning_gpt3_log.txt 2>&1
Here the paths are this checkout and the test's folders, plus the overrides a CPU run of the tiny model needs.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest

pytest.importorskip("torch")

from omegaconf import OmegaConf  # noqa: E402

from tests.support.multinode import (RANK_LINE, assert_same_run, one_process_reference, prompt_learning_args,  # noqa: E402
                                     stage_outputs)
from tests.support.paths import ROOT, SUPPORT  # noqa: E402
from tests.support.tiny_models import build  # noqa: E402

pytestmark = pytest.mark.multinode
EMULATED_BIN = SUPPORT / "emulated_bcprun"


def _namespaces_work() -> str | None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return "the emulated bcprun needs root and unshare (one UTS + mount namespace per node)"
    probe = subprocess.run(["unshare", "--uts", "--mount", "--fork", "true"], capture_output=True, text=True, timeout=30)
    return None if probe.returncode == 0 else f"unshare --uts --mount failed here: {probe.stderr.strip()}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def test_nemo_documented_bcp_command_line_on_two_emulated_nodes(tmp_path):
    why = _namespaces_work()
    if why:
        pytest.skip(why)
    model = build("llama", tmp_path / "llama")
    port = _free_port()
    nemo_line = ["prompt_learning=gpt3/squad", "stages=[prompt_learning]", "cluster_type=bcp",
                 f"launcher_scripts_path={ROOT}", f"data_dir={tmp_path}/data", f"base_results_dir={tmp_path}/results",
                 "prompt_learning.run.model_train_name=gpt3_5b", f"prompt_learning.model.language_model_path={model}"]
    tiny_cpu = [a for a in prompt_learning_args(tmp_path, model, nodes=2, devices=2, tp=2)
                if a.startswith(("prompt_learning.model.", "prompt_learning.trainer.", "env_vars."))]
    tiny_cpu += ["prompt_learning.trainer.accelerator=cpu", "prompt_learning.trainer.precision=32",
                 "prompt_learning.trainer.max_epochs=-1", f"+env_vars.MASTER_PORT={port}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "NGC_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PATH=f"{EMULATED_BIN}:{env['PATH']}", NGC_ARRAY_SIZE="2")   # main.py runs on node 0 of a 2-replica job
    log = tmp_path / "prompt_learning_gpt3_log.txt"
    with open(log, "ab") as out:   # >> /results/prompt_learning_gpt3_log.txt 2>&1
        proc = subprocess.run([sys.executable, str(ROOT / "main.py"), *nemo_line, *tiny_cpu], cwd=ROOT, env=env,
                              stdout=out, stderr=subprocess.STDOUT, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    stage_dir = tmp_path / "results" / "gpt3_5b" / "prompt_learning_squad"
    script = next(stage_dir.glob("*_bcp.sh")).read_text()
    assert "bcprun --nnodes 2 --npernode 2" in script and '--env "MASTER_PORT=${MASTER_PORT}"' in script
    assert "bcprun (EMULATION, not NVIDIA's bcprun): 2 node(s) x 2 process(es): bcpn0 (127.0.0.21), bcpn1 (127.0.0.22)" in text

    ranks = {int(m[0]): m for m in RANK_LINE.findall(text)}
    assert sorted(ranks) == [0, 1, 2, 3], text[-3000:]
    for rank, (_, size, host, addr, node, local, master, master_port) in ranks.items():
        assert (size, node, local) == ("4", str(rank // 2), str(rank % 2)), ranks[rank]
        assert (host, addr) == (f"bcpn{rank // 2}", f"127.0.0.{21 + rank // 2}"), ranks[rank]
        assert (master, master_port) == ("bcpn0", str(port)), ranks[rank]
    print("\n" + "\n".join(line for line in text.splitlines() if "bcprun (EMULATION" in line or RANK_LINE.search(line)))

    cfg = OmegaConf.load(next(stage_dir.glob("*_hydra-*.yaml")))
    assert (cfg.trainer.num_nodes, cfg.trainer.devices, cfg.model.tensor_model_parallel_size) == (2, 2, 2)
    assert_same_run(stage_outputs(cfg), one_process_reference(stage_dir, tmp_path / "reference"), "BCP 2 x 2, TP=2")
