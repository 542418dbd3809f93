"""Process group and the 3-D ``DeviceMesh`` ("pp", "dp", "tp") every parallel piece hangs off.

Rank order: ``rank = (pp_rank * dp + dp_rank) * tp + tp_rank``. Tensor parallel is innermost so a
TP group is consecutive ranks (one node, the fastest links: it all-reduces activations every layer);
pipeline parallel is outermost (point-to-point activations, fine across nodes). Global rank 0 is
(pp 0, dp 0, tp 0): the first pipeline stage, which owns the live prompt table, and is also the rank
Lightning checkpoints from.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from stages.common.errors import UserError

MESH_DIMS = ("pp", "dp", "tp")


def backend_for(device: torch.device | str) -> str:
    """gloo for CPU, nccl for CUDA."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device: torch.device | str | None = None, timeout_s: float = 1800.0) -> None:
    """Initialise the default process group from the env:// variables (torchrun, srun wrappers, Lightning).

    A no-op when it is already initialised (e.g. by a Lightning strategy).
    """
    if dist.is_initialized():
        return
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE") if k not in os.environ]
    if missing:
        raise UserError(
            f"distributed launch: environment variables {', '.join(missing)} are not set; start the stage with "
            f"torchrun/srun as the launcher's job script does"
        )
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend_for(device), timeout=timedelta(seconds=timeout_s))


def build_mesh(tp: int, pp: int, dp: int, device_type: str | None = None) -> DeviceMesh:
    """A DeviceMesh of shape (pp, dp, tp) named ("pp", "dp", "tp") over the initialised world.

    ``device_type`` defaults to "cuda" when the default process group uses nccl, else "cpu".
    Sub-meshes: ``mesh["tp"]`` (for ``parallelize_module``), ``mesh["pp"].get_group()`` (for
    ``PipelineStage``), ``mesh["dp"].get_group()`` (gradient all-reduce).
    """
    if not dist.is_initialized():
        raise RuntimeError("build_mesh needs an initialised default process group; call init_distributed() first")
    world = dist.get_world_size()
    if tp * pp * dp != world:
        raise UserError(
            f"prompt_learning.model: tensor_model_parallel_size x pipeline_model_parallel_size x data-parallel = "
            f"{tp}x{pp}x{dp} = {tp * pp * dp} but {world} processes were started; start tp*pp*dp processes"
        )
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (pp, dp, tp), mesh_dim_names=MESH_DIMS)
