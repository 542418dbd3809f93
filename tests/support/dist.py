"""Helpers for multi-process tests: the device they run on, a process runner, and the seeded batches, prompt and
single-process reference of the parallel-engine tests (on ``tests.support.tiny_models.tiny_llama``).

The device is chosen here and nowhere else: ``PROMPTLAUNCH_TEST_DEVICE`` is ``cpu`` (the default: gloo, CPU) or
``cuda`` (NCCL, rank r on GPU ``r % torch.cuda.device_count()``; what ``bench/gpu_check.sh`` runs). NCCL cannot run two
ranks on one GPU, so under ``cuda`` a test that needs more processes than GPUs skips with that reason
(:func:`require_ranks`); ``PROMPTLAUNCH_TEST_MAX_RANKS`` caps the process count the same way (the CPU dry run of
``gpu_check.sh`` uses 1).

``run_distributed(fn, world_size, *args)`` starts ``world_size`` processes (fork by default on CPU, spawn under
``cuda``: a forked child cannot use CUDA once its parent has), initialises a gloo or NCCL process group in each through
a FileStore in a temp dir (no TCP port races), calls ``fn(rank, world_size, *args)`` and returns the per-rank return
values (picklable; tensors moved to CPU) in rank order. A failure on any rank raises with that rank's traceback; a hang
is killed after ``timeout`` seconds. With "fork" the children reuse the parent's imports; under "spawn" ``fn`` must be
a module-level function (pickled by reference).
"""
from __future__ import annotations

import os
import queue
import sys
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stages.prompt_learning.parallel.mesh import backend_for

from tests.support.tiny_models import tiny_llama

# ----------------------------------------------------------------------------- the device the tests run on

DEVICE_ENV = "PROMPTLAUNCH_TEST_DEVICE"       # cpu (default): gloo on CPU; cuda: NCCL, one GPU per rank
MAX_RANKS_ENV = "PROMPTLAUNCH_TEST_MAX_RANKS"  # optional cap on the processes of one test


def device_type() -> str:
    """``cpu`` or ``cuda`` from :data:`DEVICE_ENV`; ``cuda`` without a visible CUDA device is an error, not a skip
    (the run asked for the GPU and must not pass on CPU)."""
    value = os.environ.get(DEVICE_ENV, "cpu")
    if value not in ("cpu", "cuda"):
        raise RuntimeError(f"{DEVICE_ENV}={value!r}: must be cpu or cuda")
    if value == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{DEVICE_ENV}=cuda, but torch {torch.__version__} sees no CUDA device")
    return value


def accelerator() -> str:
    """The Lightning / stage ``trainer.accelerator`` of the test device."""
    return "gpu" if device_type() == "cuda" else "cpu"


def rank_device(rank: int) -> torch.device:
    """Where rank ``rank`` computes: ``cuda:(rank % GPUs)`` under ``cuda``, else CPU."""
    if device_type() == "cuda":
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def why_not_ranks(world: int) -> str | None:
    """Why ``world`` processes cannot run here (None when they can): under ``cuda`` more processes than GPUs (NCCL
    runs one rank per GPU), or more than :data:`MAX_RANKS_ENV` allows."""
    if device_type() == "cuda" and world > torch.cuda.device_count():
        return (f"needs {world} CUDA devices ({DEVICE_ENV}=cuda: NCCL runs one rank per GPU); "
                f"{torch.cuda.device_count()} visible")
    cap = os.environ.get(MAX_RANKS_ENV)
    if cap and world > int(cap):
        return f"needs {world} processes; {MAX_RANKS_ENV}={cap}"
    return None


def require_ranks(world: int) -> None:
    """Skip the running test, with the reason, when ``world`` processes cannot run here."""
    import pytest

    why = why_not_ranks(world)
    if why:
        pytest.skip(why)


def needs_ranks(world: int) -> Any:
    """:func:`require_ranks` as a mark, so a test skips before its fixtures are built."""
    import pytest

    why = why_not_ranks(world)
    return pytest.mark.skipif(why is not None, reason=why or "")


def _to_cpu(obj: Any) -> Any:
    """A rank's result with every tensor on CPU, so the parent compares it without touching the GPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


# ----------------------------------------------------------------------------- spawn runner


def _entry(fn: Callable, rank: int, world: int, tmp: str, q) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        args = torch.load(os.path.join(tmp, "args.pt"), weights_only=False)
        device = rank_device(rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.set_float32_matmul_precision("highest")   # fp32 on the GPU too (no TF32): compared with CPU
        dist.init_process_group(backend_for(device), init_method=f"file://{os.path.join(tmp, 'store')}",
                                rank=rank, world_size=world)
        result = _to_cpu(fn(rank, world, *args))
        torch.save(result, os.path.join(tmp, f"result_{rank}.pt"))
        q.put((rank, True, ""))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        q.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable, world_size: int, *args: Any, timeout: float = 120.0, start_method: str | None = None
) -> list[Any]:
    """Arguments and results travel through files (torch.save), so tensors never go through
    torch.multiprocessing's shared-memory handles.

    ``start_method`` defaults to "fork" on Linux on CPU: the children inherit the parent's already imported
    torch/transformers (~10 s of imports per process saved on a busy 2-core box). The parent must
    not have initialised a process group. Under ``cuda`` (and off Linux) it is "spawn" (slower, ``fn``
    importable): the parent may have used CUDA (a single-process reference), which a forked child cannot.
    """
    if dist.is_initialized():
        raise RuntimeError("run_distributed must be called from a process without a process group")
    if start_method is None:
        start_method = "fork" if sys.platform.startswith("linux") and device_type() == "cpu" else "spawn"
    ctx = mp.get_context(start_method)
    q = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="pl_dist_") as tmp:
        torch.save(args, os.path.join(tmp, "args.pt"))
        procs = [ctx.Process(target=_entry, args=(fn, r, world_size, tmp, q), daemon=True) for r in range(world_size)]
        for p in procs:
            p.start()
        done: set[int] = set()
        errors: dict[int, str] = {}
        try:
            while len(done) + len(errors) < world_size:
                try:
                    rank, ok, tb = q.get(timeout=timeout)
                except queue.Empty:
                    raise TimeoutError(
                        f"distributed test timed out after {timeout}s; finished ranks: {sorted(done)}, "
                        f"failed: {sorted(errors)}"
                    ) from None
                if ok:
                    done.add(rank)
                else:
                    errors[rank] = tb
                    break  # the other ranks may be stuck in a collective
        finally:
            for p in procs:
                p.join(timeout=0.5 if errors else 10)
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
        if errors:
            rank = min(errors)
            raise RuntimeError(f"rank {rank} failed:\n{errors[rank]}")
        return [torch.load(os.path.join(tmp, f"result_{r}.pt"), weights_only=False) for r in range(world_size)]


# ----------------------------------------------------------------------------- batches, prompt and reference

N_VIRTUAL = 4
GBS = 8
MBS = 2
SEQ = 12
STEPS = 3
LR = 0.05
# fp32 everywhere; under cuda the ranks (cuBLAS, other summation orders) are compared with a CPU reference, so the
# bound is 1e-4 there (measured on CPU: 1e-5 holds between layouts; no GPU figure yet)
TOL = dict(atol=1e-4, rtol=1e-4) if device_type() == "cuda" else dict(atol=1e-5, rtol=1e-5)


def make_batch(seed: int, rows: int = GBS, seq: int = SEQ) -> dict[str, torch.Tensor]:
    """Virtual tokens first, then text; even rows right-padded, odd rows left-padded; a varying number
    of labelled "answer" tokens per row (so a mean of per-micro-batch means would be visibly wrong)."""
    from stages.engine.examples import IGNORE
    from stages.prompt_learning.parallel.model import mark_virtual_tokens

    g = torch.Generator().manual_seed(1000 + seed)
    ids = torch.zeros(rows, seq, dtype=torch.long)
    mask = torch.zeros(rows, seq, dtype=torch.long)
    labels = torch.full((rows, seq), IGNORE, dtype=torch.long)
    virtual = torch.zeros(rows, seq, dtype=torch.bool)
    for r in range(rows):
        length = int(torch.randint(N_VIRTUAL + 3, seq + 1, (1,), generator=g))
        start = 0 if r % 2 == 0 else seq - length
        sl = slice(start, start + length)
        ids[r, sl] = torch.randint(1, 128, (length,), generator=g)
        mask[r, sl] = 1
        virtual[r, start : start + N_VIRTUAL] = True
        n_ans = int(torch.randint(1, length - N_VIRTUAL, (1,), generator=g))
        labels[r, start + length - n_ans : start + length] = ids[r, start + length - n_ans : start + length]
    ids = mark_virtual_tokens(ids, virtual)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def prompt_init() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn(N_VIRTUAL, 64, generator=g) * 0.5


def step_batches():
    # a different sequence length at every step: under pp one PipelineStage/schedule per shape
    return [make_batch(s, seq=SEQ - s) for s in range(STEPS)], make_batch(99, seq=SEQ - STEPS)


def reference(state_dict, batches=None):
    """Single process, full batch, stock HF forward: losses per step, final table, eval losses."""
    from stages.prompt_learning.parallel.model import SoftPrompt, reference_loss

    model = tiny_llama(state_dict)
    prompt = SoftPrompt(N_VIRTUAL, 64, prompt_init())
    opt = torch.optim.AdamW(prompt.parameters(), lr=LR)
    train, held_out = batches or step_batches()
    losses, grads = [], []
    for batch in train:
        opt.zero_grad()
        loss = reference_loss(model, prompt, batch)
        loss.backward()
        grads.append(prompt.weight.grad.clone())
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        eval_loss = reference_loss(model, prompt, held_out).item()
    return {"losses": losses, "grads": grads, "table": prompt.weight.detach().clone(), "eval_loss": eval_loss}
