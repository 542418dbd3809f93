"""The distributed checkpoint of an mcore ``.nemo`` (NeMo >= 1.21): the folder ``model_weights/`` with
``metadata.json`` naming the backend, read with PyTorch's own ``torch.distributed.checkpoint`` reader and no
process group (as NeMo's exporter does), then unstacked into one tensor per layer.

Why this way: megatron-core saves every tensor globally (no per-rank files; tensor-parallel shards are already
merged, a gated ``linear_fc1`` is the global ``[gate; up]``) with the layer index dropped and a leading
``num_layers`` axis, under TransformerEngine's names (``linear_qkv.layer_norm_weight``). ``torch_dist`` is the
backend megatron-core still writes; ``zarr`` (megatron-core <= 0.6, NeMo 2.0rc0) is refused for now.

The ``.metadata`` file is a pickle; it is read with an unpickler that builds only checkpoint-metadata classes,
dtypes and sizes, so a crafted file cannot run code (tensors themselves are read with ``weights_only``).
"""
from __future__ import annotations

import json
import pickle
import tempfile
from pathlib import Path
from typing import Any

from stages.common.errors import UserError

from .archive import NemoArchive

PREFIX = "model_weights/"


def has_dist_checkpoint(archive: NemoArchive) -> bool:
    return archive.has(PREFIX + "metadata.json")


def read(archive: NemoArchive, num_layers: int, scratch: Path | None) -> dict[str, Any]:
    """``saved key -> tensor`` with the layer index restored (``model.decoder.layers.3.mlp...``), fp32;
    ``_extra_state`` and other byte entries left out."""
    where = archive.where()
    try:
        meta = json.loads(archive.read_bytes(PREFIX + "metadata.json"))
        backend = meta["sharded_backend"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{where}: {PREFIX}metadata.json is not a distributed-checkpoint metadata file ({exc}); "
                        "the .nemo is damaged") from None
    if backend != "torch_dist":
        raise UserError(f"{where}: its distributed checkpoint uses the '{backend}' backend, which promptlaunch does "
                        "not read yet (torch_dist only); convert it with NeMo's "
                        "scripts/checkpoint_converters/convert_zarr_to_torch_dist.py")
    if archive.path.is_dir():
        return _load(archive.path / PREFIX, num_layers, where)
    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".nemo-model-weights-", dir=scratch) as tmp:
        for name in archive.names:
            if name.startswith(PREFIX):
                dest = Path(tmp) / name[len(PREFIX):]
                dest.parent.mkdir(parents=True, exist_ok=True)
                with archive.member(name) as src, open(dest, "wb") as out:
                    while chunk := src.read(8 << 20):
                        out.write(chunk)
        return _load(Path(tmp), num_layers, where)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        import torch

        obj = super().find_class(module, name)
        if module.startswith("torch.distributed.checkpoint.") and isinstance(obj, type):
            return obj
        if isinstance(obj, torch.dtype) or obj is torch.Size or (module, name) in (
                ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")):
            return obj
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def _load(folder: Path, num_layers: int, where: str) -> dict[str, Any]:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    class Reader(dcp.FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            with open(folder / ".metadata", "rb") as fh:
                metadata = _MetadataUnpickler(fh).load()
            if getattr(metadata, "storage_meta", None) is None:
                from torch.distributed.checkpoint.metadata import StorageMeta
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    try:
        reader = Reader(str(folder))
        metadata = reader.read_metadata()
        state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
                 for k, m in metadata.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
        dcp.load(state, storage_reader=reader, no_dist=True)
    except Exception as exc:  # a damaged or foreign checkpoint
        raise UserError(f"{where}: its distributed checkpoint {PREFIX} cannot be read ({type(exc).__name__}: "
                        f"{str(exc)[:160]}); the .nemo is damaged or truncated: copy it again") from None
    out: dict[str, Any] = {}
    for key, tensor in state.items():
        head, sep, rest = key.partition("decoder.layers.")
        if not sep:
            out[key] = tensor.to(torch.float32)
            continue
        if tensor.shape[0] != num_layers:
            raise UserError(f"{where}: {PREFIX} '{key}' stacks {tensor.shape[0]} layers but model_config.yaml "
                            f"num_layers is {num_layers}; the weights do not match the config")
        for i in range(num_layers):
            out[f"{head}decoder.layers.{i}.{rest}"] = tensor[i].to(torch.float32).clone()
    return out
