"""A ``.nemo`` GPT model written as the files of the equivalent Hugging Face model (config.json, safetensors,
tokenizer), into a folder the caller owns (:func:`stages.engine.base_model.convert_nemo` writes it atomically
into the cache).

Why direct tensors and not a NeMo/HF converter: NeMo has no generic GPT->HF converter and its per-model ones need
NeMo itself; the mapping is a few reshapes (fused QKV rows are ``[groups, heads_per_group + 2, head_dim]``, GPT-2's
``c_attn`` wants ``[3, heads, head_dim]`` and Conv1D weights transposed), checked against megatron-core's own
forward in ``tests/stages/engine/test_nemo_megatron.py``. A T5/mT5 config (``encoder`` and ``decoder`` sections)
is handed to :mod:`.t5_to_hf` (no HF class computes it: our own model class).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ContextManager

from stages.common.errors import UserError
from stages.common.io import write_json

from . import gpt_config, t5_config, t5_to_hf, weights
from .archive import NemoArchive

# tokenizer libraries whose files are a GPT-2 byte-level BPE (vocab.json + merges.txt)
_BPE_LIBRARIES = ("megatron", "huggingface")


def write(path: Path, key: str, open_out: Callable[[], ContextManager[Path]], scratch: Path | None = None) -> None:
    """Read the ``.nemo`` at ``path`` (``key`` names the config entry), then write the HF folder into the folder
    ``open_out()`` yields, with ``promptlaunch_source.json`` last. Every check and every read comes before
    ``open_out`` is called, so a refused archive writes nothing (``scratch``: where a distributed checkpoint in a
    tar is unpacked for reading, in a temporary folder removed afterwards)."""
    with NemoArchive(path, key).opened() as archive:
        where = archive.where()
        cfg = archive.model_config()
        if t5_config.is_t5(cfg):
            t5_parts = t5_to_hf.read(archive, cfg)
        else:
            t5_parts = None
            arch = gpt_config.parse(cfg, where)
            tok_members = _tokenizer_members(archive, cfg)
            weights.weight_files(archive)          # no weights: one line before anything is read
            state = weights.load(archive, arch, scratch)
            tensors = _hf_tensors(state, arch, where)
            vocab = int(state["embedding.word_embeddings.weight"].shape[0])
            tok_files = {name: archive.read_bytes(member) for name, member in tok_members.items()}
    if t5_parts is not None:
        t5_to_hf.write(t5_parts, open_out, path)
        return

    from safetensors.torch import save_file

    with open_out() as out:
        ids = _write_tokenizer(tok_files, tok_members, out, vocab, f"{key}={path}")
        config = gpt_config.hf_config(arch, vocab, ids)
        config["promptlaunch_note"] = f"converted from the NeMo model {path}"
        write_json(out / "config.json", config)
        save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
        write_json(out / "promptlaunch_source.json", {"nemo": str(path), "architecture": config["architectures"][0],
                                                      "vocab_size": vocab, "converted_to": "fp32 safetensors"})


def _tokenizer_members(archive: NemoArchive, cfg: dict) -> dict[str, str]:
    """The archive members of the tokenizer files, checked before any weight is read."""
    tok = cfg.get("tokenizer") or {}
    where = archive.where()
    library = tok.get("library")
    if library not in _BPE_LIBRARIES or not tok.get("vocab_file") or not tok.get("merge_file"):
        raise UserError(f"{where}: model_config.yaml tokenizer.library: {library} (type {tok.get('type')}) is not "
                        "read yet; promptlaunch reads the GPT-2 BPE tokenizer (vocab_file + merge_file) of the "
                        "NeMo launcher's GPT models")
    return {"vocab.json": archive.artifact(str(tok["vocab_file"]), "tokenizer.vocab_file"),
            "merges.txt": archive.artifact(str(tok["merge_file"]), "tokenizer.merge_file")}


def _write_tokenizer(files: dict[str, bytes], members: dict[str, str], out: Path, vocab: int, where: str) -> dict:
    from transformers import GPT2TokenizerFast

    raw = out / "nemo_tokenizer"
    raw.mkdir()
    for name, data in files.items():
        (raw / name).write_bytes(data)
    try:
        tok = GPT2TokenizerFast.from_pretrained(str(raw))
    except Exception as exc:
        raise UserError(f"{where}: its tokenizer files {', '.join(members.values())} are not a GPT-2 BPE "
                        f"({type(exc).__name__}: {str(exc)[:120]}); the .nemo is damaged") from None
    if len(tok) > vocab:
        raise UserError(f"{where}: the tokenizer has {len(tok)} tokens but the embedding only {vocab} rows; the "
                        "tokenizer files do not belong to these weights")
    tok.save_pretrained(str(out))
    for f in raw.iterdir():
        f.unlink()
    raw.rmdir()
    eos = tok.convert_tokens_to_ids("<|endoftext|>") if "<|endoftext|>" in tok.get_vocab() else None
    return {"bos_token_id": eos, "eos_token_id": eos}


def _hf_tensors(state: dict[str, Any], arch: gpt_config.GPTArch, where: str) -> dict[str, Any]:
    need = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight"]
    if arch.family == "gpt2":
        need.append("embedding.position_embeddings.weight")
    if not arch.tied:
        need.append("output_layer.weight")
    for i in range(arch.num_layers):
        for part in ("input_layernorm", "self_attention.linear_qkv", "self_attention.linear_proj",
                     "pre_mlp_layernorm", "mlp.linear_fc1", "mlp.linear_fc2"):
            need.append(f"decoder.layers.{i}.{part}.weight")
    lost = [n for n in need if n not in state]
    if lost:
        raise UserError(f"{where}: weights missing for model_config.yaml's {arch.num_layers} layers "
                        f"({', '.join(lost[:3])}); the weights do not match the config")
    return _gpt2(state, arch) if arch.family == "gpt2" else _llama(state, arch)


def _qkv_rows(t: Any, arch: gpt_config.GPTArch) -> tuple[Any, Any, Any]:
    """Split fused QKV rows ``[groups, q_per_group + 2, head_dim, ...]`` into q, k, v (each heads-major)."""
    per = arch.heads // arch.groups
    rest = tuple(t.shape[1:])
    g = t.reshape(arch.groups, per + 2, arch.head_dim, *rest)
    q = g[:, :per].reshape(arch.heads * arch.head_dim, *rest)
    k = g[:, per].reshape(arch.groups * arch.head_dim, *rest)
    v = g[:, per + 1].reshape(arch.groups * arch.head_dim, *rest)
    return q, k, v


def _gpt2(s: dict[str, Any], arch: gpt_config.GPTArch) -> dict[str, Any]:
    import torch

    out = {"transformer.wte.weight": s["embedding.word_embeddings.weight"],
           "transformer.wpe.weight": s["embedding.position_embeddings.weight"],
           "transformer.ln_f.weight": s["decoder.final_layernorm.weight"],
           "transformer.ln_f.bias": s["decoder.final_layernorm.bias"]}
    if not arch.tied:
        out["lm_head.weight"] = s["output_layer.weight"]
    for i in range(arch.num_layers):
        src, dst = f"decoder.layers.{i}.", f"transformer.h.{i}."
        out[dst + "ln_1.weight"] = s[src + "input_layernorm.weight"]
        out[dst + "ln_1.bias"] = s[src + "input_layernorm.bias"]
        out[dst + "ln_2.weight"] = s[src + "pre_mlp_layernorm.weight"]
        out[dst + "ln_2.bias"] = s[src + "pre_mlp_layernorm.bias"]
        out[dst + "attn.c_attn.weight"] = torch.cat(_qkv_rows(s[src + "self_attention.linear_qkv.weight"], arch)).T
        out[dst + "attn.c_attn.bias"] = torch.cat(_qkv_rows(s[src + "self_attention.linear_qkv.bias"], arch))
        out[dst + "attn.c_proj.weight"] = s[src + "self_attention.linear_proj.weight"].T
        out[dst + "attn.c_proj.bias"] = s[src + "self_attention.linear_proj.bias"]
        out[dst + "mlp.c_fc.weight"] = s[src + "mlp.linear_fc1.weight"].T
        out[dst + "mlp.c_fc.bias"] = s[src + "mlp.linear_fc1.bias"]
        out[dst + "mlp.c_proj.weight"] = s[src + "mlp.linear_fc2.weight"].T
        out[dst + "mlp.c_proj.bias"] = s[src + "mlp.linear_fc2.bias"]
    return out


def _llama(s: dict[str, Any], arch: gpt_config.GPTArch) -> dict[str, Any]:
    out = {"model.embed_tokens.weight": s["embedding.word_embeddings.weight"],
           "model.norm.weight": s["decoder.final_layernorm.weight"]}
    if not arch.tied:
        out["lm_head.weight"] = s["output_layer.weight"]
    for i in range(arch.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = s[src + "input_layernorm.weight"]
        out[dst + "post_attention_layernorm.weight"] = s[src + "pre_mlp_layernorm.weight"]
        for wb in ("weight", "bias") if arch.bias else ("weight",):
            q, k, v = _qkv_rows(s[f"{src}self_attention.linear_qkv.{wb}"], arch)
            out[f"{dst}self_attn.q_proj.{wb}"], out[f"{dst}self_attn.k_proj.{wb}"], out[f"{dst}self_attn.v_proj.{wb}"] = q, k, v
            out[f"{dst}self_attn.o_proj.{wb}"] = s[f"{src}self_attention.linear_proj.{wb}"]
            gate, up = s[f"{src}mlp.linear_fc1.{wb}"].chunk(2, dim=0)
            out[f"{dst}mlp.gate_proj.{wb}"], out[f"{dst}mlp.up_proj.{wb}"] = gate, up
            out[f"{dst}mlp.down_proj.{wb}"] = s[f"{src}mlp.linear_fc2.{wb}"]
    return out
