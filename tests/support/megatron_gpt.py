"""Tiny megatron-core ``GPTModel``s on CPU: the independent reference for the ``.nemo`` importer.

One gloo process, tensor/pipeline parallelism 1, the local layer spec (no TransformerEngine, no Apex), seeded.
megatron-core is written for CUDA; two things in its forward path touch the GPU although the maths does not need
it, and are replaced for the run (neither changes a number):

  * ``torch.cuda.current_device()``, where megatron-core places the attention ``baddbmm`` buffer (``beta=0``: its
    content is never read) and moves the RoPE ``inv_freq``: answers ``"cpu"`` during :func:`logits`;
  * the CUDA RNG tracker's ``fork`` (around attention dropout, which is 0 here, in eval mode): a no-op;
  * ``torch.cuda.synchronize()`` before ``dist_checkpointing.save`` copies the (CPU) tensors: a no-op.

The causal mask is passed explicitly (``True`` = masked), as Megatron's own GPT data path builds it.
"""
from __future__ import annotations

import contextlib
import tempfile
from typing import Any

NEMO_TO_MCORE_NORM = {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm"}


def init_single_process() -> bool:
    """Start one gloo process and megatron's parallel state (TP=PP=1); True when this call started them."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mrandom

    started = False
    if not dist.is_initialized():
        store = tempfile.mktemp(prefix="promptlaunch-megatron-")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        started = True
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    mrandom.initialize_rng_tracker()
    mrandom.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    return started


def shutdown(started: bool) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if started and dist.is_initialized():
        dist.destroy_process_group()


def build(cfg: dict[str, Any], vocab: int, seed: int = 0) -> Any:
    """A megatron-core GPTModel for a NeMo ``model_config.yaml`` (the tiny shapes of ``tests.support.nemo``)."""
    import torch
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.manual_seed(seed)
    activation = cfg.get("activation", "gelu")
    gated = activation.endswith("glu")
    tc = TransformerConfig(
        num_layers=cfg["num_layers"], hidden_size=cfg["hidden_size"], ffn_hidden_size=cfg["ffn_hidden_size"],
        num_attention_heads=cfg["num_attention_heads"], num_query_groups=cfg.get("num_query_groups"),
        use_cpu_initialization=True, init_method_std=0.1, hidden_dropout=0.0, attention_dropout=0.0,
        add_bias_linear=cfg.get("bias", True), bias_activation_fusion=cfg.get("bias_activation_fusion", True),
        normalization=NEMO_TO_MCORE_NORM[cfg.get("normalization", "layernorm")],
        layernorm_epsilon=cfg["layernorm_epsilon"], gated_linear_unit=gated,
        activation_func=F.silu if activation.endswith("swiglu") else F.gelu)
    model = GPTModel(config=tc, transformer_layer_spec=get_gpt_layer_local_spec(normalization=tc.normalization),
                     vocab_size=vocab, max_sequence_length=cfg["max_position_embeddings"],
                     position_embedding_type=cfg.get("position_embedding_type", "learned_absolute"),
                     rotary_base=cfg.get("rotary_base", 10000),
                     share_embeddings_and_output_weights=cfg.get("share_embeddings_and_output_weights", True))
    # layernorm gains and biases start at 1 / 0: make them random so a swapped or dropped one shows in the logits
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def logits(model: Any, tokens: Any) -> Any:
    """megatron-core's own forward: [batch, seq] token ids -> [batch, seq, vocab] logits."""
    from unittest import mock

    import torch

    seq = tokens.shape[1]
    positions = torch.arange(seq).unsqueeze(0).expand_as(tokens)
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
    with torch.no_grad(), mock.patch("torch.cuda.current_device", return_value="cpu"):
        return model(tokens, positions, attention_mask=mask)


def nemo_state(model: Any) -> dict[str, Any]:
    """The state dict as NeMo saves an mcore GPT: ``model.`` + megatron-core's own keys (``_extra_state`` kept)."""
    return {f"model.{k}": v for k, v in model.state_dict().items()}


def tp_shards(model: Any, state: dict[str, Any], ranks: int, gated: bool) -> list[dict[str, Any]]:
    """Split an mcore-named NeMo state into ``ranks`` tensor-parallel shards along each parameter's own
    ``partition_dim`` (megatron-core marks every tensor-parallel parameter); a gated ``linear_fc1`` holds
    ``[gate_r; up_r]`` per rank, as megatron-core's ``_sharded_state_dict_for_glu`` describes."""
    import torch

    dims = {f"model.{n}": p.partition_dim for n, p in model.named_parameters()
            if getattr(p, "tensor_model_parallel", False)}
    shards: list[dict[str, Any]] = [{} for _ in range(ranks)]
    for key, value in state.items():
        dim = dims.get(key)
        if dim is None or value is None:
            parts = [value] * ranks
        elif gated and key.endswith(("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")):
            gate, up = value.chunk(2, dim=0)
            parts = [torch.cat([g, u]) for g, u in zip(gate.chunk(ranks, 0), up.chunk(ranks, 0))]
        else:
            parts = list(value.chunk(ranks, dim=dim))
        for r in range(ranks):
            shards[r][key] = parts[r].clone() if hasattr(parts[r], "clone") else parts[r]
    return shards




def save_dist(model: Any, folder: Any) -> None:
    """megatron-core's own distributed checkpoint of the model (its default backend, torch_dist) into ``folder``,
    the keys under ``model.`` as NeMo's ``sharded_state_dict`` gives them."""
    from unittest import mock

    from megatron.core import dist_checkpointing

    folder.mkdir(parents=True, exist_ok=True)
    with mock.patch("torch.cuda.current_device", return_value="cpu"), mock.patch("torch.cuda.synchronize"):
        dist_checkpointing.save(model.sharded_state_dict(prefix="model."), str(folder))
