"""stages/common/entry.py: the line each rank of a multi-process run prints first, and the one line a rank prints when
another rank's process (or node) is gone, instead of a traceback from inside torch.distributed."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from stages.common.entry import describe_rank, peer_lost
from tests.support.paths import ROOT


def test_describe_rank_names_host_node_and_master():
    assert describe_rank({"WORLD_SIZE": "1"}) is None and describe_rank({}) is None
    line = describe_rank({"WORLD_SIZE": "4", "RANK": "3", "NODE_RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
                          "MASTER_PORT": "15003"})
    assert line.startswith(f"promptlaunch: rank 3/4 on host {socket.gethostname()} (")
    assert line.endswith("), node rank 1, local rank 1, master n1:15003")


def test_peer_lost_only_for_a_lost_peer_of_a_multi_process_run():
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:5. This is typically ...")
    env = {"WORLD_SIZE": "2", "RANK": "0"}
    assert peer_lost(gloo, env).startswith(f"rank 0 on host {socket.gethostname()} lost contact with another rank of "
                                           "this job ([gloo/transport/tcp/pair.cc:553] Connection closed by peer")
    assert peer_lost(RuntimeError("shape mismatch"), env) is None
    assert peer_lost(gloo, {"WORLD_SIZE": "1"}) is None


RANK = """\
import os, sys, time
sys.path.insert(0, {root!r})
from stages.common.entry import run_stage
def main(cfg):
    import torch, torch.distributed as dist
    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        os._exit(9)                      # this rank's process dies, as on a node that lost power
    time.sleep(1)
    dist.all_reduce(torch.ones(1))
sys.exit(run_stage(main, ["--config", {cfg!r}]))
"""


def test_a_rank_whose_peer_died_says_one_line_and_exits_1(tmp_path):
    pytest.importorskip("torch")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    script = tmp_path / "rank.py"
    script.write_text(RANK.format(root=str(ROOT), cfg=str(cfg)))
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(script)], env=dict(os.environ, RANK=str(r), WORLD_SIZE="2",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    (out0, err0), (_, _) = (p.communicate(timeout=120) for p in procs)
    assert [p.returncode for p in procs] == [1, 9], err0
    errors = [line for line in err0.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "rank 0 on host" in errors[0] and "lost contact with another rank" in errors[0], err0
    assert "Traceback" not in err0
    assert out0.startswith("promptlaunch: rank 0/2 on host ")
