"""NeMo T5/mT5 ``.nemo`` inputs without megatron-core (tiny RANDOMLY INITIALISED weights; no real T5 weights exist
offline): the converted tokenizer's ids against NeMo's documented procedure, row for row, and the configurations
that are refused, each in one line naming the ``model_config.yaml`` key, before anything is written.

The tokenizer fixtures are built as the NeMo launcher's data preparation fetches them (a cased BERT ``vocab.txt``;
a sentencepiece model with the id layout of Google's ``mc4.250000.100extra`` model, or sentencepiece's defaults),
and the expected ids follow ``MegatronT5Model.add_special_tokens_to_tokenizer`` (NeMo v1.23.0) step by step:
T5: ``vocab.txt`` lines in order, then ``<extra_id_0..99>``; bos = ``[CLS]``, eos = ``[SEP]`` (NeMo's
``AutoTokenizer`` wrapper), pad = ``[PAD]``. mT5: the sentencepiece pieces, then ``<cls> <sep> <mask>``, then
``<pad>`` / ``<bos>`` / ``<eos>`` for the roles the model has no piece for, then the sentinels.
"""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sentencepiece")

from stages.common.errors import UserError  # noqa: E402
from stages.engine.base_model import load_tokenizer, resolve  # noqa: E402
from tests.support import nemo_t5  # noqa: E402

KEY = "prompt_learning.model.language_model_path"
TEXTS = nemo_t5._squad_lines()[:12] + ["Question: Which NFL team won? Context: Denver, 24–10. Answer:", "  two  spaces "]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("PROMPTLAUNCH_CACHE", str(root))
    return root


def _nemo(tmp_path, family="t5", cfg=None, layout="mc4", state_cfg=None, **kw):
    cfg = cfg or nemo_t5.t5_config(family)
    tok = nemo_t5.tokenizer_member(family, layout)
    vocab = nemo_t5.nemo_vocab_size(family, tok, nemo_t5.t5_config(family))
    state = nemo_t5.random_legacy_state(state_cfg or cfg, vocab)
    return nemo_t5.write(tmp_path / f"megatron_{family}.nemo", cfg, {"model_weights.ckpt": state}, tok, **kw)


def test_t5_bert_vocab_rows_in_nemo_order(tmp_path, cache):
    from transformers import BertTokenizer as FastBert   # transformers' tokenizers-backed BERT: a second implementation

    path = _nemo(tmp_path, "t5")
    location = resolve(str(path), KEY).location
    tok = load_tokenizer(location)
    lines = nemo_t5.bert_vocab_lines()
    vocab = tok.get_vocab()
    assert all(vocab[w] == i for i, w in enumerate(lines))
    assert [vocab[f"<extra_id_{i}>"] for i in range(100)] == list(range(len(lines), len(lines) + 100))
    assert len(tok) == len(lines) + 100
    cfg = json.loads((cache / location.rsplit("/", 1)[-1] / "config.json").read_text())
    assert (cfg["pad_token_id"], cfg["bos_token_id"], cfg["eos_token_id"], cfg["decoder_start_token_id"]) == \
        (lines.index("[PAD]"), lines.index("[CLS]"), lines.index("[SEP]"), lines.index("[CLS]"))
    assert cfg["vocab_size"] == 128 * -(-(len(lines) + 100) // 128)
    reference = FastBert(vocab={w: i for i, w in enumerate(lines)}, do_lower_case=False)
    for text in TEXTS:
        assert tok(text, add_special_tokens=False).input_ids == reference(text, add_special_tokens=False).input_ids
    assert tok.unk_token_id not in tok(" ".join(TEXTS), add_special_tokens=False).input_ids


@pytest.mark.parametrize("layout", ["mc4", "default"])
def test_mt5_sentencepiece_rows_in_nemo_order(tmp_path, cache, layout):
    import sentencepiece as spm

    cfg = nemo_t5.t5_config("mt5")
    data = next(iter(nemo_t5.tokenizer_member("mt5", layout).values()))
    sp = spm.SentencePieceProcessor(model_proto=data)
    n = sp.get_piece_size()
    path = _nemo(tmp_path, "mt5", cfg, layout=layout)
    if layout == "default":
        added = ["<cls>", "<sep>", "<mask>", "<pad>"]          # bos <s> (1) and eos </s> (2) are pieces
        roles = {"pad": n + 3, "bos": 1, "eos": 2}
    else:
        added = ["<cls>", "<sep>", "<mask>", "<bos>"]          # pad <pad> (0) and eos </s> (1) are pieces
        roles = {"pad": 0, "bos": n + 3, "eos": 1}
    location = resolve(str(path), KEY).location
    tok = load_tokenizer(location)
    assert [tok.convert_tokens_to_ids(t) for t in added] == list(range(n, n + 4))
    assert [tok.convert_tokens_to_ids(f"<extra_id_{i}>") for i in range(100)] == list(range(n + 4, n + 104))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (roles["pad"], roles["bos"], roles["eos"])
    assert len(tok) == n + 104
    for text in TEXTS:       # sentencepiece itself is the reference, as in NeMo's legacy wrapper
        assert tok(text, add_special_tokens=False).input_ids == sp.encode_as_ids(text)
    # NeMo's legacy text_to_ids: the text split at a special token, each side encoded by sentencepiece
    assert tok("Answer:<extra_id_0> Paris", add_special_tokens=False).input_ids == \
        sp.encode_as_ids("Answer:") + [n + 4] + sp.encode_as_ids(" Paris")


def _refused(path, pattern, cache):
    with pytest.raises(UserError, match=pattern) as err:
        resolve(str(path), KEY)
    assert "\n" not in str(err.value)
    assert not cache.exists() or not any(cache.iterdir()), "nothing may be written for a refused .nemo"


@pytest.mark.parametrize("over,needle", [
    ({"encoder": {"position_embedding_type": "relative"}}, "encoder.position_embedding_type: relative"),
    ({"decoder": {"activation": "swiglu"}}, "decoder.activation: swiglu"),
    ({"encoder": {"activation": "gelu"}}, "encoder.activation: gelu"),
    ({"encoder": {"normalization": "rmsnorm"}}, "encoder.normalization: rmsnorm"),
    ({"decoder": {"transformer_block_type": "post_ln"}}, "decoder.transformer_block_type: post_ln"),
    ({"encoder": {"bias": False}}, "encoder.bias: False"),
    ({"decoder": {"megatron_legacy": True}}, "decoder.megatron_legacy: True"),
    ({"decoder": {"ffn_hidden_size": 64}}, r"decoder.ffn_hidden_size: 64 differs from the encoder's \(48\)"),
    ({"mcore_t5": True}, r"mcore_t5: True \(megatron-core T5"),
    ({"share_decoder_tokens_head_embeddings": False}, "share_decoder_tokens_head_embeddings: False"),
    ({"pipeline_model_parallel_size": 2}, "pipeline_model_parallel_size: 2"),
    ({"tokenizer": {"library": "huggingface", "type": "t5-base"}}, "tokenizer.library: huggingface"),
])
def test_unsupported_configuration_refused(tmp_path, cache, over, needle):
    cfg = nemo_t5.t5_config("t5", **over)
    _refused(_nemo(tmp_path, "t5", cfg, state_cfg=nemo_t5.t5_config("t5")), rf"^{KEY}=.*megatron_t5\.nemo: model_config\.yaml {needle}", cache)


def test_absent_activation_is_nemos_default_gelu(tmp_path, cache):
    cfg = nemo_t5.t5_config("t5")
    del cfg["encoder"]["activation"]
    _refused(_nemo(tmp_path, "t5", cfg), r"model_config\.yaml encoder\.activation: gelu \(NeMo's default\) is not geglu", cache)


def test_tokenizer_that_does_not_fit_the_weights(tmp_path, cache):
    cfg = nemo_t5.t5_config("t5")
    path = nemo_t5.write(tmp_path / "m.nemo", cfg, {"model_weights.ckpt": nemo_t5.random_legacy_state(cfg, 1024)},
                         nemo_t5.tokenizer_member("t5"))
    _refused(path, r"m\.nemo: the word embeddings have 1024 rows, but NeMo's tokenizer here gives \d+ tokens", cache)


def test_tokenizer_file_missing_and_weights_missing(tmp_path, cache):
    cfg = nemo_t5.t5_config("mt5")
    path = _nemo(tmp_path, "mt5", cfg, drop=(f"{nemo_t5.UUID_TOK}_mt5_tokenizer.model",))
    _refused(path, rf"model_config\.yaml tokenizer\.model: nemo:{nemo_t5.UUID_TOK}_mt5_tokenizer\.model names a file "
                   "the archive does not hold", cache)
    tok = nemo_t5.tokenizer_member("mt5")
    state = nemo_t5.random_legacy_state(cfg, nemo_t5.nemo_vocab_size("mt5", tok, cfg))
    del state["enc_dec_model.enc_dec_model.decoder.model.layers.2.inter_attention.query.weight"]
    path = nemo_t5.write(tmp_path / "n.nemo", cfg, {"model_weights.ckpt": state}, tok)
    _refused(path, r"n\.nemo: the weights do not match model_config\.yaml \(missing decoder\.layers\.2\.inter_attention"
                   r"\.query\.weight", cache)


@pytest.mark.parametrize("option", ["add_sentinel_tokens_in_reverse_order", "add_sentinel_tokens_first", "ul2"])
def test_mt5_sentinel_options_in_nemo_order(tmp_path, cache, option):
    """NeMo's other orders (``_add_sentinel_tokens`` reversed; sentinels before ``<cls>``..., with the Hugging Face
    branch of the pad rule; UL2's ``<extra_id_r|s|x>`` after the sentinels), replayed on the mC4-layout model."""
    import sentencepiece as spm

    tok_files = nemo_t5.tokenizer_member("mt5")
    n = spm.SentencePieceProcessor(model_proto=next(iter(tok_files.values()))).get_piece_size()
    if option == "ul2":
        cfg = nemo_t5.t5_config("mt5", data={"dataset_type": "ul2"})
    else:
        cfg = nemo_t5.t5_config("mt5")
        cfg["tokenizer"][option] = True
    size = n + 104 + (3 if option == "ul2" else 0)
    vocab = 128 * -(-size // 128)
    path = nemo_t5.write(tmp_path / "m.nemo", cfg, {"model_weights.ckpt": nemo_t5.random_legacy_state(cfg, vocab)},
                         tok_files)
    tok = load_tokenizer(resolve(str(path), KEY).location)
    ids = tok.convert_tokens_to_ids
    sentinels = [ids(f"<extra_id_{i}>") for i in range(100)]
    base = [ids(t) for t in ("<cls>", "<sep>", "<mask>", "<bos>")]
    if option == "add_sentinel_tokens_first":
        assert sentinels == list(range(n, n + 100)) and base == list(range(n + 100, n + 104))
    else:
        assert base == list(range(n, n + 4))
        order = range(99, -1, -1) if option == "add_sentinel_tokens_in_reverse_order" else range(100)
        assert [sentinels[i] for i in order] == list(range(n + 4, n + 104))
    if option == "ul2":
        assert [ids(f"<extra_id_{m}>") for m in "rsx"] == [n + 104, n + 105, n + 106]
    assert len(tok) == size and (tok.pad_token_id, tok.eos_token_id) == (0, 1)


def test_t5_ul2_masks_after_the_sentinels(tmp_path, cache):
    cfg = nemo_t5.t5_config("t5", data={"dataset_type": "ul2"})
    lines = nemo_t5.bert_vocab_lines()
    vocab = 128 * -(-(len(lines) + 103) // 128)
    path = nemo_t5.write(tmp_path / "m.nemo", cfg, {"model_weights.ckpt": nemo_t5.random_legacy_state(cfg, vocab)},
                         nemo_t5.tokenizer_member("t5"))
    tok = load_tokenizer(resolve(str(path), KEY).location)
    assert tok.convert_tokens_to_ids(["<extra_id_99>", "<extra_id_r>", "<extra_id_s>", "<extra_id_x>"]) == \
        list(range(len(lines) + 99, len(lines) + 103))
