"""prompt_learning as one Slurm job across two nodes (``trainer.num_nodes=2``) of the cluster of
.ci/slurm/start-multinode.sh, on the tiny Llama with gloo: DP=2 (``devices=1``) and TP=2 x DP=2 (``devices=2``).

Each node is its own host (hostname pln1/pln2, address 127.0.0.11/127.0.0.12); the ranks meet at the first host of
the job's node list. The job log must show every rank's host, address, node rank and that master, and the losses
and final prompt must equal the same stage config run as one process here (1e-5).
"""
from __future__ import annotations

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
    hosts = multinode_cluster.hostnames(node_list)
    assert len(hosts) == 2, node_list
    log = (stage_dir / f"log-squad_tiny_llama_{job_id}.out").read_text()
    ranks = {int(m[0]): m for m in RANK_LINE.findall(log)}
    world = 2 * devices
    assert sorted(ranks) == list(range(world)), log[-3000:]
    port = str(15000 + int(job_id) % 10000)
    addrs = {h: multinode_cluster.node_addr(h) for h in hosts}
    assert len(set(addrs.values())) == 2, addrs
    for rank, (_, size, host, addr, node, local, master, master_port) in ranks.items():
        assert (int(size), int(node), int(local)) == (world, rank // devices, rank % devices), ranks[rank]
        assert (host, addr) == (hosts[rank // devices], addrs[host]), (ranks[rank], addrs)   # its node's own address
        assert (master, master_port) == (hosts[0], port)
    print(f"\njob {job_id} on {node_list}:\n" + "\n".join(line for line in log.splitlines() if RANK_LINE.search(line)))

    # the same stage config as one process here: the same losses and prompt
    cfg = OmegaConf.load(next(stage_dir.glob("*_hydra-*.yaml")))
    assert (cfg.trainer.num_nodes, cfg.trainer.devices, cfg.model.tensor_model_parallel_size) == (2, devices, devices)
    ref = one_process_reference(stage_dir, tmp_path / "reference")
    assert_same_run(stage_outputs(cfg), ref, f"2 nodes x {devices} devices, TP={devices}")


def test_three_stage_chain_with_two_node_prompt_learning(multinode_cluster, tmp_path):
    """data_preparation -> prompt_learning on 2 nodes -> evaluation, chained with afterok, submitted by main.py."""
    from tests.support.launcher import ROOT

    model = build("llama", tmp_path / "llama")
    fixture = ROOT / "tests" / "fixtures" / "squad_tiny"
    args = prompt_learning_args(tmp_path, model, nodes=2, devices=1, steps=2, extra=[
        "stages=[data_preparation,prompt_learning,evaluation]", "data_preparation.source=local",
        f"data_preparation.local_dir={fixture}", "data_preparation.sha256.train=null", "data_preparation.sha256.dev=null",
        "data_preparation.expected_counts.train=7", "data_preparation.expected_counts.dev=5",
        f"prompt_learning.model.data.train_ds=[{tmp_path}/data/prompt_data/v1.1/squad_train.jsonl]",
        f"prompt_learning.model.data.validation_ds=[{tmp_path}/data/prompt_data/v1.1/squad_val.jsonl]",
        "evaluation.data.offset=0", "evaluation.data.max_examples=3", "evaluation.inference.tokens_to_generate=4"])
    proc = run_main(args)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    dirs = {"data_preparation": tmp_path / "results" / "data_preparation",
            "prompt_learning": tmp_path / "results" / "tiny_llama" / "prompt_learning_squad",
            "evaluation": tmp_path / "results" / "tiny_llama" / "evaluation_squad"}
    ids = {stage: multinode_cluster.job_id(d) for stage, d in dirs.items()}
    # the evaluation waits on the two-node job (afterok), which waited on the data preparation
    assert multinode_cluster.job(ids["evaluation"])["Dependency"].startswith(f"afterok:{ids['prompt_learning']}")
    states = multinode_cluster.wait(list(ids.values()), timeout=400)
    assert [states[i].state for i in ids.values()] == ["COMPLETED"] * 3, states
    pl_log = (dirs["prompt_learning"] / f"log-squad_tiny_llama_{ids['prompt_learning']}.out").read_text()
    hosts = sorted(m[2] for m in RANK_LINE.findall(pl_log))
    assert len(hosts) == 2 and hosts[0] != hosts[1], pl_log[-3000:]
    assert multinode_cluster.hostnames(multinode_cluster.job(ids["prompt_learning"])["NodeList"]) == hosts
    import json

    metrics = json.loads((dirs["evaluation"] / "metrics.json").read_text())
    assert metrics["total"] == 3
