"""``.nemo`` GPT base models against megatron-core's own forward: the importer's HF folder gives the same logits
(1e-5) as the megatron-core ``GPTModel`` whose state dict was saved, in every layout NeMo 1.x wrote (mcore names,
TransformerEngine names, legacy names; one file, 2-way ``mp_rank_XX`` shards, megatron-core's own distributed
checkpoint ``model_weights/`` (torch_dist, the backend it writes); tar, gzip tar, unpacked folder).

Skipped when megatron-core is not installed (it is a test-only reference)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from stages.engine.base_model import load_model, load_tokenizer, resolve  # noqa: E402
from tests.support import megatron_gpt, nemo  # noqa: E402

TOKENS = [[5, 17, 256, 99, 3, 200, 383, 42, 7, 1, 64, 300]]   # 300, 383: padded rows, beyond the tokenizer


@pytest.fixture(scope="module")
def megatron():
    started = megatron_gpt.init_single_process()
    yield
    megatron_gpt.shutdown(started)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTLAUNCH_CACHE", str(tmp_path / "cache"))


CASES = {"gpt2": nemo.gpt2_config, "llama": nemo.llama_config}


@pytest.fixture(scope="module", params=sorted(CASES))
def reference(request, megatron):
    cfg = CASES[request.param]()
    model = megatron_gpt.build(cfg, nemo.PADDED_VOCAB)
    tokens = torch.tensor(TOKENS)
    return request.param, cfg, model, megatron_gpt.logits(model, tokens)


def _import_logits(path):
    resolved = resolve(str(path))
    assert resolved.kind == "nemo"
    hf = load_model(resolved.location)
    with torch.no_grad():
        return resolved, hf, hf(torch.tensor(TOKENS)).logits


def _check(path, expected, family):
    resolved, hf, got = _import_logits(path)
    assert type(hf).__name__ == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[family]
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    return resolved


def test_mcore_layout_gives_megatron_core_logits(reference, tmp_path):
    family, cfg, model, expected = reference
    path = nemo.write_nemo(tmp_path / "megatron_gpt.nemo", cfg, {"model_weights.ckpt": megatron_gpt.nemo_state(model)})
    resolved = _check(path, expected, family)
    config = json.loads((Path(resolved.location) / "config.json").read_text())
    assert config["vocab_size"] == nemo.PADDED_VOCAB                  # padded rows kept
    tok = load_tokenizer(resolved.location)
    assert len(tok) == nemo.VOCAB and tok.eos_token == "<|endoftext|>"
    assert tok("Hi there").input_ids == list(b"Hi there")          # the byte alphabet in byte order, no merges
    # converted once: a second resolve reuses the cached folder
    assert resolve(str(path)).location == resolved.location


def test_transformer_engine_names_gzip_and_folder(reference, tmp_path):
    family, cfg, model, expected = reference
    state = nemo.to_te_names(megatron_gpt.nemo_state(model))
    _check(nemo.write_nemo(tmp_path / "te.nemo", cfg, {"model_weights.ckpt": state}, gzip=True), expected, family)
    folder = tmp_path / "unpacked"
    folder.mkdir()
    _check(nemo.write_nemo(folder, cfg, {"model_weights.ckpt": state}, folder=True), expected, family)


def test_legacy_names_one_file_and_two_tp_shards(reference, tmp_path):
    family, cfg, model, expected = reference
    mcore = megatron_gpt.nemo_state(model)
    gated = family == "llama"
    _check(nemo.write_nemo(tmp_path / "legacy.nemo", cfg, {"model_weights.ckpt": nemo.to_legacy_names(mcore)}),
           expected, family)
    shards = megatron_gpt.tp_shards(model, mcore, 2, gated)
    tp_cfg = {**cfg, "tensor_model_parallel_size": 2}
    files = {f"mp_rank_{r:02d}/model_weights.ckpt": nemo.to_legacy_names(s) for r, s in enumerate(shards)}
    _check(nemo.write_nemo(tmp_path / "legacy_tp2.nemo", tp_cfg, files), expected, family)
    files = {f"mp_rank_{r:02d}/model_weights.ckpt": s for r, s in enumerate(shards)}
    _check(nemo.write_nemo(tmp_path / "mcore_tp2.nemo", tp_cfg, files), expected, family)
    if gated:   # a non-fast swiglu: the gate and up halves as dense_h_to_4h and dense_h_to_4h_2
        slow = {**tp_cfg, "activation": "swiglu"}
        files = {f"mp_rank_{r:02d}/model_weights.ckpt": nemo.to_legacy_names(s, split_glu=True)
                 for r, s in enumerate(shards)}
        _check(nemo.write_nemo(tmp_path / "legacy_swiglu_tp2.nemo", slow, files), expected, family)


def test_distributed_checkpoint_written_by_megatron_core(reference, tmp_path):
    family, cfg, model, expected = reference
    saved = tmp_path / "saved"
    megatron_gpt.save_dist(model, saved)
    assert json.loads((saved / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    files = nemo.tree_files(saved, "model_weights")
    _check(nemo.write_nemo(tmp_path / "dist.nemo", cfg, {}, files=files), expected, family)
    folder = tmp_path / "unpacked"
    folder.mkdir()
    _check(nemo.write_nemo(folder, cfg, {}, files=files, folder=True), expected, family)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]   # scratch removed
