"""Helpers for multi-process (gloo, CPU) tests: a process runner, and the seeded batches, prompt and single-process
reference of the parallel-engine tests (on ``tests.support.tiny_models.tiny_llama``).

``run_distributed(fn, world_size, *args)`` starts ``world_size`` processes (fork by default), initialises
a gloo process group in each through a FileStore in a temp dir (no TCP port races), calls
``fn(rank, world_size, *args)`` and returns the per-rank return values (picklable) in rank order.
A failure on any rank raises with that rank's traceback; a hang is killed after ``timeout`` seconds.
With the default "fork" start method the children reuse the parent's imports; under "spawn" ``fn``
must be a module-level function (pickled by reference).
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

from tests.support.tiny_models import tiny_llama

# ----------------------------------------------------------------------------- spawn runner


def _entry(fn: Callable, rank: int, world: int, tmp: str, q) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        args = torch.load(os.path.join(tmp, "args.pt"), weights_only=False)
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=rank, world_size=world)
        result = fn(rank, world, *args)
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

    ``start_method`` defaults to "fork" on Linux: the children inherit the parent's already imported
    torch/transformers (~10 s of imports per process saved on a busy 2-core box). The parent must
    not have initialised a process group or CUDA. "spawn" works too (slower, ``fn`` importable).
    """
    if dist.is_initialized():
        raise RuntimeError("run_distributed must be called from a process without a process group")
    if start_method is None:
        start_method = "fork" if sys.platform.startswith("linux") else "spawn"
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
TOL = dict(atol=1e-5, rtol=1e-5)


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
