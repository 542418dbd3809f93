"""The tokenizer of a NeMo T5/mT5, rebuilt as a transformers tokenizer whose ids are NeMo's, row for row.

Why a replay: NeMo adds the sentinels ``<extra_id_N>`` and T5's special tokens to the tokenizer when it builds the
model (``MegatronT5Model.add_special_tokens_to_tokenizer``, v1.23.0), so the embedding rows past the base
vocabulary are in the order of that code, which the ``.nemo`` does not record. Replayed here:

  * ``megatron`` + ``BertWordPieceCase`` (the launcher's T5, ``vocab.txt``): NeMo's ``AutoTokenizer`` wraps the
    slow HF ``BertTokenizer`` (``use_fast=False``; transformers' ``BertTokenizerLegacy`` is that class), sets
    ``eos = [SEP]`` and ``bos = [CLS]`` (the wrapper maps a missing eos/bos to sep/cls), then HF's
    ``add_special_tokens`` appends the sentinels after ``vocab.txt`` (``ul2`` data adds ``<extra_id_r|s|x>``);
  * ``sentencepiece`` (the launcher's mT5, ``mt5_tokenizer.model``): NeMo's ``SentencePieceTokenizer(legacy=True)``
    appends ``<cls>``, ``<sep>``, ``<mask>``, then ``<pad>`` / ``<bos>`` / ``<eos>`` only where the model has no
    such piece (``pad_id() > 0`` etc.; ``add_sentinel_tokens_first`` switches to the Hugging Face order), then the
    sentinels (one already encoded as a single id keeps that id). transformers' ``SentencePieceBackend`` with
    ``legacy=True`` then tokenises as NeMo's legacy wrapper does: the text is split at the added tokens and every
    piece encoded by sentencepiece itself.

Every NeMo id is checked against the built tokenizer; a model whose ids cannot be reproduced is refused in one line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.common.errors import UserError

UL2_MASKS = ("r", "s", "x")


def sentinel_names(settings: dict[str, Any]) -> list[str]:
    n = settings["sentinels"]
    order = range(n - 1, -1, -1) if settings["reverse"] else range(n)
    return [f"<extra_id_{i}>" for i in order]


def build(settings: dict[str, Any], data: bytes, folder: Path, where: str) -> tuple[Any, dict[str, int]]:
    """The tokenizer (its file written into ``folder``) and the ids of its special roles (pad, bos, eos,
    decoder start = bos, as NeMo's ``decode`` starts from ``bos_id``)."""
    if settings["library"] == "megatron":
        tok = _bert(settings, data, folder, where)
    else:
        tok = _sentencepiece(settings, data, folder, where)
    ids = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "decoder_start_token_id": tok.bos_token_id}
    return tok, ids


def _bert(settings: dict[str, Any], data: bytes, folder: Path, where: str) -> Any:
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    vocab = folder / "vocab.txt"
    vocab.write_bytes(data)
    try:
        tok = BertTokenizerLegacy(str(vocab), do_lower_case=settings["lower_case"])
    except Exception as exc:
        raise UserError(f"{where}: its {settings['file_key']} is not a WordPiece vocab.txt ({type(exc).__name__}: "
                        f"{str(exc)[:120]}); the .nemo is damaged") from None
    missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t not in tok.get_vocab()]
    if missing:
        raise UserError(f"{where}: its {settings['file_key']} lacks BERT's special tokens {', '.join(missing)}; "
                        "not the BertWordPiece vocabulary NeMo's T5 uses")
    tok.add_special_tokens({"eos_token": tok.sep_token, "bos_token": tok.cls_token})
    extra = sentinel_names(settings) + ([f"<extra_id_{m}>" for m in UL2_MASKS] if settings["ul2"] else [])
    if extra:
        tok.add_special_tokens({"additional_special_tokens": extra})
    return tok


def nemo_sentencepiece_ids(sp: Any, settings: dict[str, Any]) -> tuple[dict[str, int], dict[str, str], int]:
    """NeMo's additions to a sentencepiece model, replayed: (token -> id of every special token NeMo maps,
    role -> token for pad/bos/eos/cls/sep/mask, NeMo's ``vocab_size``)."""
    special: dict[str, int] = {}
    roles: dict[str, str] = {}
    size = sp.get_piece_size()
    unk = sp.unk_id()

    def add(token: str) -> None:        # SentencePieceTokenizer.add_special_tokens (list or dict form)
        nonlocal size
        if sp.piece_to_id(token) == unk and token not in special:
            special[token] = size
            size += 1

    def text_to_ids(text: str) -> list[int]:     # legacy text_to_ids: split at the special tokens known so far
        ids: list[int] = []
        while True:
            hits = {t: text.index(t) for t in special if t in text}
            if not hits:
                return ids + sp.encode_as_ids(text)
            first = min(hits, key=hits.get)
            ids += sp.encode_as_ids(text[: hits[first]]) + [special[first]]
            text = text[hits[first] + len(first):]

    def sentinels() -> None:
        for token in sentinel_names(settings):
            found = text_to_ids(token)
            if len(found) == 1:
                special[token] = found[0]
            else:
                add(token)

    def base(hf_converted: bool) -> None:
        for role in ("cls", "sep", "mask"):
            roles[role] = f"<{role}>"
            add(roles[role])
        pad_ok = sp.pad_id() >= 0 if hf_converted else sp.pad_id() > 0
        for role, has, fallback in (("pad", pad_ok, "<pad>"), ("bos", sp.bos_id() > 0, "<bos>"),
                                    ("eos", sp.eos_id() > 0, "<eos>")):
            if has:
                roles[role] = sp.id_to_piece(getattr(sp, f"{role}_id")())
            else:
                roles[role] = fallback
                add(fallback)

    if settings["sentinels_first"]:
        sentinels()
        base(hf_converted=True)
    else:
        base(hf_converted=False)
        sentinels()
    if settings["ul2"]:
        for m in UL2_MASKS:
            token = f"<extra_id_{m}>"
            if len(text_to_ids(f"▁{token}")) == 1:
                special[token] = text_to_ids(token)[0]
            else:
                add(token)
    return special, roles, size


def _sentencepiece(settings: dict[str, Any], data: bytes, folder: Path, where: str) -> Any:
    import sentencepiece
    from tokenizers import AddedToken
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    model = folder / "tokenizer.model"
    model.write_bytes(data)
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.Load(str(model))
    except Exception as exc:
        raise UserError(f"{where}: its {settings['file_key']} is not a sentencepiece model ({type(exc).__name__}: "
                        f"{str(exc)[:120]}); the .nemo is damaged") from None
    special, roles, size = nemo_sentencepiece_ids(sp, settings)
    tok = SentencePieceBackend(vocab_file=str(model), legacy=True, unk_token=sp.id_to_piece(sp.unk_id()))
    for token, _ in sorted(((t, i) for t, i in special.items() if i >= sp.get_piece_size()), key=lambda x: x[1]):
        tok.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    tok.add_special_tokens({f"{role}_token": token for role, token in roles.items()})
    sentinels = [t for t in special if t.startswith("<extra_id_")]
    if sentinels:
        tok.add_special_tokens({"additional_special_tokens": sentinels})
    wrong = [f"{t} (NeMo {i}, here {tok.convert_tokens_to_ids(t)})" for t, i in special.items()
             if tok.convert_tokens_to_ids(t) != i]
    if wrong or len(tok) != size:
        raise UserError(f"{where}: its sentencepiece model gives NeMo's special tokens ids transformers cannot "
                        f"reproduce ({', '.join(wrong[:3]) or f'{len(tok)} tokens, NeMo {size}'}); not read")
    return tok
