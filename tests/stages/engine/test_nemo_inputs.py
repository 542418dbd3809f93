"""``.nemo`` base models that are refused: each one line naming the key (and the ``model_config.yaml`` key and value
for an architecture), and nothing written to the model cache. Also the pipeline-parallel merge (seeded random
weights, no megatron-core): ``tp_rank_XX_pp_rank_YYY`` shards give the same HF tensors as one file."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from stages.common.errors import UserError  # noqa: E402
from stages.engine.base_model import resolve  # noqa: E402
from tests.support import nemo  # noqa: E402

KEY = "prompt_learning.model.language_model_path"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("PROMPTLAUNCH_CACHE", str(root))
    return root


def _refused(path, pattern, cache):
    with pytest.raises(UserError, match=pattern) as err:
        resolve(str(path), KEY)
    assert "\n" not in str(err.value)
    assert not cache.exists() or not any(cache.iterdir()), "nothing may be written for a refused .nemo"
    return str(err.value)


def _good(tmp_path, name="m.nemo", cfg=None, **kw):
    cfg = cfg or nemo.gpt2_config()
    return nemo.write_nemo(tmp_path / name, cfg, {"model_weights.ckpt": nemo.random_state(cfg)}, **kw)


@pytest.mark.parametrize("gzip", [False, True], ids=["tar", "gzip"])
def test_truncated_archive(tmp_path, cache, gzip):
    path = _good(tmp_path, gzip=gzip)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    _refused(path, rf"^{KEY}=.*m\.nemo: .*(truncated|not a readable \.nemo archive|cannot be read)", cache)


def test_no_weights(tmp_path, cache):
    path = nemo.write_nemo(tmp_path / "m.nemo", nemo.gpt2_config(), {})
    _refused(path, rf"^{KEY}=.*m\.nemo: holds no weights \(no model_weights\.ckpt, mp_rank_XX/", cache)


def test_distributed_checkpoint_zarr_or_incomplete(tmp_path, cache):
    zarr = {"model_weights/metadata.json": b'{"sharded_backend": "zarr", "sharded_backend_version": 1}',
            "model_weights/model.embedding.word_embeddings.weight/.zarray": b"{}"}
    path = nemo.write_nemo(tmp_path / "m.nemo", nemo.gpt2_config(), {}, files=zarr)
    _refused(path, r"m\.nemo: its distributed checkpoint uses the 'zarr' backend, which promptlaunch does not read yet",
             cache)
    path = nemo.write_nemo(tmp_path / "n.nemo", nemo.gpt2_config(), {}, files={"model_weights/common.pt": b"x"})
    _refused(path, r"n\.nemo: holds a distributed checkpoint folder model_weights/ without its metadata\.json", cache)
    torch_dist = {"model_weights/metadata.json": b'{"sharded_backend": "torch_dist"}'}
    path = nemo.write_nemo(tmp_path / "o.nemo", nemo.gpt2_config(), {}, files=torch_dist)
    _refused(path, r"o\.nemo: its distributed checkpoint model_weights/ cannot be read", cache)


@pytest.mark.parametrize("over,needle", [
    ({"activation": "reglu"}, "activation: reglu"),
    ({"normalization": "layernorm1p"}, "normalization: layernorm1p"),
    ({"position_embedding_type": "alibi"}, "position_embedding_type: alibi"),
    ({"transformer_block_type": "post_ln"}, "transformer_block_type: post_ln"),
    ({"position_embedding_type": "rope"}, r"normalization: layernorm \(NeMo's default\)"),   # NeoX: not read yet
    ({"bias": False}, "bias: False"),
    ({"num_query_groups": 2}, "num_query_groups: 2"),
    ({"megatron_legacy": True}, "megatron_legacy: True"),
])
def test_unsupported_architecture(tmp_path, cache, over, needle):
    cfg = nemo.gpt2_config(**over)
    path = nemo.write_nemo(tmp_path / "m.nemo", cfg, {"model_weights.ckpt": nemo.random_state(nemo.gpt2_config())})
    line = _refused(path, rf"^{KEY}=.*m\.nemo: model_config\.yaml {needle} ", cache)
    assert "exactly" in line or "equivalent" in line


def test_tokenizer_file_missing(tmp_path, cache):
    path = _good(tmp_path, drop=(f"{nemo.UUID_VOCAB}_vocab.json",))
    _refused(path, rf"model_config\.yaml tokenizer\.vocab_file: nemo:{nemo.UUID_VOCAB}_vocab\.json names a file the "
                   "archive does not hold", cache)


def test_pipeline_stages_merge_like_one_file(tmp_path, cache):
    from safetensors.torch import load_file

    cfg = nemo.llama_config(num_layers=4)
    state = nemo.random_state(cfg)
    one = resolve(str(nemo.write_nemo(tmp_path / "one.nemo", cfg, {"model_weights.ckpt": state})), KEY)
    stages = [{}, {}]
    for k, v in state.items():
        if k.startswith("model.decoder.layers."):
            i, rest = k[len("model.decoder.layers."):].split(".", 1)
            stages[int(i) // 2][f"model.decoder.layers.{int(i) % 2}.{rest}"] = v     # each stage numbers from 0
        elif k.startswith("model.embedding."):
            stages[0][k] = v
        else:
            stages[1][k] = v
    stages[1]["model.embedding.word_embeddings.weight"] = state["model.embedding.word_embeddings.weight"]
    files = {f"tp_rank_00_pp_rank_{p:03d}/model_weights.ckpt": s for p, s in enumerate(stages)}
    pp = resolve(str(nemo.write_nemo(tmp_path / "pp.nemo", {**cfg, "pipeline_model_parallel_size": 2}, files)), KEY)
    a, b = load_file(f"{one.location}/model.safetensors"), load_file(f"{pp.location}/model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
