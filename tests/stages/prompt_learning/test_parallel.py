"""Single-process tests of the parallel prompt-learning library: layout validation (one-line
UserError before any process-group work), stage modules == stock Hugging Face forward, exact loss
reduction under micro batching and padding."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from stages.common.errors import UserError
from stages.prompt_learning.parallel import (
    ShardedPromptModel,
    SoftPrompt,
    check_model_for_layout,
    layout_from_config,
    make_layout,
    mark_virtual_tokens,
)
from stages.prompt_learning.parallel.model import (
    PromptedLlamaStage,
    count_labelled,
    embed_with_prompt,
    lm_loss_sum,
    position_ids_from_mask,
    reference_loss,
    split_layers,
)
from tests.support.dist import N_VIRTUAL, make_batch, prompt_init
from tests.support.tiny_models import tiny_llama, tiny_llama_config


def _one_line_user_error(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


# ----------------------------------------------------------------------------- layout validation

BAD_LAYOUTS = [
    # (make_layout kwargs, needles)
    (dict(world_size=2, tensor_model_parallel_size=2, pipeline_model_parallel_size=2), ["model.tensor_model_parallel_size", "2x2", "does not divide"]),
    (dict(world_size=4, tensor_model_parallel_size=3), ["3x1", "does not divide the world size 4"]),
    (dict(world_size=4, global_batch_size=6), ["model.global_batch_size: 6", "2x4"]),
    (dict(world_size=2, pipeline_model_parallel_size=2, global_batch_size=2, micro_batch_size=2), ["1F1B", "pipeline_schedule=gpipe"]),
    (dict(world_size=2, pipeline_schedule="interleaved"), ["model.pipeline_schedule", "1f1b, gpipe"]),
    (dict(world_size=2, sequence_parallel=True), ["model.sequence_parallel=true is not supported", "=false"]),
    (dict(world_size=0), ["trainer.devices x"]),
    (dict(world_size=2, tensor_model_parallel_size=0), ["model.tensor_model_parallel_size: must be a positive integer, got 0"]),
]


@pytest.mark.parametrize("kwargs,needles", BAD_LAYOUTS)
def test_bad_layout_is_one_line_user_error(kwargs, needles):
    args = dict(global_batch_size=8, micro_batch_size=2)
    args.update(kwargs)
    with pytest.raises(UserError) as ei:
        make_layout(**args)
    _one_line_user_error(ei, *needles)
    assert not dist.is_initialized()


def test_good_layout_sizes():
    lay = make_layout(world_size=8, tensor_model_parallel_size=2, pipeline_model_parallel_size=2, global_batch_size=16, micro_batch_size=2)
    assert (lay.tp, lay.pp, lay.dp, lay.n_microbatches, lay.rows_per_dp_rank, lay.schedule) == (2, 2, 2, 4, 8, "1f1b")
    assert lay.is_model_parallel and lay.world_size == 8
    cfg = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "global_batch_size": 64, "micro_batch_size": 8}
    lay = layout_from_config(cfg, world_size=2)
    assert (lay.dp, lay.n_microbatches, lay.is_model_parallel) == (2, 4, False)


@pytest.mark.parametrize(
    "tp,pp,overrides,needles",
    [
        (3, 1, {}, ["model.tensor_model_parallel_size=3", "num_attention_heads=4"]),
        (4, 1, {}, ["model.tensor_model_parallel_size=4", "num_key_value_heads=2"]),
        (2, 1, {"intermediate_size": 129}, ["model.tensor_model_parallel_size=2", "intermediate_size=129"]),
        (1, 8, {}, ["model.pipeline_model_parallel_size=8", "num_hidden_layers=4"]),
    ],
)
def test_model_does_not_fit_layout(tp, pp, overrides, needles):
    cfg = tiny_llama_config(**overrides)
    lay = make_layout(world_size=tp * pp, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, global_batch_size=8, micro_batch_size=1)
    with pytest.raises(UserError) as ei:
        check_model_for_layout(cfg, lay)
    _one_line_user_error(ei, *needles)


def test_gpt2_is_rejected_with_a_clear_error():
    from transformers import GPT2Config

    lay = make_layout(world_size=2, tensor_model_parallel_size=2, global_batch_size=8, micro_batch_size=1)
    with pytest.raises(UserError) as ei:
        check_model_for_layout(GPT2Config(n_layer=2, n_embd=64, n_head=4), lay)
    _one_line_user_error(ei, "model_type 'gpt2'", "Conv1D", "tensor_model_parallel_size=1")


def test_trainer_rejects_impossible_layout_before_any_process_group_work():
    # TP=3 does not divide 4 heads: ShardedPromptModel raises before it looks for a process group
    lay = make_layout(world_size=3, tensor_model_parallel_size=3, global_batch_size=3, micro_batch_size=1)
    with pytest.raises(UserError) as ei:
        ShardedPromptModel(tiny_llama(), SoftPrompt(N_VIRTUAL, 64), lay, device="cpu")
    _one_line_user_error(ei, "model.tensor_model_parallel_size=3")
    assert not dist.is_initialized()


# ----------------------------------------------------------------------------- model pieces


def test_mark_virtual_tokens_and_split_layers():
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    virt = torch.tensor([[False, True, True, False, True]])
    assert mark_virtual_tokens(ids, virt).tolist() == [[5, -1, -2, 8, -3]]
    assert mark_virtual_tokens(ids, virt, first_row=4).tolist() == [[5, -5, -6, 8, -7]]
    assert [list(r) for r in split_layers(5, 2)] == [[0, 1, 2], [3, 4]]
    assert [list(r) for r in split_layers(4, 4)] == [[0], [1], [2], [3]]


def test_stages_chained_equal_hf_forward():
    """Stage 0 -> stage 1 (hidden states only; mask/positions recomputed per stage) gives the stock
    HF logits on every non-padding position, for right and left padded rows."""
    model = tiny_llama()
    prompt = SoftPrompt(N_VIRTUAL, 64, prompt_init())
    b = make_batch(0)
    mask = b["attention_mask"]
    with torch.no_grad():
        emb = embed_with_prompt(model.get_input_embeddings(), prompt(), b["input_ids"])
        hf = model(inputs_embeds=emb, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        s0 = PromptedLlamaStage(model, prompt, range(0, 3), is_first=True, is_last=False)
        s1 = PromptedLlamaStage(model, None, range(3, 4), is_first=False, is_last=True)
        ours = s1(s0(b["input_ids"], attention_mask=mask), attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], hf[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("micro_batch_size,pad_to", [(8, None), (2, None), (1, 20)])
def test_single_process_trainer_equals_reference(micro_batch_size, pad_to):
    """Global-token-mean loss and gradient are exact under micro batching and extra right padding."""
    model = tiny_llama()
    ref_prompt = SoftPrompt(N_VIRTUAL, 64, prompt_init())
    b = make_batch(1)
    ref = reference_loss(model, ref_prompt, b)
    ref.backward()
    lay = make_layout(world_size=1, global_batch_size=8, micro_batch_size=micro_batch_size)
    sharded = ShardedPromptModel(tiny_llama(), SoftPrompt(N_VIRTUAL, 64, prompt_init()), lay, device="cpu", pad_to=pad_to)
    loss = sharded.train_step(b)
    torch.testing.assert_close(loss, ref.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sharded.prompt.weight.grad, ref_prompt.weight.grad, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(sharded.eval_step(b), ref.detach(), atol=1e-6, rtol=1e-6)
    # a mean of per-micro-batch means would differ: the rows have different numbers of labels
    per_mb = [lm_loss_sum(*_logits_labels(model, ref_prompt, b, i)) / count_labelled(b["labels"][i : i + 1]) for i in range(8)]
    assert abs(torch.stack(per_mb).mean().item() - ref.item()) > 1e-3


def _logits_labels(model, prompt, b, i):
    sl = slice(i, i + 1)
    with torch.no_grad():
        emb = embed_with_prompt(model.get_input_embeddings(), prompt(), b["input_ids"][sl])
        m = b["attention_mask"][sl]
        return model(inputs_embeds=emb, attention_mask=m, position_ids=position_ids_from_mask(m)).logits, b["labels"][sl]


def test_trainer_checks_batch_rows():
    lay = make_layout(world_size=1, global_batch_size=8, micro_batch_size=2)
    sharded = ShardedPromptModel(tiny_llama(), SoftPrompt(N_VIRTUAL, 64, prompt_init()), lay, device="cpu")
    b = {k: v[:4] for k, v in make_batch(0).items()}
    with pytest.raises(ValueError, match="global_batch_size / dp = 8"):
        sharded.train_step(b)
