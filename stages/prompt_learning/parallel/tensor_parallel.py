"""Megatron-style tensor parallelism of a (stage of a) frozen Llama with ``parallelize_module``.

Plan per decoder layer (the layout torch's own TP tutorial and torchtitan use):

=====================  ==================  ==========================================
module                 style               effect
=====================  ==================  ==========================================
self_attn.q/k/v_proj   ColwiseParallel     each rank computes heads/tp (and kv/tp) heads
self_attn.o_proj       RowwiseParallel     partial sums all-reduced -> replicated output
mlp.gate/up_proj       ColwiseParallel     intermediate_size/tp columns per rank
mlp.down_proj          RowwiseParallel     all-reduce
embed_tokens           RowwiseParallel     vocab rows sharded, lookup all-reduced (if vocab % tp == 0)
lm_head                ColwiseParallel     vocab columns sharded, logits all-gathered (if vocab % tp == 0)
=====================  ==================  ==========================================

Norms, rotary embeddings and the soft prompt are replicated: every TP rank computes the same
replicated activations, so the prompt gradient is identical on all TP ranks (the backward
all-reduces inside the Colwise layers make it so) and needs no TP reduction.

Head counts: transformers >= 4.48 ``LlamaAttention`` reshapes with ``view(*shape, -1, head_dim)`` and
keeps only ``head_dim`` and ``num_key_value_groups`` (= heads / kv_heads, unchanged by TP) as
attributes, so sharded projections just work. Older versions (4.46/4.47) keep ``num_heads`` /
``num_key_value_heads`` / ``hidden_size`` attributes used in ``view``; :func:`apply_tensor_parallel`
divides those by tp when they exist. The shared ``config`` is never modified (rotary embeddings and
other readers still need the global head counts).
"""
from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from .model import PromptedLlamaStage

_ATTN_PER_RANK_ATTRS = ("num_heads", "num_key_value_heads", "hidden_size")


def layer_plan(prefix: str) -> dict:
    return {
        f"{prefix}.self_attn.q_proj": ColwiseParallel(),
        f"{prefix}.self_attn.k_proj": ColwiseParallel(),
        f"{prefix}.self_attn.v_proj": ColwiseParallel(),
        f"{prefix}.self_attn.o_proj": RowwiseParallel(),
        f"{prefix}.mlp.gate_proj": ColwiseParallel(),
        f"{prefix}.mlp.up_proj": ColwiseParallel(),
        f"{prefix}.mlp.down_proj": RowwiseParallel(),
    }


def _check_linear(stage: nn.Module, names: list[str]) -> None:
    for name in names:
        mod = stage.get_submodule(name)
        if type(mod) is not nn.Linear:  # GPT-2 Conv1D, quantised linears, ...
            raise TypeError(f"{name} is {type(mod).__name__}, tensor parallelism needs torch.nn.Linear")


def apply_tensor_parallel(stage: PromptedLlamaStage, tp_mesh: DeviceMesh) -> PromptedLlamaStage:
    """Shard the stage's frozen weights over ``tp_mesh`` in place; returns the stage.

    Every rank must hold the same full weights beforehand (loaded from the same checkpoint): each
    keeps its own shard without communication (``src_data_rank=None``).
    """
    tp = tp_mesh.size()
    if tp == 1:
        return stage
    plan: dict = {}
    for i in range(len(stage.layers)):
        plan.update(layer_plan(f"layers.{i}"))
    _check_linear(stage, list(plan))
    vocab = stage.config.vocab_size
    tied = (
        stage.embed_tokens is not None
        and stage.lm_head is not None
        and stage.lm_head.weight is stage.embed_tokens.weight
    )
    if vocab % tp == 0:
        if stage.embed_tokens is not None:
            plan["embed_tokens"] = RowwiseParallel(input_layouts=Replicate())
        if stage.lm_head is not None and type(stage.lm_head) is nn.Linear:
            plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())
    parallelize_module(stage, tp_mesh, plan, src_data_rank=None)
    if tied and isinstance(stage.embed_tokens.weight, DTensor) and isinstance(stage.lm_head.weight, DTensor):
        if stage.embed_tokens.weight.placements == stage.lm_head.weight.placements:
            stage.lm_head.weight = stage.embed_tokens.weight  # keep one shard of a tied matrix
    for layer in stage.layers:
        attn = layer.self_attn
        for attr in _ATTN_PER_RANK_ATTRS:
            if isinstance(getattr(attn, attr, None), int):
                setattr(attn, attr, getattr(attn, attr) // tp)
    return stage
