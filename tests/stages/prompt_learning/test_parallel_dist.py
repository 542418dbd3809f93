"""TP / PP (GPipe, 1F1B) / DP prompt learning on 2 gloo processes == one process on the full batch.

Under ``PROMPTLAUNCH_TEST_DEVICE=cuda`` (tests/support/dist.py) the ranks run on NCCL, one GPU each, against the same
CPU reference; with one GPU only the 1-process layout runs (NCCL and the sharded engine on CUDA), the others skip.

One start of 2 processes (forked from the pytest process, which has already imported torch and
transformers: ~10 s per process saved on a busy CPU) runs every layout in turn; the per-layout
tests then compare its results with the single-process reference computed in the pytest process
through the stock Hugging Face forward. The composed layouts (TPxPP, TPxDP, PPxDP on 4 processes,
TPxPPxDP on 8) run the same way.
"""
from __future__ import annotations

import time

import pytest
import torch

from tests.support.dist import (GBS, LR, MBS, N_VIRTUAL, TOL, prompt_init, rank_device, reference, require_ranks,
                                run_distributed, step_batches)
from tests.support.tiny_models import tiny_llama

# one process: the sharded engine with nothing to shard (its process group, device placement and reductions)
LAYOUTS_1 = {"one_rank": dict()}
LAYOUTS = {
    "tp2": dict(tensor_model_parallel_size=2),
    "pp2_gpipe": dict(pipeline_model_parallel_size=2, pipeline_schedule="gpipe"),
    "pp2_1f1b": dict(pipeline_model_parallel_size=2, pipeline_schedule="1f1b"),
    "dp2": dict(),
}
# composed on one (pp, dp, tp) mesh, 4 and 8 processes (still 2 cores: tiny model, short runs)
LAYOUTS_4 = {
    "tp2_pp2": dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, pipeline_schedule="1f1b"),
    "tp2_dp2": dict(tensor_model_parallel_size=2),
    "pp2_dp2": dict(pipeline_model_parallel_size=2, pipeline_schedule="gpipe"),
}
LAYOUTS_8 = {"tp2_pp2_dp2": dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, pipeline_schedule="1f1b")}
GROUPS = ((1, LAYOUTS_1), (2, LAYOUTS), (4, LAYOUTS_4), (8, LAYOUTS_8))   # (processes, layouts run in one start)


def _ref_eval(state_dict, table):
    from stages.prompt_learning.parallel.model import SoftPrompt, reference_loss

    with torch.no_grad():
        return reference_loss(tiny_llama(state_dict), SoftPrompt(N_VIRTUAL, 64, table), step_batches()[1]).item()


def _worker(rank: int, world: int, state_dict, ref_table, layouts=LAYOUTS):
    """Runs in each rank: every layout, N AdamW steps; with 1 or 2 ranks also eval, artifact round trip
    and gradient accumulation."""
    from stages.prompt_learning.parallel import ShardedPromptModel, SoftPrompt, check_prompt_in_sync, make_layout

    train, held_out = step_batches()
    out = {}
    for name, sizes in layouts.items():
        t0 = time.perf_counter()
        layout = make_layout(world_size=world, global_batch_size=GBS, micro_batch_size=MBS, **sizes)
        sharded = ShardedPromptModel(tiny_llama(state_dict), SoftPrompt(N_VIRTUAL, 64, prompt_init()), layout,
                                     device=rank_device(rank))
        opt = torch.optim.AdamW(sharded.parameters(), lr=LR)
        losses, grads = [], []
        for batch in train:
            rows = layout.rows_per_dp_rank
            shard = {k: v[sharded.data_parallel_rank * rows : (sharded.data_parallel_rank + 1) * rows] for k, v in batch.items()}
            opt.zero_grad(set_to_none=True)
            losses.append(sharded.train_step(shard).item())
            grads.append(sharded.prompt.weight.grad.clone())
            opt.step()
        sync = check_prompt_in_sync(sharded)
        rows = layout.rows_per_dp_rank
        shard = {k: v[sharded.data_parallel_rank * rows : (sharded.data_parallel_rank + 1) * rows] for k, v in held_out.items()}
        artifact = sharded.prompt_state_dict()
        eval_loss = eval_ref_table = accum = None
        if world <= 2:  # the extra checks run on the 1- and 2-process layouts only (time budget)
            eval_loss = sharded.eval_step(shard).item()
            # reverse direction: a table trained on 1 process, evaluated under this layout
            sharded.load_prompt_state_dict({"weight": ref_table})
            eval_ref_table = sharded.eval_step(shard).item()
            # gradient accumulation over two train_step calls without zero_grad == twice the gradient
            sharded.prompt.weight.grad = None
            sharded.train_step(shard)
            g1 = sharded.prompt.weight.grad.clone()
            sharded.train_step(shard)
            accum = (sharded.prompt.weight.grad - 2 * g1).abs().max().item()
        frozen_grads = sum(p.grad is not None for p in sharded.stage.parameters() if p is not sharded.prompt.weight)
        out[name] = dict(
            losses=losses, grads=grads, artifact=artifact, eval_loss=eval_loss, eval_ref_table=eval_ref_table,
            sync=sync, accum=accum, frozen_grads=frozen_grads, seconds=time.perf_counter() - t0,
            artifact_device=artifact["weight"].device.type, device=str(sharded.device),   # results reach us on CPU anyway
            dtensor=any(type(p).__name__ == "DTensor" for p in sharded.stage.parameters()),
        )
    return out


_REF: dict = {}


def _state_and_ref():
    import stages.prompt_learning.parallel.sharded_model  # noqa: F401 - imported once here, inherited by the forked ranks

    if not _REF:
        state_dict = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
        _REF.update(state_dict=state_dict, ref=reference(state_dict))
    return _REF["state_dict"], _REF["ref"]


def _run(world: int, layouts: dict):
    state_dict, ref = _state_and_ref()
    t0 = time.perf_counter()
    per_rank = run_distributed(_worker, world, state_dict, ref["table"], layouts, timeout=150)
    wall = time.perf_counter() - t0
    print(f"\n{world}-process run of {list(layouts)}: {wall:.1f}s wall; per layout (rank 0): "
          + ", ".join(f"{k} {v['seconds']:.1f}s" for k, v in per_rank[0].items()))
    for name in layouts:
        r = per_rank[0][name]
        dl = max(abs(a - b) for a, b in zip(r["losses"], ref["losses"]))
        dg = max((g - g_ref).abs().max().item() for g, g_ref in zip(r["grads"], ref["grads"]))
        dt = (r["artifact"]["weight"] - ref["table"]).abs().max().item()
        print(f"  {name}: max |loss - ref| = {dl:.2e}, max |grad - ref| = {dg:.2e}, max |table - ref| = {dt:.2e}")
    return {name: [res[name] for res in per_rank] for name in layouts}


@pytest.fixture(scope="module")
def runs():
    """name -> per-rank results, for the 1- and 2-process layouts and the composed 4/8-process ones
    (each group started lazily, only when its tests are selected and its processes can run)."""
    groups: dict = {}  # world size -> results or the exception of its run (not retried per test)

    def get(name: str):
        world, layouts = next((w, lay) for w, lay in GROUPS if name in lay)
        require_ranks(world)
        if world not in groups:
            try:
                groups[world] = _run(world, layouts)
            except Exception as exc:  # noqa: BLE001
                groups[world] = exc
        if isinstance(groups[world], Exception):
            raise groups[world]
        state_dict, ref = _state_and_ref()
        return ref, groups[world][name], state_dict

    return get


@pytest.mark.dist
@pytest.mark.parametrize("name", [name for _, lay in GROUPS for name in lay])
def test_layout_matches_single_process(runs, name):
    ref, per_rank, state_dict = runs(name)
    for rank, r in enumerate(per_rank):
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]), **TOL, msg=f"{name} rank {rank} losses")
        for step, (g, g_ref) in enumerate(zip(r["grads"], ref["grads"])):
            # AdamW is blind to a constant gradient scale, so the gradients are compared too
            torch.testing.assert_close(g, g_ref, **TOL, msg=f"{name} rank {rank} prompt grad at step {step}")
        torch.testing.assert_close(r["artifact"]["weight"], ref["table"], **TOL, msg=f"{name} rank {rank} prompt table")
        assert r["sync"] == 0.0, f"{name}: rank {rank} prompt differs from rank 0 by {r['sync']}"
        assert r["frozen_grads"] == 0, f"{name}: frozen weights received gradients"
        assert r["accum"] is None or r["accum"] < 1e-7, f"{name}: accumulating two train_step calls is off by {r['accum']}"
        assert type(r["artifact"]["weight"]) is torch.Tensor and r["artifact_device"] == "cpu"
        assert r["device"] == str(rank_device(rank)), f"{name}: rank {rank} computed on {r['device']}"
    assert per_rank[0]["dtensor"] == name.startswith("tp2")
    # losses actually move (the comparison is not trivially between constants)
    assert ref["losses"][0] != ref["losses"][-1]


@pytest.mark.dist
@pytest.mark.parametrize("name", list(LAYOUTS_1) + list(LAYOUTS))
def test_prompt_artifact_is_layout_independent(runs, name):
    """Trained under the layout -> evaluated on 1 process, and trained on 1 process -> evaluated
    under the layout: same held-out loss either way."""
    ref, per_rank, state_dict = runs(name)
    r = per_rank[-1]  # the last rank: a later pipeline stage under pp
    torch.testing.assert_close(_ref_eval(state_dict, r["artifact"]["weight"]), r["eval_loss"], **TOL)
    torch.testing.assert_close(r["eval_ref_table"], ref["eval_loss"], **TOL)
