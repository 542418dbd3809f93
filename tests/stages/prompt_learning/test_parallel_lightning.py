"""The engine-facing recipe: ShardedPromptModel inside a LightningModule (manual optimisation,
``ModelParallelStrategy`` only for process-group setup and rank-0 checkpointing) on 2 gloo
processes gives the single-process losses and prompt table, and a checkpoint holding only the
plain prompt tensor. Under ``PROMPTLAUNCH_TEST_DEVICE=cuda``: NCCL, ``accelerator="gpu"``, 2 GPUs (skipped with fewer)."""
from __future__ import annotations

import os

import pytest
import torch

from tests.support.dist import (GBS, LR, MBS, N_VIRTUAL, STEPS, TOL, accelerator, make_batch, prompt_init, reference,
                                needs_ranks, run_distributed)
from tests.support.tiny_models import tiny_llama


def _module_class():
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, DistributedSampler

    from stages.prompt_learning.parallel import ShardedPromptModel, SoftPrompt, make_layout

    class PromptModule(pl.LightningModule):
        """What the engine's LightningModule does on the TP/PP > 1 path."""

        def __init__(self, state_dict, sizes: dict, rows: list):
            super().__init__()
            self.automatic_optimization = False  # ShardedPromptModel runs forward+backward itself
            self.prompt = SoftPrompt(N_VIRTUAL, 64, prompt_init())  # the only registered module
            self.engine = None  # plain attribute, so the frozen shards stay out of state_dict()
            self._state_dict, self._sizes, self._rows = state_dict, sizes, rows

        def configure_model(self):  # the process group exists here
            if self.engine is None:
                layout = make_layout(world_size=self.trainer.world_size, global_batch_size=GBS, micro_batch_size=MBS, **self._sizes)
                self.engine = ShardedPromptModel(tiny_llama(self._state_dict), self.prompt, layout, device=self.device)

        def train_dataloader(self):
            sampler = DistributedSampler(
                self._rows, num_replicas=self.engine.data_parallel_size, rank=self.engine.data_parallel_rank, shuffle=False
            )
            return DataLoader(self._rows, batch_size=self.engine.layout.rows_per_dp_rank, sampler=sampler, drop_last=True)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.prompt.parameters(), lr=LR)

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            loss = self.engine.train_step(batch)
            opt.step()
            self.log("train_loss", loss, rank_zero_only=True, batch_size=GBS)
            self.losses.append(loss.item())
            return loss

    return PromptModule


def _lightning_worker(rank, world, state_dict, tmp):
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import ModelParallelStrategy

    # one sequence length for the whole run (the DataLoader stacks rows)
    batches = [make_batch(s) for s in range(STEPS)]
    rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(GBS)]
    out = {}
    for name, sizes in {"tp2": dict(tensor_model_parallel_size=2), "pp2": dict(pipeline_model_parallel_size=2)}.items():
        module = _module_class()(state_dict, sizes, rows)
        module.losses = []
        trainer = pl.Trainer(
            accelerator=accelerator(), devices=world, max_steps=STEPS, use_distributed_sampler=False,
            strategy=ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1, save_distributed_checkpoint=False),
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=tmp,
        )
        trainer.fit(module)
        ckpt = os.path.join(tmp, f"{name}.ckpt")
        trainer.save_checkpoint(ckpt)
        trainer.strategy.barrier()
        saved = torch.load(ckpt, weights_only=False)["state_dict"] if rank == 0 else None
        out[name] = dict(losses=module.losses, table=module.prompt.weight.detach().clone(), saved=saved)
    return out


@pytest.mark.dist
@needs_ranks(2)
def test_lightning_manual_optimisation_recipe(tmp_path):
    import pytorch_lightning  # noqa: F401 - imported before the fork
    import stages.prompt_learning.parallel.sharded_model  # noqa: F401

    state_dict = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    ref = reference(state_dict, ([make_batch(s) for s in range(STEPS)], make_batch(99)))
    per_rank = run_distributed(_lightning_worker, 2, state_dict, str(tmp_path), timeout=150)
    for name in ("tp2", "pp2"):
        for r in per_rank:
            torch.testing.assert_close(torch.tensor(r[name]["losses"]), torch.tensor(ref["losses"]), **TOL)
            torch.testing.assert_close(r[name]["table"], ref["table"], **TOL)
        saved = per_rank[0][name]["saved"]
        assert list(saved) == ["prompt.weight"] and type(saved["prompt.weight"]) is torch.Tensor
        torch.testing.assert_close(saved["prompt.weight"], ref["table"], **TOL)
