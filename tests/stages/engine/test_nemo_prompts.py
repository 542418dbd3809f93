"""NeMo prompt-learning ``.nemo`` files in and out: fixtures in each NeMo layout (built from NeMo's key names,
``tests/support/nemo_prompts.py``) imported bit for bit through ``load_artifact``; our ``export/nemo`` files
re-imported bit for bit; bad inputs refused in one line."""
from __future__ import annotations

import io
import tarfile

import pytest

torch = pytest.importorskip("torch")

from stages.common.errors import UserError  # noqa: E402
from stages.engine.artifact import check_base, load_artifact, save_artifact  # noqa: E402
from stages.engine.nemo import prompts as nemo_prompts  # noqa: E402
from stages.engine.template import parse_templates  # noqa: E402
from tests.support import nemo, nemo_prompts as NP  # noqa: E402
from tests.support.templates import SENT_T, SQUAD_T  # noqa: E402

KEY = "prompt_learning.model.restore_path"
H = 32


def _tables(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"squad": torch.randn(4, H, generator=g), "sentiment": torch.randn(6, H, generator=g)}


@pytest.mark.parametrize("flat", [False, True], ids=["nested", "flat"])
@pytest.mark.parametrize("container", ["tar", "gzip", "folder"])
def test_nemo_1_16_prompt_table(tmp_path, flat, container):
    tables = _tables()
    cfg = NP.prompt_config([SQUAD_T, SENT_T], style="inference", existing=["squad", "sentiment"], new=[],
                           nemo_version="1.16.0")
    target = tmp_path / ("p" if container == "folder" else "p.nemo")
    if container == "folder":
        target.mkdir()
    path = NP.write_prompt_nemo(target, cfg, {"model_weights.ckpt": NP.v116_state(tables, flat)},
                                gzip=container == "gzip", folder=container == "folder")
    meta, templates, got = load_artifact(path, KEY)
    assert meta["format"] == "nemo" and meta["nemo_layout"] == "<=1.16" and meta["family"] == "gpt"
    assert meta["base_model"]["hidden_size"] == H and meta["existing_tasks"] == ["squad", "sentiment"]
    assert sorted(got) == ["sentiment", "squad"] and sorted(templates) == sorted(got)
    assert templates["sentiment"].to_dict() == SENT_T
    for task, w in tables.items():
        assert got[task].dtype == torch.float32 and torch.equal(got[task], w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_tables_widen_exactly(tmp_path, dtype):
    w = _tables()["squad"].to(dtype)
    cfg = NP.prompt_config([SQUAD_T], style="inference", existing=["squad"], new=[])
    path = NP.write_prompt_nemo(tmp_path / "p.nemo", cfg, {"model_weights.ckpt": NP.v116_state({"squad": w})})
    _, _, got = load_artifact(path, KEY)
    assert got["squad"].dtype == torch.float32 and torch.equal(got["squad"].to(dtype), w)


@pytest.mark.parametrize("encoder", ["embedding", "mlp", "lstm", "tpmlp"])
@pytest.mark.parametrize("version", ["1.17", "1.23"])
def test_nemo_1_17_prompt_encoder(tmp_path, encoder, version):
    mods = NP.v117_encoder(encoder, 4, H)
    cfg = NP.prompt_config([SQUAD_T], style="p-tuning", existing=["squad"], new=["squad"], encoder=encoder,
                           nemo_version=f"{version}.0")
    path = NP.write_prompt_nemo(tmp_path / "p.nemo", cfg, {"model_weights.ckpt": NP.v117_state(mods, "squad", version)})
    meta, templates, got = load_artifact(path, KEY)
    assert meta["nemo_layout"] == ">=1.17" and meta["encoder_type"] == encoder and list(got) == ["squad"]
    want = NP.reference_table(mods, encoder)
    assert torch.equal(got["squad"], want), (got["squad"] - want).abs().max()
    if encoder == "tpmlp":   # NeMo's gelu constant 0.79788456 is within rounding of sqrt(2/pi)
        x = mods["embeddings"].weight.detach()
        p = mods["tpmlp"]
        approx = torch.nn.functional.gelu(x @ p["first.weight"].t() + p["first.bias"], approximate="tanh")
        assert torch.allclose(got["squad"], approx @ p["second.weight"].t() + p["second.bias"], atol=1e-5)


def test_nemo_1_17_tpmlp_tensor_parallel_shards(tmp_path):
    mods = NP.v117_encoder("tpmlp", 4, H)
    full = NP.v117_state(mods, "squad")
    shards = []
    for r in range(2):   # ColumnParallelLinear first (dim 0), RowParallelLinear second (dim 1, bias replicated)
        tp = {"first.weight": full["tpmlp"]["first.weight"].chunk(2, 0)[r],
              "first.bias": full["tpmlp"]["first.bias"].chunk(2, 0)[r],
              "second.weight": full["tpmlp"]["second.weight"].chunk(2, 1)[r],
              "second.bias": full["tpmlp"]["second.bias"]}
        shards.append({**full, "tpmlp": tp})
    cfg = NP.prompt_config([SQUAD_T], style="p-tuning", existing=["squad"], new=["squad"], encoder="tpmlp")
    path = NP.write_prompt_nemo(tmp_path / "p.nemo", cfg, {f"mp_rank_0{r}/model_weights.ckpt": s
                                                            for r, s in enumerate(shards)})
    _, _, got = load_artifact(path, KEY)
    assert torch.equal(got["squad"], NP.reference_table(mods, "tpmlp"))


@pytest.mark.parametrize("layout", nemo_prompts.LAYOUTS)
def test_export_reimported_bit_for_bit(tmp_path, layout):
    w = _tables()["sentiment"]
    tpl = parse_templates([SENT_T])["sentiment"]
    path = nemo_prompts.write(tmp_path / "out" / "sentiment.nemo", "sentiment", w, tpl, layout, "/m/megatron_gpt.nemo")
    meta, templates, got = load_artifact(path, KEY)
    assert list(got) == ["sentiment"] and torch.equal(got["sentiment"], w)
    assert templates["sentiment"] == tpl and meta["nemo_layout"] == ("<=1.16" if layout == "1.16" else ">=1.17")
    assert [p.name for p in path.parent.iterdir()] == ["sentiment.nemo"], "no temporary file left"
    state = torch.load(_member(path, "model_weights.ckpt"), weights_only=True)
    names = {f"{g}.{k}" for g, d in state.items() for k in d}   # NeMo's key names, per layout
    t = "prompt_table.prompt_table.sentiment"
    want = {"1.20": {f"{t}.prompt_embeddings.weight", "embeddings.weight"},
            "1.17": {f"{t}.prompt_embeddings.weight", f"{t}.indices", "embeddings.weight"},
            "1.16": {f"{t}.prompt_embeddings.weight", f"{t}.indices"}}[layout]
    assert names == want


def _member(path, name):
    with tarfile.open(path, "r:") as tar:
        names = tar.getnames()
        assert names == ["./model_config.yaml", "./model_weights.ckpt"], names
        return io.BytesIO(tar.extractfile(f"./{name}").read())


def test_artifact_exports_nemo(tmp_path):
    tables = _tables(3)
    art = save_artifact(tmp_path / "art", tables=tables, templates=parse_templates([SQUAD_T, SENT_T]),
                        style="prompt-tuning", base={"language_model_path": "/m/gpt.nemo", "resolved": "/m"},
                        add_eos=True, max_seq_length=64, training={})
    for sub in ("", "nemo-1.17/", "nemo-1.16/"):
        for task, w in tables.items():
            _, _, got = load_artifact(art / f"export/nemo/{sub}{task}.nemo", KEY)
            assert torch.equal(got[task], w)


def _squad():
    return {"squad": _tables()["squad"]}


def _refused(path, pattern):
    with pytest.raises(UserError, match=pattern) as err:
        load_artifact(path, KEY)
    assert "\n" not in str(err.value)


def test_truncated_tar(tmp_path):
    cfg = NP.prompt_config([SQUAD_T], style="inference", existing=["squad"], new=[])
    path = NP.write_prompt_nemo(tmp_path / "p.nemo", cfg, {"model_weights.ckpt": NP.v116_state(_squad())})
    with tarfile.open(path) as tar:   # cut inside the weights (a small tar is mostly its end padding)
        ckpt = tar.getmember("./model_weights.ckpt")
    path.write_bytes(path.read_bytes()[: ckpt.offset_data + ckpt.size // 2])
    _refused(path, rf"^{KEY}=.*p\.nemo: .*(truncated|not a readable \.nemo archive|cannot be read)")


def test_no_prompt_state(tmp_path):
    cfg = NP.prompt_config([SQUAD_T], style="inference", existing=["squad"], new=[])
    path = NP.write_prompt_nemo(tmp_path / "p.nemo", cfg, {"model_weights.ckpt": nemo.random_state(nemo.gpt2_config())})
    _refused(path, rf"^{KEY}=.*p\.nemo: model_weights\.ckpt holds no prompt state \(no prompt_table or embeddings")
    path = NP.write_prompt_nemo(tmp_path / "q.nemo", cfg, {})
    _refused(path, rf"^{KEY}=.*q\.nemo: holds no weights")
    base = nemo.write_nemo(tmp_path / "gpt.nemo", nemo.gpt2_config(), {"model_weights.ckpt": {}})
    _refused(base, rf"^{KEY}=.*gpt\.nemo: model_config\.yaml has no task_templates; a NeMo base model")


def test_rows_differ_from_template(tmp_path):
    cfg = NP.prompt_config([SQUAD_T], style="inference", existing=["squad"], new=[])
    state = NP.v116_state({"squad": torch.zeros(5, H)})
    path = NP.write_prompt_nemo(tmp_path / "p.nemo", cfg, {"model_weights.ckpt": state})
    _refused(path, r"task 'squad': the prompt table has 5 rows but its template says total_virtual_tokens: 4")


def test_hidden_size_mismatch(tmp_path):
    cfg = NP.prompt_config([SQUAD_T], style="inference", existing=["squad"], new=[])
    path = NP.write_prompt_nemo(tmp_path / "p.nemo", cfg, {"model_weights.ckpt": NP.v116_state(_squad())})
    meta, _, _ = load_artifact(path, KEY)
    check_base(meta, path, {"hidden_size": H, "sha256": "x"}, "/m/tiny", family="gpt")   # same size: accepted
    with pytest.raises(UserError, match=rf"NeMo prompt file .*p\.nemo holds prompts of hidden size {H} .* "
                                        r"model\.language_model_path points to /m/tiny, hidden size 64; ") as err:
        check_base(meta, path, {"hidden_size": 64, "sha256": "x"}, "/m/tiny", family="gpt")
    assert "\n" not in str(err.value)


def test_prompted_model_loads_the_nemo_export(tiny, tmp_path):
    """Evaluation's path: the NeMo export of an artifact, with the base model named, answers exactly as the
    artifact; a NeMo prompt file of another hidden size is refused in one line naming both sizes."""
    from pathlib import Path

    from stages.engine.prompted_model import PromptedModel
    from tests.support.artifacts import save_tiny_artifact

    art = save_tiny_artifact(tmp_path / "art", Path(tiny))
    ours = PromptedModel.load(str(art))
    theirs = PromptedModel.load(str(art / "export/nemo/squad.nemo"), tiny)
    assert torch.equal(theirs.store.table("squad"), ours.store.table("squad"))
    record = [{"taskname": "squad", "context": "The sky is blue.", "question": "What colour is the sky?"}]
    assert theirs.generate(record, tokens_to_generate=4) == ours.generate(record, tokens_to_generate=4)

    cfg = NP.prompt_config([SQUAD_T], style="inference", existing=["squad"], new=[])
    other = NP.write_prompt_nemo(tmp_path / "wide.nemo", cfg,
                                 {"model_weights.ckpt": NP.v116_state({"squad": torch.zeros(4, 48)})})
    with pytest.raises(UserError, match=r"holds prompts of hidden size 48 .* language_model_path points to .*, hidden "
                                        r"size 32; ") as err:
        PromptedModel.load(str(other), tiny)
    assert "\n" not in str(err.value)
