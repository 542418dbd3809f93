"""What every stage entry file shares: reading its resolved config and turning UserError into one line.

A stage is started by its job script as ``python3 -u stages/<stage>/run.py --config <name>_hydra.yaml``
(through torchrun/srun/bcprun when it needs several processes). The YAML is the fully resolved
stage config the launcher wrote next to the job script, so a stage never re-composes Hydra.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys
from pathlib import Path
from typing import Callable, MutableMapping, Sequence

from omegaconf import DictConfig, OmegaConf

from stages.common.errors import UserError

log = logging.getLogger("promptlaunch")

# the rendezvous port of a Slurm job: SLURM_PORT_BASE + job id % SLURM_PORT_SPAN, what Lightning's SLURMEnvironment
# derives; the Slurm executor renders the same formula into its scripts (cluster/slurm.py)
SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 10000


def load_stage_config(argv: Sequence[str] | None = None) -> DictConfig:
    """Parse ``--config PATH`` (plus optional ``key=value`` dotlist overrides) into a DictConfig."""
    parser = argparse.ArgumentParser(description="Run one promptlaunch stage from its resolved config.")
    parser.add_argument("--config", required=True, help="path to the <name>_hydra.yaml the launcher wrote")
    parser.add_argument("overrides", nargs="*", help="optional key=value overrides (OmegaConf dotlist)")
    args = parser.parse_args(argv)
    path = Path(args.config)
    if not path.is_file():
        raise UserError(f"--config {path}: no such file; pass the <name>_hydra.yaml written next to the job script")
    try:
        cfg = OmegaConf.load(path)
        if args.overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(args.overrides)))
    except Exception as exc:  # yaml / dotlist syntax
        raise UserError(f"{path}: cannot read config ({exc}); fix the YAML or the override syntax") from None
    assert isinstance(cfg, DictConfig)
    return cfg


def init_distributed_env(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Give torch.distributed and Lightning the same world, whichever launcher started this process.

    Sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK, MASTER_ADDR and MASTER_PORT where
    absent, from the first launcher found:
      - torchrun (or a bcprun that sets torch's variables itself): kept, only the gaps are filled;
      - Slurm's srun: SLURM_PROCID/NTASKS/LOCALID/NODEID, the first host of SLURM_NODELIST and port
        15000 + job id % 10000, exactly what Lightning's SLURMEnvironment derives;
      - Open MPI (bcprun with NGC_ARRAY_TYPE=MPIJob): OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK/LOCAL_SIZE;
      - bcprun: NGC_ARRAY_INDEX (node), NGC_ARRAY_SIZE (nodes), NGC_MASTER_ADDR, and LOCAL_RANK per
        process with LOCAL_WORLD_SIZE (the BCP script passes it) processes per node.
    Lightning then computes the same global rank (NODE_RANK x devices + LOCAL_RANK, or Slurm's own).
    Call it first in every stage process, before Lightning or torch.distributed read the environment.
    Returns the variables it set.
    """
    env = os.environ if environ is None else environ
    port = 29500  # torch's default; a BCP node belongs to one job
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", 0))
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        node = int(env.get("NODE_RANK", env.get("GROUP_RANK", rank // local_world)))
        addr = env.get("NGC_MASTER_ADDR", "127.0.0.1")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local, node = int(env.get("SLURM_LOCALID", 0)), int(env.get("SLURM_NODEID", 0))
        per_node = re.match(r"\d+", env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "")
        local_world = int(per_node.group()) if per_node else world
        nodes = env.get("SLURM_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"  # Lightning reads the first
        nodes = re.sub(r"\[(.*?)\]", r"\1", re.sub(r"\[(.*?)[,-].*\]", r"\1", nodes))  # node[3-5] -> node3
        addr = nodes.split(" ")[0].split(",")[0]
        job_id = env.get("SLURM_JOB_ID", "")
        port = SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN if job_id.isdigit() else 12910
    elif "OMPI_COMM_WORLD_RANK" in env:
        rank, world = int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"])
        local = int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0))
        local_world = int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", env.get("LOCAL_WORLD_SIZE", 1)))
        node = int(env.get("NGC_ARRAY_INDEX", rank // local_world))
        addr = env.get("NGC_MASTER_ADDR", "127.0.0.1")
    elif "NGC_ARRAY_INDEX" in env:
        node, local = int(env["NGC_ARRAY_INDEX"]), int(env.get("LOCAL_RANK", 0))
        local_world = int(env.get("LOCAL_WORLD_SIZE", 1))
        rank, world = node * local_world + local, int(env.get("NGC_ARRAY_SIZE", 1)) * local_world
        addr = env.get("NGC_MASTER_ADDR", "127.0.0.1")
    else:  # a single process started by hand: nothing to agree on
        return {}
    wanted = {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": local, "LOCAL_WORLD_SIZE": local_world,
              "NODE_RANK": node, "MASTER_ADDR": addr, "MASTER_PORT": port}
    added = {k: str(v) for k, v in wanted.items() if k not in env}
    env.update(added)
    return added


def describe_rank(environ: MutableMapping[str, str] | None = None) -> str | None:
    """One line saying where this process sits in its world: rank, host and its address, node and local rank, and
    the rendezvous address every rank uses; None for a single process. Every rank prints it first thing, so a
    multi-node job's log shows each rank's host (Slurm's logs merge every task's output)."""
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    host = socket.gethostname()
    try:
        addr = socket.gethostbyname(host)
    except OSError:
        addr = "unresolved"
    return (f"promptlaunch: rank {env.get('RANK', '?')}/{world} on host {host} ({addr}), node rank "
            f"{env.get('NODE_RANK', '?')}, local rank {env.get('LOCAL_RANK', '?')}, master "
            f"{env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')}")


# what torch.distributed says when another rank's process (or its node) is gone: gloo's pair and the TCP store
_PEER_LOST = re.compile(r"Connection (?:closed|reset) by peer|Broken pipe")


def peer_lost(exc: BaseException, environ: MutableMapping[str, str] | None = None) -> str | None:
    """The one line for a collective that failed because another rank died (its process or its node), instead of a
    long traceback from deep inside torch.distributed; None for any other error."""
    text = str(exc)
    env = os.environ if environ is None else environ
    if int(env.get("WORLD_SIZE", "1") or 1) <= 1 or not _PEER_LOST.search(text):
        return None
    first = " ".join(text.split("\n")[0].split(". ")[0].split())   # gloo: "[pair.cc:553] Connection closed by peer [addr]:port"
    return (f"rank {env.get('RANK', '?')} on host {socket.gethostname()} lost contact with another rank of this job "
            f"({first[:200]}): a process or node of the job failed, see the other ranks' lines in this log; a requeued "
            f"or rerun job resumes from its last checkpoint")


def setup_logging() -> None:
    """Plain timestamped log lines on stdout; only rank 0 logs at INFO so multi-process logs stay readable."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
        force=True,
    )


def run_stage(main: Callable[[DictConfig], None], argv: Sequence[str] | None = None) -> int:
    """Load the config, run ``main``; a UserError becomes one ``error:`` line (one per mismatch it holds) and exit
    code 2. A process of a multi-process run first prints where it runs (:func:`describe_rank`)."""
    init_distributed_env()  # first: logging, Lightning and torch.distributed read the ranks it sets
    where = describe_rank()
    if where:
        print(where, flush=True)
    setup_logging()
    try:
        cfg = load_stage_config(argv)
        main(cfg)
    except UserError as exc:
        for line in exc.lines:
            print(f"error: {line}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as exc:
        lost = peer_lost(exc)
        if lost is None:
            raise
        print(f"error: {lost}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # no interpreter teardown: with its peer gone, gloo's threads abort the process at exit ("terminate called
        # without an active exception", exit -6 instead of 1, seen in CI); nothing is left to save at this point
        os._exit(1)
    return 0
