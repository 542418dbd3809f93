"""Tiny NeMo legacy T5/mT5 ``.nemo`` fixtures (RANDOM or megatron-core weights, never real T5 weights: none exist
offline), written as NeMo 1.x writes them (:func:`tests.support.nemo.write_nemo`).

  * configs: the NeMo launcher's ``t5/220m.yaml`` / ``mt5/390m.yaml`` (NML 24.05) shrunk (2 encoder and 3 decoder
    layers, hidden 32, 4 heads of 8, FFN 48), every architecture key kept as the launcher wrote it;
  * tokenizers, as the launcher's data preparation fetches them, shrunk: T5 a BERT cased WordPiece ``vocab.txt``
    (``[PAD]`` 0, ``[unused*]``, ``[UNK] [CLS] [SEP] [MASK]``, then words, characters and ``##`` characters, built
    from :func:`tests.support.tiny_models.corpus`); mT5 a sentencepiece Unigram model trained here with the id layout
    of Google's ``mc4.250000.100extra`` model the launcher downloads (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, no BOS),
    or sentencepiece's own defaults (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, no pad) for NeMo's other branch;
  * weights in NeMo's legacy names (``enc_dec_model...``), from megatron-core's ``T5Model`` (:func:`legacy_from_mcore`)
    or seeded random (:func:`random_legacy_state`).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from tests.support import nemo

UUID_TOK = "00112233445566778899aabbccddeeff"
SENTINELS = 100
SIZES = {"num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 48, "num_attention_heads": 4, "kv_channels": 8}
DECODER_LAYERS = 3


def _stack(**over: Any) -> dict[str, Any]:
    """One ``encoder`` / ``decoder`` section of the launcher's t5/220m.yaml, tiny."""
    return {**SIZES, "init_method_std": 0.015, "hidden_dropout": 0.1, "attention_dropout": 0.1,
            "position_embedding_type": "learned_absolute", "relative_attention_num_buckets": 32,
            "relative_attention_max_distance": 128, "relative_position_bias_self_attention_only": True,
            "apply_query_key_layer_scaling": True, "layernorm_epsilon": 1e-5, "persist_layer_norm": True,
            "bias_activation_fusion": True, "grad_div_ar_fusion": True, "masked_softmax_fusion": True,
            "bias_dropout_add_fusion": True, "bias": True, "normalization": "layernorm", "arch": "transformer",
            "activation": "geglu", "headscale": False, "transformer_block_type": "pre_ln", "openai_gelu": False,
            "onnx_safe": False, "fp32_residual_connection": False, **over}


def t5_config(family: str = "t5", **over: Any) -> dict[str, Any]:
    """``model_config.yaml`` of a tiny launcher T5 (``family="t5"``: BERT vocab.txt) or mT5 (sentencepiece)."""
    tok = ({"library": "megatron", "type": "BertWordPieceCase", "model": None,
            "vocab_file": f"nemo:{UUID_TOK}_vocab.txt", "merge_file": None, "num_sentinel_tokens": SENTINELS}
           if family == "t5" else
           {"library": "sentencepiece", "type": None, "model": f"nemo:{UUID_TOK}_mt5_tokenizer.model",
            "vocab_file": None, "merge_file": None, "num_sentinel_tokens": SENTINELS})
    cfg = {"target": "nemo.collections.nlp.models.language_modeling.megatron_t5_model.MegatronT5Model",
           "nemo_version": "1.23.0", "precision": 32, "micro_batch_size": 4, "global_batch_size": 4,
           "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "make_vocab_size_divisible_by": 128,
           "megatron_amp_O2": False, "seq_length": 512, "max_position_embeddings": 512,
           "encoder": _stack(), "decoder": _stack(num_layers=DECODER_LAYERS), "tokenizer": tok,
           "share_token_embeddings": True, "share_decoder_tokens_head_embeddings": True,
           "data": {"dataset_type": "t5", "seq_length": 512, "seq_length_dec": 128}}
    for k, v in over.items():
        if k in ("encoder", "decoder"):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


def bert_vocab_lines() -> list[str]:
    """A tiny cased BERT WordPiece vocabulary: the words of the tiny corpus and the SQuAD fixture, every character of
    them and of ASCII, alone and as ``##`` continuation, so English text never becomes [UNK]."""
    from transformers.models.bert.tokenization_bert_legacy import BasicTokenizer

    from tests.support.tiny_models import corpus

    words: set[str] = set()
    basic = BasicTokenizer(do_lower_case=False)
    for line in corpus("t5") + _squad_lines():
        words.update(basic.tokenize(line))
    import string

    chars = sorted({c for w in words for c in w} | set(string.ascii_letters + string.digits + string.punctuation + "–—"))
    return (["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars
            + [f"##{c}" for c in chars] + sorted(w for w in words if len(w) > 1))


def _squad_lines() -> list[str]:
    import json

    from tests.support.paths import ROOT

    lines: list[str] = []
    for name in ("train-v1.1.json", "dev-v1.1.json"):
        for art in json.loads((ROOT / "tests" / "fixtures" / "squad_tiny" / name).read_text())["data"]:
            for para in art["paragraphs"]:
                lines.append(para["context"])
                for qa in para["qas"]:
                    lines += [qa["question"]] + [a["text"] for a in qa["answers"]]
    return lines


def spm_model(layout: str = "mc4") -> bytes:
    """A sentencepiece Unigram model trained on the tiny corpus + the SQuAD fixture (deterministic: one thread, no
    shuffling). ``mc4``: Google's mC4 id layout; ``default``: sentencepiece's defaults."""
    import sentencepiece as spm

    from tests.support.tiny_models import corpus

    ids = (dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1) if layout == "mc4"
           else dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1))
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter((corpus("mt5") + _squad_lines()) * 2), model_writer=out,
                                   model_type="unigram", vocab_size=700, hard_vocab_limit=False,
                                   character_coverage=1.0, num_threads=1, shuffle_input_sentence=False,
                                   minloglevel=2, **ids)
    return out.getvalue()


def tokenizer_member(family: str, layout: str = "mc4") -> dict[str, bytes]:
    if family == "t5":
        return {f"{UUID_TOK}_vocab.txt": ("\n".join(bert_vocab_lines()) + "\n").encode()}
    return {f"{UUID_TOK}_mt5_tokenizer.model": spm_model(layout)}


def nemo_vocab_size(family: str, tok_files: dict[str, bytes], cfg: dict[str, Any]) -> int:
    """The padded vocabulary NeMo builds, counted from its documented procedure: BERT's vocab.txt lines + the
    sentinels; the sentencepiece pieces + 4 + the sentinels (mC4 layout: <cls> <sep> <mask> <bos>; sentencepiece's
    defaults: <cls> <sep> <mask> <pad>)."""
    import sentencepiece as spm

    data = next(iter(tok_files.values()))
    if family == "t5":
        size = len(data.decode().splitlines()) + SENTINELS
    else:
        sp = spm.SentencePieceProcessor(model_proto=data)
        size = sp.get_piece_size() + 4 + SENTINELS
    multiple = cfg["make_vocab_size_divisible_by"] * cfg["tensor_model_parallel_size"]
    return -(-size // multiple) * multiple


def write(path: Path, cfg: dict[str, Any], weights: dict[str, Any], tok_files: dict[str, bytes], **kw: Any) -> Path:
    return nemo.write_nemo(path, cfg, weights, files=tok_files, **kw)


_LAYER = {"input_layernorm": "input_layernorm", "self_attention.linear_qkv": "self_attention.query_key_value",
          "self_attention.linear_proj": "self_attention.dense", "cross_attention.linear_q": "inter_attention.query",
          "cross_attention.linear_kv": "inter_attention.key_value", "cross_attention.linear_proj": "inter_attention.dense",
          "mlp.linear_fc2": "mlp.dense_4h_to_h"}


def legacy_from_mcore(state: dict[str, Any], fast_glu: bool = False) -> dict[str, Any]:
    """megatron-core ``T5Model`` state (one rank) -> NeMo's legacy names, as ``MegatronT5Model.state_dict()`` holds
    them: the shared embedding saved under both ``encoder_embedding`` and ``decoder_embedding``; the encoder's
    ``pre_mlp_layernorm`` is legacy ``post_attention_layernorm``; the decoder's ``pre_cross_attn_layernorm`` /
    ``pre_mlp_layernorm`` are ``post_attention_layernorm`` / ``post_inter_attention_layernorm``; ``linear_fc1``
    ``[gate; up]`` is ``dense_h_to_4h`` + ``dense_h_to_4h_2`` (``fast-geglu``: kept as one ``dense_h_to_4h``)."""
    out: dict[str, Any] = {}
    for k, v in state.items():
        if v is None or k.endswith("_extra_state") or k.startswith(("output_layer.", "position_embeddings.")):
            continue
        if k.startswith("embedding."):
            for side in ("encoder", "decoder"):
                out[f"enc_dec_model.{side}_embedding.{k[len('embedding.'):]}"] = v
            continue
        if k == "lm_head.output_layer.bias":
            out["enc_dec_model.tokens_head.bias"] = v
            continue
        side, rest = k.split(".", 1)
        prefix = f"enc_dec_model.enc_dec_model.{side}.model."
        if rest.startswith("final_layernorm."):
            out[prefix + rest] = v
            continue
        _, i, rest = rest.split(".", 2)
        mod, wb = rest.rsplit(".", 1)
        layer = f"{prefix}layers.{i}."
        if mod == "pre_mlp_layernorm":
            out[f"{layer}{'post_attention_layernorm' if side == 'encoder' else 'post_inter_attention_layernorm'}.{wb}"] = v
        elif mod == "pre_cross_attn_layernorm":
            out[f"{layer}post_attention_layernorm.{wb}"] = v
        elif mod == "mlp.linear_fc1" and not fast_glu:
            gate, up = v.chunk(2, dim=0)
            out[f"{layer}mlp.dense_h_to_4h.{wb}"], out[f"{layer}mlp.dense_h_to_4h_2.{wb}"] = gate, up
        elif mod == "mlp.linear_fc1":
            out[f"{layer}mlp.dense_h_to_4h.{wb}"] = v
        else:
            out[f"{layer}{_LAYER[mod]}.{wb}"] = v
    return out


def random_legacy_state(cfg: dict[str, Any], vocab: int, seed: int = 0) -> dict[str, Any]:
    """Seeded random weights of the right shapes in NeMo's legacy names (no megatron-core needed)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    h, f = SIZES["hidden_size"], SIZES["ffn_hidden_size"]
    proj = SIZES["num_attention_heads"] * SIZES["kv_channels"]
    word, pos = r(vocab, h), r(cfg["max_position_embeddings"], h)
    st = {"enc_dec_model.tokens_head.bias": r(vocab)}
    for side in ("encoder", "decoder"):
        st[f"enc_dec_model.{side}_embedding.word_embeddings.weight"] = word
        st[f"enc_dec_model.{side}_embedding.position_embeddings.weight"] = pos
        shapes = {"input_layernorm": (h,), "self_attention.query_key_value": (3 * proj, h),
                  "self_attention.dense": (h, proj), "post_attention_layernorm": (h,),
                  "mlp.dense_h_to_4h": (f, h), "mlp.dense_h_to_4h_2": (f, h), "mlp.dense_4h_to_h": (h, f)}
        if side == "decoder":
            shapes.update({"inter_attention.query": (proj, h), "inter_attention.key_value": (2 * proj, h),
                           "inter_attention.dense": (h, proj), "post_inter_attention_layernorm": (h,)})
        prefix = f"enc_dec_model.enc_dec_model.{side}.model."
        for i in range(cfg[side]["num_layers"]):
            for name, shape in shapes.items():
                st[f"{prefix}layers.{i}.{name}.weight"] = r(*shape) + (1.0 if len(shape) == 1 else 0.0)
                st[f"{prefix}layers.{i}.{name}.bias"] = r(shape[0])
        st[f"{prefix}final_layernorm.weight"] = 1.0 + r(h)
        st[f"{prefix}final_layernorm.bias"] = r(h)
    return st
