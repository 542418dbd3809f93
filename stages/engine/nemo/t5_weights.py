"""The weights of a NeMo legacy T5/mT5 ``.nemo`` under the parameter names of
:class:`stages.engine.megatron_t5.MegatronT5ForConditionalGeneration`, fp32, tensor-parallel shards merged.

Saved names (``MegatronT5Model.state_dict()``, NeMo v1.23.0 ``token_level_encoder_decoder.py``; also NeMo's
``scripts/nlp_language_modeling/hf_t5-v1_1_to_nemo.py``, which writes them):

  * ``enc_dec_model.encoder_embedding.{word,position}_embeddings.weight`` (``decoder_embedding.*`` is the same
    module when ``share_token_embeddings``, saved twice: the encoder's copy is read);
  * ``enc_dec_model.enc_dec_model.{encoder,decoder}.model.layers.N.<module>`` and ``...model.final_layernorm``;
  * ``enc_dec_model.tokens_head.bias`` (the head's weight is the word embeddings).

Tensor-parallel ranks (``mp_rank_XX/``) merge as NeMo's ``megatron_change_num_partitions.py`` does:
column-parallel tensors (word embeddings, QKV, cross-attention query and key_value, both first MLP linears, the
vocabulary-parallel head bias) on dim 0, a ``fast-geglu`` first linear per half (each rank holds
``[gate_r; up_r]``); row-parallel weights (attention and MLP output) on dim 1; the rest is replicated. The fused
rows stay head-interleaved (``[heads, 3, d]``, ``[heads, 2, d]``), so concatenating ranks keeps the layout.
"""
from __future__ import annotations

import re
from typing import Any

from stages.common.errors import UserError

from .archive import NemoArchive
from .t5_config import T5Arch
from .weights import weight_files

_LAYER = re.compile(r"^enc_dec_model\.enc_dec_model\.(encoder|decoder)\.model\.(layers\.\d+\.[a-z_.0-9]+|final_layernorm\.(?:weight|bias))$")
_GLOBAL = {
    "enc_dec_model.encoder_embedding.word_embeddings.weight": "embedding.word_embeddings.weight",
    "enc_dec_model.encoder_embedding.position_embeddings.weight": "embedding.position_embeddings.weight",
    "enc_dec_model.tokens_head.bias": "tokens_head_bias",
}
_SHARED_COPY = "enc_dec_model.decoder_embedding."
_COLUMN = ("embedding.word_embeddings.weight", "tokens_head_bias", "query_key_value.weight", "query_key_value.bias",
           "inter_attention.query.weight", "inter_attention.query.bias", "key_value.weight", "key_value.bias",
           "dense_h_to_4h.weight", "dense_h_to_4h.bias", "dense_h_to_4h_2.weight", "dense_h_to_4h_2.bias")
_ROW = ("self_attention.dense.weight", "inter_attention.dense.weight", "dense_4h_to_h.weight")
_FIRST_MLP = ("mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias")


def _name(key: str, where: str) -> str | None:
    k = key.replace("enc_dec_model.module.", "enc_dec_model.", 1)   # a Float16Module wrapper, if one was saved
    if k.endswith("._extra_state") or k.startswith(_SHARED_COPY):
        return None
    if k in _GLOBAL:
        return _GLOBAL[k]
    m = _LAYER.match(k)
    if m:
        return f"{m.group(1)}.{m.group(2)}"
    raise UserError(f"{where}: weight '{key}' is not a weight of NeMo's legacy T5 (enc_dec_model... names); "
                    "promptlaunch reads the NeMo launcher's T5/mT5")


def _merge(name: str, shards: list[Any], fast_glu: bool) -> Any:
    import torch

    if len(shards) == 1:
        return shards[0]
    if fast_glu and name.endswith(_FIRST_MLP):
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    if name.endswith(_COLUMN):
        return torch.cat(shards, dim=0)
    if name.endswith(_ROW):
        return torch.cat(shards, dim=1)
    return shards[0]


def load(archive: NemoArchive, arch: T5Arch) -> dict[str, Any]:
    """Every weight file read, renamed and merged (fp32); ``fast-geglu`` split into the two named halves."""
    import torch

    where = archive.where()
    grid = weight_files(archive)
    if any(p for _, p in grid) or not all(m.endswith("model_weights.ckpt") for m in grid.values()):
        raise UserError(f"{where}: holds pipeline-parallel or distributed-checkpoint weights "
                        f"({', '.join(sorted(grid.values())[:2])}); promptlaunch reads NeMo T5 weights saved with "
                        "pipeline_model_parallel_size 1 (model_weights.ckpt or mp_rank_XX/)")
    members = [grid[(tp, 0)] for tp in range(len(grid))]
    ranks = []
    for member in members:
        state = {}
        for key, value in archive.state_dict(member, where).items():
            name = _name(str(key), f"{where}: {member}")
            if name is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise UserError(f"{where}: {member}: '{key}' is not a tensor; the .nemo is damaged")
            state[name] = value.to(torch.float32)
        ranks.append(state)
    names = set(ranks[0])
    for r, state in enumerate(ranks[1:], 1):
        if set(state) != names:
            raise UserError(f"{where}: {members[r]} holds other weights than {members[0]}; the shards do not belong "
                            "together")
    merged = {n: _merge(n, [s[n] for s in ranks], arch.fast_glu) for n in sorted(names)}
    if arch.fast_glu:
        for n in [n for n in merged if n.endswith(_FIRST_MLP)]:
            merged[n], merged[n.replace("dense_h_to_4h", "dense_h_to_4h_2")] = merged[n].chunk(2, dim=0)
    return merged


def check_shapes(state: dict[str, Any], expected: dict[str, tuple[int, ...]], where: str) -> None:
    """Every parameter of the model present with its shape, nothing else: one line naming the first difference."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(n for n in set(expected) & set(state) if tuple(state[n].shape) != expected[n])
    if missing or extra or wrong:
        first = (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}" if extra else
                 f"{wrong[0]} is {tuple(state[wrong[0]].shape)}, the config needs {expected[wrong[0]]}")
        raise UserError(f"{where}: the weights do not match model_config.yaml ({first}; {len(missing)} missing, "
                        f"{len(extra)} unexpected, {len(wrong)} of another shape); the .nemo is damaged or mixed")
