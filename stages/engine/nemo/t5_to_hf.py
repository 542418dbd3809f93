"""A NeMo legacy T5/mT5 ``.nemo`` written as a folder :class:`stages.engine.megatron_t5.MegatronT5ForConditionalGeneration`
opens (``config.json`` with ``model_type: megatron_t5``, ``model.safetensors``, the tokenizer with NeMo's ids).

Everything is read and checked in :func:`read` (config, tokenizer replay, weights, shapes, the padded vocabulary
against the tokenizer) before :func:`write` creates a single file, so a refused archive writes nothing.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager

from stages.common.errors import UserError
from stages.common.io import write_json

from . import t5_config, t5_tokenizer, t5_weights
from .archive import NemoArchive
from .weights import weight_files


@dataclass
class T5Parts:
    config: dict[str, Any]
    tensors: dict[str, Any]
    tokenizer: Any


def read(archive: NemoArchive, cfg: dict[str, Any]) -> T5Parts:
    import torch

    from stages.engine.megatron_t5 import MegatronT5Config, MegatronT5ForConditionalGeneration

    where = archive.where()
    arch = t5_config.parse(cfg, where)
    settings = t5_config.tokenizer_settings(cfg, where)
    if not settings["file"]:
        raise UserError(f"{where}: model_config.yaml {settings['file_key']}: missing; the .nemo has no tokenizer file")
    member = archive.artifact(str(settings["file"]), settings["file_key"])
    weight_files(archive)          # no weights: one line before the tokenizer is built
    with tempfile.TemporaryDirectory(prefix="promptlaunch-t5-tok-") as tmp:
        tok, ids = t5_tokenizer.build(settings, archive.read_bytes(member), Path(tmp), where)
    vocab = t5_config.padded_vocab(len(tok), arch)
    config = t5_config.hf_config(arch, vocab, ids)
    state = t5_weights.load(archive, arch)
    rows = state.get("embedding.word_embeddings.weight")
    if rows is not None and rows.shape[0] != vocab:
        raise UserError(f"{where}: the word embeddings have {rows.shape[0]} rows, but NeMo's tokenizer here gives "
                        f"{len(tok)} tokens, padded to {vocab} (make_vocab_size_divisible_by x "
                        "tensor_model_parallel_size); the tokenizer file does not belong to these weights")
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in MegatronT5ForConditionalGeneration(MegatronT5Config(**config)).state_dict().items()}
    t5_weights.check_shapes(state, shapes, where)
    return T5Parts(config, state, tok)


def write(parts: T5Parts, open_out: Callable[[], ContextManager[Path]], source: Path) -> None:
    from safetensors.torch import save_file

    with open_out() as out:
        parts.tokenizer.save_pretrained(str(out))
        config = {**parts.config, "promptlaunch_note": f"converted from the NeMo T5 model {source}"}
        write_json(out / "config.json", config)
        save_file({k: v.contiguous().clone() for k, v in parts.tensors.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
        write_json(out / "promptlaunch_source.json", {"nemo": str(source), "architecture": config["architectures"][0],
                                                      "vocab_size": config["vocab_size"],
                                                      "converted_to": "fp32 safetensors"})
