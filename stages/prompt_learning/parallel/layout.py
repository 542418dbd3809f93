"""The TP x PP x DP layout of one prompt-learning run, validated before any process-group work.

Everything here is pure Python on plain numbers and a Hugging Face config: it never touches
``torch.distributed``, so a wrong layout fails with a one-line :class:`UserError` in the launcher
or at the very top of the stage, not as a hang or a shape error inside a collective.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from stages.common.checks import positive_int
from stages.common.errors import UserError

# Model families whose decoder layers are the Llama layout this package shards and splits:
# ``model.embed_tokens / model.layers[i].{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj} /
# model.norm / model.rotary_emb / lm_head``, plain nn.Linear, full causal attention (no sliding window).
SUPPORTED_MODEL_TYPES = ("llama",)
SCHEDULES = ("1f1b", "gpipe")


@dataclass(frozen=True)
class ParallelLayout:
    """How the world is cut: ``world = pp * dp * tp`` (mesh dims in that order, tp innermost).

    ``global_batch_size`` rows are consumed per optimiser step by the whole job; each data-parallel
    rank gets ``global_batch_size / dp`` rows, processed as ``n_microbatches`` micro batches of
    ``micro_batch_size`` rows (pipeline micro batches when pp > 1, gradient accumulation otherwise).
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    global_batch_size: int = 1
    micro_batch_size: int = 1
    schedule: str = "1f1b"

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def n_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    @property
    def rows_per_dp_rank(self) -> int:
        return self.global_batch_size // self.dp

    @property
    def is_model_parallel(self) -> bool:
        """True when the engine must use the manual path of :class:`ShardedPromptModel`."""
        return self.tp > 1 or self.pp > 1


def make_layout(
    *,
    world_size: int,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    global_batch_size: int,
    micro_batch_size: int,
    pipeline_schedule: str = "1f1b",
    sequence_parallel: bool = False,
    prefix: str = "prompt_learning.",
) -> ParallelLayout:
    """Check the sizes (no model needed) and return the layout; raises a one-line UserError.

    ``world_size`` is ``trainer.devices * trainer.num_nodes``; ``prefix`` is prepended to the config
    keys named in messages (``prompt_learning.model.tensor_model_parallel_size`` ...).
    """
    m = f"{prefix}model."
    world = positive_int(world_size, f"{prefix}trainer.devices x {prefix}trainer.num_nodes")
    tp = positive_int(tensor_model_parallel_size, f"{m}tensor_model_parallel_size")
    pp = positive_int(pipeline_model_parallel_size, f"{m}pipeline_model_parallel_size")
    gbs = positive_int(global_batch_size, f"{m}global_batch_size")
    mbs = positive_int(micro_batch_size, f"{m}micro_batch_size")
    if sequence_parallel:
        raise UserError(
            f"{m}sequence_parallel=true is not supported by tensor-parallel prompt learning (activations of the "
            f"frozen model are not sharded along the sequence); set {m}sequence_parallel=false"
        )
    if world % (tp * pp):
        raise UserError(
            f"{m}tensor_model_parallel_size x {m}pipeline_model_parallel_size = {tp}x{pp} does not divide the "
            f"world size {world} (trainer.devices x trainer.num_nodes); change the devices or the parallel sizes"
        )
    dp = world // (tp * pp)
    if gbs < mbs * dp:
        raise UserError(f"{m}global_batch_size: {gbs} is smaller than {m}micro_batch_size x data-parallel size = "
                        f"{mbs}x{dp}; raise it or lower the micro batch size")
    if gbs % (mbs * dp):
        raise UserError(
            f"{m}global_batch_size: {gbs} is not a multiple of {m}micro_batch_size x data-parallel size = "
            f"{mbs}x{dp}; change one of them"
        )
    schedule = str(pipeline_schedule).lower()
    if schedule not in SCHEDULES:
        raise UserError(f"{m}pipeline_schedule: '{pipeline_schedule}' is not one of {', '.join(SCHEDULES)}")
    n_mb = gbs // (mbs * dp)
    if pp > 1 and schedule == "1f1b" and n_mb < pp:
        raise UserError(
            f"{m}global_batch_size: {gbs} / ({m}micro_batch_size {mbs} x data-parallel {dp}) = {n_mb} micro batches, "
            f"fewer than the {pp} pipeline stages that 1F1B needs; raise global_batch_size, lower micro_batch_size "
            f"or set {m}pipeline_schedule=gpipe"
        )
    return ParallelLayout(tp=tp, pp=pp, dp=dp, global_batch_size=gbs, micro_batch_size=mbs, schedule=schedule)


def layout_from_config(model_cfg: Mapping[str, Any], world_size: int, prefix: str = "prompt_learning.") -> ParallelLayout:
    """:func:`make_layout` from a stage's ``model`` block (DictConfig or dict)."""
    return make_layout(
        world_size=world_size,
        tensor_model_parallel_size=model_cfg.get("tensor_model_parallel_size", 1),
        pipeline_model_parallel_size=model_cfg.get("pipeline_model_parallel_size", 1),
        global_batch_size=model_cfg.get("global_batch_size"),
        micro_batch_size=model_cfg.get("micro_batch_size"),
        pipeline_schedule=model_cfg.get("pipeline_schedule", "1f1b"),
        sequence_parallel=bool(model_cfg.get("sequence_parallel", False)),
        prefix=prefix,
    )


def check_model_for_layout(config: Any, layout: ParallelLayout, prefix: str = "prompt_learning.") -> None:
    """Check a Hugging Face ``PretrainedConfig`` against the layout; raises a one-line UserError.

    Called before the weights are loaded (a config is enough) and again by ShardedPromptModel.
    """
    m = f"{prefix}model."
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        hint = (
            " (GPT-2 uses Conv1D layers, which torch tensor parallelism does not shard)" if model_type == "gpt2" else ""
        )
        raise UserError(
            f"{m}language_model_path: model_type '{model_type}'{hint} is not supported by tensor/pipeline-parallel "
            f"prompt learning (supported: {', '.join(SUPPORTED_MODEL_TYPES)} architecture, e.g. SmolLM2, TinyLlama, "
            f"Llama); use such a checkpoint or set {m}tensor_model_parallel_size=1 and "
            f"{m}pipeline_model_parallel_size=1 (data parallelism alone works for every model)"
        )
    tp, pp = layout.tp, layout.pp
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise UserError(f"{m}language_model_path: sliding-window attention is not supported by the parallel path")
    checks = (
        ("num_attention_heads", getattr(config, "num_attention_heads", None)),
        ("num_key_value_heads", getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)),
        ("intermediate_size", getattr(config, "intermediate_size", None)),
    )
    for name, value in checks:
        if value is None or value % tp:
            raise UserError(
                f"{m}tensor_model_parallel_size={tp} does not divide the model's {name}={value}; "
                f"choose a tensor_model_parallel_size that divides it (e.g. 1)"
            )
    n_layers = getattr(config, "num_hidden_layers", None)
    if n_layers is None or n_layers < pp:
        raise UserError(
            f"{m}pipeline_model_parallel_size={pp} is larger than the model's num_hidden_layers={n_layers}; "
            f"use at most {n_layers} pipeline stages"
        )
