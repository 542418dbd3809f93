"""Tensor, pipeline and data parallel prompt learning of a frozen Llama on PyTorch's own stack.

Only ``torch.distributed`` pieces are used: a 3-D ``DeviceMesh`` ("pp", "dp", "tp"),
``torch.distributed.tensor.parallel.parallelize_module`` (Colwise/Rowwise) for TP,
``torch.distributed.pipelining`` (``PipelineStage`` + ``ScheduleGPipe`` / ``Schedule1F1B``) for PP,
and an all-reduce of the prompt gradient over the dp sub-mesh for DP (what DDP does for a single
replicated parameter; DDP itself cannot wrap a module whose parameters exist on only some pipeline
stages). gloo on CPU, nccl on CUDA.

Sizes: ``world = trainer.devices * trainer.num_nodes = TP * PP * DP``;
``n_microbatches = global_batch_size / micro_batch_size / DP``. Rank order in the mesh is
``((pp * DP) + dp) * TP + tp`` (TP innermost = neighbouring GPUs).

API (everything the engine needs)
---------------------------------
``layout_from_config(cfg.model, world_size) -> ParallelLayout``
    Pure-Python validation of the sizes; one-line :class:`stages.common.errors.UserError` naming
    ``prompt_learning.model.tensor_model_parallel_size`` etc. Optional keys:
    ``model.pipeline_schedule`` ("1f1b" default | "gpipe"), ``model.sequence_parallel`` (false only).
``check_model_for_layout(hf_config, layout)``
    TP must divide num_attention_heads, num_key_value_heads and intermediate_size; PP <= layers;
    Llama architecture only (GPT-2 Conv1D -> UserError). Call it with ``AutoConfig`` before loading
    weights; ShardedPromptModel calls it again.
``init_distributed()`` / ``build_mesh(tp, pp, dp)``
    Only needed outside Lightning (a Lightning strategy initialises the process group).
``ShardedPromptModel(model, prompt, layout, device=..., pad_to=None)``
    ``model``: the frozen ``LlamaForCausalLM`` with the same weights on every rank;
    ``prompt``: ``SoftPrompt(n_rows, hidden, init)`` or any module whose ``forward()`` returns the
    [n_rows, hidden] table (P-tuning encoder; must be deterministic -- no dropout -- since TP
    ranks recompute it independently).

    * ``.train_step(batch) -> loss``: forward + backward of this rank's ``global_batch_size / DP``
      rows (micro batching inside) + gradient reduction; afterwards ``prompt``'s ``.grad`` is the
      full gradient of the GLOBAL token-mean loss, identical on every rank, so the optimiser is
      stepped on every rank. Returns that loss (same on every rank).
    * ``.eval_step(batch) -> loss``: same loss, no gradients.
    * ``.data_parallel_rank`` / ``.data_parallel_size``: for the sampler.
    * ``.prompt_state_dict()`` / ``.load_prompt_state_dict()`` / ``.prompt_table()``: plain full
      CPU tensors on every rank -- the artifact is independent of the layout (train TP=2, evaluate
      TP=1 and the reverse).

    batch = {"input_ids", "attention_mask", "labels"[, "position_ids"]}: virtual token ``k`` is
    written as id ``-(k+1)`` (:func:`mark_virtual_tokens`); labels use the Hugging Face convention
    (shift inside, -100 ignored). Loss = sum of CE over every labelled token of the global batch /
    their count -- exact under TP, PP, DP and micro batching (see ``model.py``).

The prompt_learning stage's real integration is ``wiring.py`` with ``checks.py``, ``engines.py``, ``data.py``,
``strategy.py`` and ``lightning_module.py`` in this package (per-task prompt tables stacked into one table, the
engine's data pipeline, checkpoints, artifact; tested through the stage entry in
``tests/stages/prompt_learning/test_prompt_learning_parallel.py``). The minimal recipe (tested in
``tests/stages/prompt_learning/test_parallel_lightning.py``)::

    layout = layout_from_config(cfg.model, world_size=devices * num_nodes)      # before pl.Trainer
    check_model_for_layout(AutoConfig.from_pretrained(path), layout)
    trainer = pl.Trainer(
        accelerator=..., devices=..., num_nodes=...,
        strategy=ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1,
                                       save_distributed_checkpoint=False),  # PG setup, no DDP wrap
        use_distributed_sampler=False,      # the sampler shards over DP only (TP/PP ranks share data)
        gradient_clip_val=None,             # manual optimisation: clip with self.clip_gradients
    )

    class PromptModule(pl.LightningModule):
        def __init__(self, ...):
            super().__init__()
            self.automatic_optimization = False
            self.prompt = SoftPrompt(n_rows, hidden, init)   # the ONLY registered submodule
            self.engine = None                               # plain attribute: frozen shards never
                                                             # enter state_dict()/checkpoints
        def configure_model(self):                           # process group exists here
            if self.engine is None:
                self.engine = ShardedPromptModel(load_frozen_llama(), self.prompt, layout,
                                                    device=self.device, pad_to=max_seq_length)
        def train_dataloader(self):
            sampler = DistributedSampler(ds, num_replicas=self.engine.data_parallel_size,
                                         rank=self.engine.data_parallel_rank, shuffle=True, seed=seed)
            return DataLoader(ds, batch_size=layout.rows_per_dp_rank, sampler=sampler,
                              drop_last=True, collate_fn=...)   # global_batch_size / DP rows
        def configure_optimizers(self):
            return AdamW(self.prompt.parameters(), ...)      # same on every rank
        def training_step(self, batch, i):
            opt = self.optimizers(); opt.zero_grad()
            loss = self.engine.train_step(batch)             # backward happens inside
            opt.step(); self.lr_schedulers().step()
            self.log("train_loss", loss, rank_zero_only=True)
        def validation_step(self, batch, i):
            self.log("val_loss", self.engine.eval_step(batch), rank_zero_only=True)
        # save the artifact from rank 0: self.engine.prompt_state_dict()

With TP = PP = 1 the engine can keep its ordinary automatic-optimisation + DDP path; using
``ShardedPromptModel`` there too gives the exact global-token-mean reduction (plain DDP averages
per-rank means).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Lazy exports (PEP 562): ``from stages.prompt_learning.parallel.layout import make_layout`` (what
# the launcher needs for validation) imports neither torch nor transformers.
_EXPORTS = {
    "ParallelLayout": "layout",
    "check_model_for_layout": "layout",
    "layout_from_config": "layout",
    "make_layout": "layout",
    "build_mesh": "mesh",
    "init_distributed": "mesh",
    "SoftPrompt": "model",
    "mark_virtual_tokens": "model",
    "ShardedPromptModel": "sharded_model",
    "check_prompt_in_sync": "sharded_model",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .layout import ParallelLayout, check_model_for_layout, layout_from_config, make_layout
    from .mesh import build_mesh, init_distributed
    from .model import SoftPrompt, mark_virtual_tokens
    from .sharded_model import ShardedPromptModel, check_prompt_in_sync
