"""prompt_learning as one Slurm job across two nodes (``trainer.num_nodes=2``) of the cluster of
.ci/slurm/start-multinode.sh, on the tiny Llama with gloo: DP=2 (``devices=1``) and TP=2 x DP=2 (``devices=2``).

Each node is its own host (hostname pln1/pln2, address 127.0.0.11/127.0.0.12); the ranks meet at the first host of
the job's node list. The job log must show every rank's host, address, node rank and that master, and the losses
and final prompt must equal the same stage config run as one process here (1e-5).
"""
from __future__ import annotations

import subprocess

import pytest

pytest.importorskip("torch")

from omegaconf import OmegaConf  # noqa: E402

from tests.support.launcher import run_main  # noqa: E402
from tests.support.multinode import (RANK_LINE, assert_same_run, one_process_reference, prompt_learning_args,  # noqa: E402
                                     stage_outputs)
from tests.support.tiny_models import build  # noqa: E402

pytestmark = pytest.mark.multinode


@pytest.mark.parametrize("devices", [1, 2], ids=["dp2", "tp2xdp2"])
def test_two_node_prompt_learning_equals_one_process(multinode_cluster, tmp_path, devices):
    model = build("llama", tmp_path / "llama")
    proc = run_main(prompt_learning_args(tmp_path, model, nodes=2, devices=devices, tp=devices,
                                         extra=["cluster.wait=true", "cluster.poll_seconds=1"]))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    stage_dir = tmp_path / "results" / "tiny_llama" / "prompt_learning_squad"
    job_id = multinode_cluster.job_id(stage_dir)
    script = next(stage_dir.glob("*_slurm.sh")).read_text()
    assert "#SBATCH --nodes=2" in script and f"#SBATCH --ntasks-per-node={devices}" in script

    # where the ranks ran: Slurm's node list, first host = master, every rank on its node's own host and address
    node_list = multinode_cluster.job(job_id)["NodeList"]
    hosts = subprocess.run(["scontrol", "show", "hostnames", node_list], capture_output=True, text=True,
                           check=True).stdout.split()
    assert len(hosts) == 2, node_list
    log = (stage_dir / f"log-squad_tiny_llama_{job_id}.out").read_text()
    ranks = {int(m[0]): m for m in RANK_LINE.findall(log)}
    world = 2 * devices
    assert sorted(ranks) == list(range(world)), log[-3000:]
    port = str(15000 + int(job_id) % 10000)
    for rank, (_, size, host, addr, node, local, master, master_port) in ranks.items():
        assert (int(size), int(node), int(local)) == (world, rank // devices, rank % devices), ranks[rank]
        assert host == hosts[rank // devices], (host, hosts)
        assert (master, master_port) == (hosts[0], port)
    addresses = {ranks[r][3] for r in ranks}
    assert addresses == {"127.0.0.11", "127.0.0.12"}, ranks   # each node's own loopback address
    print(f"\njob {job_id} on {node_list}:\n" + "\n".join(line for line in log.splitlines() if RANK_LINE.search(line)))

    # the same stage config as one process here: the same losses and prompt
    cfg = OmegaConf.load(next(stage_dir.glob("*_hydra-*.yaml")))
    assert (cfg.trainer.num_nodes, cfg.trainer.devices, cfg.model.tensor_model_parallel_size) == (2, devices, devices)
    ref = one_process_reference(stage_dir, tmp_path / "reference")
    assert_same_run(stage_outputs(cfg), ref, f"2 nodes x {devices} devices, TP={devices}")
