"""The weights of a ``.nemo`` GPT model as ONE canonical state dict: mcore local-spec names without the ``model.``
prefix (``decoder.layers.N.self_attention.linear_qkv.weight`` ...), fp32, tensor and pipeline shards merged.

Why canonical: NeMo 1.x wrote the same tensors under three spellings (legacy ``language_model.encoder...``, mcore
with TransformerEngine's fused layernorm names, mcore local spec) and in up to TPxPP files; the tensors map 1:1
(NeMo's ``convert_nemo_gpt_to_mcore.py``), so one rename table and one merge serve every case and the HF mapping
(:mod:`.to_hf`) reads one layout.

Merging tensor-parallel ranks (NeMo's ``megatron_change_num_partitions.py``): column-parallel tensors (QKV, the
first MLP linear, word embeddings, the output layer) concatenate on dim 0, a gated first MLP linear per half
(each rank holds ``[gate_r; up_r]``); row-parallel weights (attention and MLP output) on dim 1; the rest is
replicated. Pipeline stages number their layers from 0; stage ``p`` holds layers ``p*L/PP ...``.
"""
from __future__ import annotations

import re
from typing import Any

from stages.common.errors import UserError

from . import dist_ckpt
from .archive import NemoArchive
from .gpt_config import GPTArch

_RANK_DIR = re.compile(r"^(?:mp_rank_(\d+)|tp_rank_(\d+)_pp_rank_(\d+))/model_weights\.ckpt$")
_LEGACY_LAYER = {
    "input_layernorm": "input_layernorm",
    "self_attention.query_key_value": "self_attention.linear_qkv",
    "self_attention.dense": "self_attention.linear_proj",
    "post_attention_layernorm": "pre_mlp_layernorm",
    "mlp.dense_h_to_4h": "mlp.linear_fc1",
    "mlp.dense_h_to_4h_2": "mlp.linear_fc1_up",     # non-fast GLU: the second half, concatenated after merging
    "mlp.dense_4h_to_h": "mlp.linear_fc2",
}
_TE_FUSED = {
    "self_attention.linear_qkv.layer_norm_": "input_layernorm.",
    "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm.",
}
_MCORE_LAYER = ("input_layernorm.", "self_attention.linear_qkv.", "self_attention.linear_proj.",
                "pre_mlp_layernorm.", "mlp.linear_fc1.", "mlp.linear_fc2.")
_GLOBAL = {
    "embedding.word_embeddings.weight": "embedding.word_embeddings.weight",
    "embedding.position_embeddings.weight": "embedding.position_embeddings.weight",
    "decoder.final_layernorm.weight": "decoder.final_layernorm.weight",
    "decoder.final_layernorm.bias": "decoder.final_layernorm.bias",
    "output_layer.weight": "output_layer.weight",
    "language_model.embedding.word_embeddings.weight": "embedding.word_embeddings.weight",
    "language_model.embedding.position_embeddings.weight": "embedding.position_embeddings.weight",
    "language_model.encoder.final_layernorm.weight": "decoder.final_layernorm.weight",
    "language_model.encoder.final_layernorm.bias": "decoder.final_layernorm.bias",
    "language_model.output_layer.weight": "output_layer.weight",
}
_DERIVED = ("rotary_pos_emb.inv_freq",)      # recomputed by the HF model from rotary_base
_COLUMN = ("embedding.word_embeddings.weight", "output_layer.weight", "self_attention.linear_qkv.weight",
           "self_attention.linear_qkv.bias", "mlp.linear_fc1.weight", "mlp.linear_fc1.bias",
           "mlp.linear_fc1_up.weight", "mlp.linear_fc1_up.bias")
_ROW = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")


def weight_files(archive: NemoArchive) -> dict[tuple[int, int], str]:
    """``(tp, pp) -> member`` of every weight file, the grid complete; one line when there is none."""
    where = archive.where()
    if archive.has("model_weights.ckpt"):
        return {(0, 0): "model_weights.ckpt"}
    if dist_ckpt.has_dist_checkpoint(archive):
        return {(0, 0): dist_ckpt.PREFIX}
    grid: dict[tuple[int, int], str] = {}
    for name in archive.names:
        m = _RANK_DIR.match(name)
        if m:
            tp = int(m.group(1) if m.group(1) is not None else m.group(2))
            grid[(tp, int(m.group(3) or 0))] = name
    if not grid:
        if any(n.startswith(dist_ckpt.PREFIX) for n in archive.names):
            raise UserError(f"{where}: holds a distributed checkpoint folder {dist_ckpt.PREFIX} without its "
                            "metadata.json; the .nemo is incomplete: save or copy it again")
        raise UserError(f"{where}: holds no weights (no model_weights.ckpt, mp_rank_XX/ or "
                        f"tp_rank_XX_pp_rank_YYY/; members: {', '.join(archive.names[:8]) or 'none'}); the .nemo "
                        "is incomplete: save or copy it again")
    tps = 1 + max(t for t, _ in grid)
    pps = 1 + max(p for _, p in grid)
    missing = [f"tp {t} pp {p}" for t in range(tps) for p in range(pps) if (t, p) not in grid]
    if missing:
        raise UserError(f"{where}: weight shards missing ({', '.join(missing[:4])}); the .nemo is incomplete")
    return grid


def canonical_name(key: str, where: str) -> str | None:
    """The canonical name of one saved key; None for what is skipped (TE ``_extra_state``, derived buffers)."""
    k = key
    for prefix in ("model.module.", "model.", "module."):
        if k.startswith(prefix):
            k = k[len(prefix):]
            break
    if k.endswith("._extra_state") or k.endswith(_DERIVED):
        return None
    if k in _GLOBAL:
        return _GLOBAL[k]
    m = re.match(r"^(?:language_model\.encoder|decoder)\.layers\.(\d+)\.(.+)$", k)
    if m:
        i, rest = m.group(1), m.group(2)
        if k.startswith("language_model."):
            for old, new in _LEGACY_LAYER.items():
                if rest.startswith(old + "."):
                    return f"decoder.layers.{i}.{new}{rest[len(old):]}"
        else:
            for old, new in _TE_FUSED.items():
                if rest.startswith(old):
                    return f"decoder.layers.{i}.{new}{rest[len(old):]}"
            if rest.startswith(_MCORE_LAYER) and rest.rsplit(".", 1)[-1] in ("weight", "bias"):
                return f"decoder.layers.{i}.{rest}"
    raise UserError(f"{where}: weight '{key}' is not a NeMo GPT weight promptlaunch reads (legacy "
                    "language_model.encoder..., or mcore decoder... names; TransformerEngine layers of the legacy "
                    "path are not read yet)")


def load(archive: NemoArchive, arch: GPTArch, scratch: Any = None) -> dict[str, Any]:
    """Read, rename and merge every weight file into the canonical state dict (fp32); ``scratch``: where a
    distributed checkpoint inside a tar is unpacked for reading (a temporary folder, removed after)."""
    import torch

    where = archive.where()
    grid = weight_files(archive)
    if grid[(0, 0)] == dist_ckpt.PREFIX:
        return _canonical(dist_ckpt.read(archive, arch.num_layers, scratch), f"{where}: {dist_ckpt.PREFIX}")
    tps = 1 + max(t for t, _ in grid)
    pps = 1 + max(p for _, p in grid)
    if arch.num_layers % pps:
        raise UserError(f"{where}: {pps} pipeline stages do not split model_config.yaml num_layers: "
                        f"{arch.num_layers} evenly; promptlaunch reads only even pipeline splits")
    per_stage = arch.num_layers // pps
    merged: dict[str, Any] = {}
    for pp in range(pps):
        members = [grid[(tp, pp)] for tp in range(tps)]
        ranks = [_canonical(archive.state_dict(m, where), f"{where}: {m}") for m in members]
        names = set(ranks[0])
        for r, state in enumerate(ranks[1:], 1):
            if set(state) != names:
                raise UserError(f"{where}: {grid[(r, pp)]} holds other weights than {grid[(0, pp)]}; the shards "
                                "do not belong together")
        glu_in_fc1 = not any(".mlp.linear_fc1_up." in n for n in names)   # fast-*glu / mcore: [gate; up] per rank
        for name in sorted(names):
            tensor = _merge_tp(name, [s[name] for s in ranks], arch, glu_in_fc1)
            if name.startswith("decoder.layers."):
                local, rest = name[len("decoder.layers."):].split(".", 1)
                name = f"decoder.layers.{pp * per_stage + int(local)}.{rest}"
            merged.setdefault(name, tensor)   # the last stage repeats the tied word embeddings: the first stays
    for i in range(arch.num_layers):
        up_w = merged.pop(f"decoder.layers.{i}.mlp.linear_fc1_up.weight", None)
        if up_w is not None:
            merged[f"decoder.layers.{i}.mlp.linear_fc1.weight"] = torch.cat([merged[f"decoder.layers.{i}.mlp.linear_fc1.weight"], up_w])
            up_b = merged.pop(f"decoder.layers.{i}.mlp.linear_fc1_up.bias", None)
            if up_b is not None:
                merged[f"decoder.layers.{i}.mlp.linear_fc1.bias"] = torch.cat([merged[f"decoder.layers.{i}.mlp.linear_fc1.bias"], up_b])
    return merged


def _canonical(state: dict[str, Any], where: str) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    for key, value in state.items():
        name = canonical_name(str(key), where)
        if name is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{where}: '{key}' is not a tensor; the .nemo is damaged")
        out[name] = value.to(torch.float32)
    return out


def _merge_tp(name: str, shards: list[Any], arch: GPTArch, glu_in_fc1: bool) -> Any:
    import torch

    if len(shards) == 1:
        return shards[0]
    if name.endswith(_COLUMN):
        if arch.gated and glu_in_fc1 and name.endswith(("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")):
            halves = [s.chunk(2, dim=0) for s in shards]
            return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
        return torch.cat(shards, dim=0)
    if name.endswith(_ROW):
        return torch.cat(shards, dim=1)
    return shards[0]
