"""NeMo legacy T5/mT5 ``.nemo`` base models against megatron-core's own ``T5Model`` forward (tiny RANDOMLY
INITIALISED models; no real T5 weights exist offline): the converted folder, loaded through
``AutoModelForSeq2SeqLM`` as the engine loads it, gives megatron-core's decoder logits and encoder states to 1e-5,
for a T5-style (BERT vocab.txt) and an mT5-style (sentencepiece) fixture, one file and 2-way ``mp_rank_XX``
shards (``geglu`` and ``fast-geglu``), with right padding in both inputs; the KV-cached greedy steps the ``t5``
family runs give the same logits as the full forward.

Which model the test follows: megatron-core's ``T5Model`` (local spec). Where NeMo's legacy module differs from it
in naming only (legacy ``dense_h_to_4h`` + ``dense_h_to_4h_2`` vs ``linear_fc1`` ``[gate; up]``, ``query`` /
``key_value`` vs ``linear_q`` / ``linear_kv``, its layernorm names) the fixtures write the legacy names
(:func:`tests.support.nemo_t5.legacy_from_mcore`); the maths is the same (:mod:`stages.engine.megatron_t5`).

Skipped when megatron-core is not installed (it is a test-only reference)."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")
pytest.importorskip("sentencepiece")

from stages.engine.base_model import load_model, load_tokenizer, resolve  # noqa: E402
from tests.support import megatron_t5, nemo_t5  # noqa: E402


@pytest.fixture(scope="module")
def megatron():
    started = megatron_t5.init_single_process()
    yield
    megatron_t5.shutdown(started)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTLAUNCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module", params=["t5", "mt5"])
def family(request):
    return request.param, nemo_t5.tokenizer_member(request.param)


def _inputs(vocab: int):
    g = torch.Generator().manual_seed(1)
    enc = torch.randint(0, vocab, (2, 9), generator=g)
    dec = torch.randint(0, vocab, (2, 6), generator=g)
    enc_valid = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])       # right padding, as the t5 family batches
    dec_valid = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    return enc, dec, enc_valid, dec_valid


def _reference(cfg, tok_files):
    vocab = nemo_t5.nemo_vocab_size("t5" if cfg["tokenizer"]["library"] == "megatron" else "mt5", tok_files, cfg)
    model = megatron_t5.build(cfg, vocab)
    enc, dec, ev, dv = _inputs(vocab)
    logits, states = megatron_t5.forward(model, enc, dec, ev, dv)
    return model, vocab, (enc, dec, ev, dv), logits, states


def _check(path, inputs, logits, states, vocab):
    resolved = resolve(str(path))
    hf = load_model(resolved.location)
    assert type(hf).__name__ == "MegatronT5ForConditionalGeneration" and hf.config.is_encoder_decoder
    assert hf.config.vocab_size == vocab
    enc, dec, ev, dv = inputs
    with torch.no_grad():
        got = hf(input_ids=enc, attention_mask=ev, decoder_input_ids=dec, decoder_attention_mask=dv).logits
        got_states = hf.get_encoder()(input_ids=enc, attention_mask=ev).last_hidden_state
    torch.testing.assert_close(got_states, states, atol=1e-5, rtol=0)
    torch.testing.assert_close(got, logits, atol=1e-5, rtol=0)
    return resolved, hf


def test_logits_and_encoder_states_equal_megatron_core(megatron, family, tmp_path):
    name, tok_files = family
    cfg = nemo_t5.t5_config(name)
    model, vocab, inputs, logits, states = _reference(cfg, tok_files)
    path = nemo_t5.write(tmp_path / f"megatron_{name}.nemo", cfg, {"model_weights.ckpt": megatron_t5.legacy_state(model)},
                         tok_files)
    resolved, hf = _check(path, inputs, logits, states, vocab)
    assert len(load_tokenizer(resolved.location)) < vocab       # padded rows past the tokenizer kept
    # the t5 family's cached greedy steps: one decoder token at a time with the KV cache = the full forward (row 0)
    enc, dec, ev, _ = inputs
    with torch.no_grad():
        encoded = hf.get_encoder()(input_ids=enc[:1], attention_mask=ev[:1])
        past, steps = None, []
        for t in range(dec.shape[1]):
            out = hf(encoder_outputs=encoded, attention_mask=ev[:1], decoder_input_ids=dec[:1, t:t + 1],
                     past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), logits[:1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("activation", ["geglu", "fast-geglu"])
def test_two_tensor_parallel_shards_merge(megatron, family, tmp_path, activation):
    name, tok_files = family
    cfg = nemo_t5.t5_config(name, tensor_model_parallel_size=2, encoder={"activation": activation},
                            decoder={"activation": activation})
    model, vocab, inputs, logits, states = _reference(cfg, tok_files)
    assert vocab % 256 == 0                                   # padded to make_vocab_size_divisible_by x TP
    shards = megatron_t5.legacy_tp_shards(model, 2, fast_glu=activation == "fast-geglu")
    files = {f"mp_rank_{r:02d}/model_weights.ckpt": s for r, s in enumerate(shards)}
    _check(nemo_t5.write(tmp_path / f"megatron_{name}_tp2.nemo", cfg, files, tok_files), inputs, logits, states, vocab)
