"""The prompt_learning stage on a tiny random Llama (hidden 32, 2 layers, 4 heads) + a tiny byte-level BPE tokenizer:
training, the artifact and its exports, inference on it, p-tuning encoders, incremental tasks, resume.

Fast and offline: the model folder (``tests.support.tiny_models.make_model_dir``) is built once per session by the
``tiny`` fixture of tests/conftest.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytorch_lightning")
pytest.importorskip("transformers")

from omegaconf import OmegaConf  # noqa: E402

from stages.common.errors import UserError  # noqa: E402
from stages.engine.template import parse_template  # noqa: E402
from stages.engine import collate as C  # noqa: E402
from stages.engine import examples as D  # noqa: E402
from tests.support.paths import ROOT  # noqa: E402
from tests.support.records import squad_records, write_jsonl  # noqa: E402
from tests.support.templates import SQUAD_T  # noqa: E402
from tests.support.tiny_models import make_model_dir, make_tokenizer  # noqa: E402
from tests.support.training import check_two_task_incremental, make_cfg, tables, train  # noqa: E402


@pytest.fixture(scope="session")
def tiny_other(tmp_path_factory) -> str:
    return str(make_model_dir(tmp_path_factory.mktemp("tiny_llama_other"), seed=1))


@pytest.fixture(scope="session")
def tok():
    return D.TokenizerInfo(make_tokenizer())


# ----------------------------------------------------------------------------------------------------------
# training, artifact, inference
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny):
    tmp = tmp_path_factory.mktemp("pt")
    cfg = make_cfg(tmp, tiny, max_steps=6)
    cfg._check_frozen = True
    summary = train(cfg)
    return cfg, summary


def test_training_writes_artifact_exports_and_curve(trained, tiny):
    cfg, summary = trained
    art = Path(cfg.model.artifact_path)
    meta = json.loads((art / "artifact.json").read_text())
    assert meta["family"] == "gpt" and meta["virtual_prompt_style"] == "prompt-tuning"
    assert meta["tasks"]["squad"]["total_virtual_tokens"] == 4
    assert meta["tasks"]["squad"]["template"] == parse_template(SQUAD_T).to_dict()
    assert meta["base_model"]["language_model_path"] == tiny and meta["base_model"]["hidden_size"] == 32
    assert meta["training"]["steps"] == 6 and meta["training"]["final_val_loss"] is not None
    t = tables(str(art))["prompt_table.squad"]
    assert t.shape == (4, 32) and t.dtype == torch.float32
    import numpy as np

    assert np.array_equal(np.load(art / "export/npy/squad.npy"), t.numpy())
    log_dir = Path(cfg.exp_manager.explicit_log_dir)
    assert (log_dir / "loss_curve.png").stat().st_size > 1000
    assert (log_dir / "checkpoints" / "last.ckpt").is_file()
    ck = torch.load(log_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ck["state_dict"] and all(k.startswith("prompts.") for k in ck["state_dict"])   # prompt state only
    assert summary["final_val_loss"] < summary["first_val_loss"] + 1e-6 or summary["steps"] == 6


def test_base_weights_unchanged(trained, tiny):
    from safetensors.torch import load_file

    # _check_frozen asserted in-process; also the folder on disk is untouched
    before = load_file(str(Path(tiny) / "model.safetensors"))
    from stages.engine.prompted_model import PromptedModel

    pm = PromptedModel.load(trained[0].model.artifact_path)
    after = pm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in pm.model.parameters())


def test_peft_export_loads(trained, tiny):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    art = Path(trained[0].model.artifact_path)
    cfg = json.loads((art / "export/peft/squad/adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["num_virtual_tokens"] == 4 and cfg["token_dim"] == 32
    base = AutoModelForCausalLM.from_pretrained(tiny)
    pm = peft.PeftModel.from_pretrained(base, str(art / "export/peft/squad"))
    got = pm.prompt_encoder["default"].embedding.weight.detach()
    assert torch.equal(got, tables(str(art))["prompt_table.squad"])


HANDOFF_TOKENS = 8


def _handoff(trained, tiny, records, *, adapter=None, text=None):
    """(engine answers, {decoder: PEFT answers}) for ``records``: the engine's PromptedModel against the PEFT
    export used as a user would (whole-text ids with the call promptlaunch_input.json names, unpadded, greedy)."""
    from stages.engine.prompted_model import PromptedModel
    from tests.support import peft as H

    art = Path(trained[0].model.artifact_path)
    adapter = adapter or art / "export/peft/squad"
    pm = PromptedModel.load(str(art))
    engine = pm.generate(records, tokens_to_generate=HANDOFF_TOKENS, batch_size=len(records), stop_strings=(), progress=False)
    spec = H.input_spec(art / "export/peft/squad")
    model = H.load_peft(tiny, adapter)
    peft = {}
    for decoder in H.DECODERS:
        answers = []
        for r in records:
            ids = H.user_ids(pm.tokenizer, spec, r, text=text(spec, r) if text else None)
            toks = H.causal_answer(model, ids, max_new_tokens=HANDOFF_TOKENS, eos_id=pm.tok.eos_id, pad_id=pm.tok.pad_id,
                                   decoder=decoder)
            answers.append(pm.tok.decode(toks).strip())
        peft[decoder] = answers
    return engine, peft


def test_peft_export_input_spec_names_the_text_call_and_checked_records(trained):
    from stages.engine.artifact import peft_input_ids
    from tests.support import peft as H

    art = Path(trained[0].model.artifact_path)
    spec = H.input_spec(art / "export/peft/squad")
    assert spec["peft_export_exact"] is True and spec["why_not_exact"] is None
    assert spec["text"] == "Context: {context} Question: {question} Answer:"
    assert spec["tokenizer_call"] == "tokenizer(text)"
    check = spec["whole_text_tokenisation"]
    assert check["records_checked"] == 32 and check["identical"] == 32 and check["first_difference"] is None   # 8 val + 24 train
    meta = json.loads((art / "artifact.json").read_text())
    assert meta["tasks"]["squad"]["peft_export_exact"] is True
    tok = make_tokenizer()
    rec = squad_records(1, seed=21)[0]
    assert peft_input_ids(str(art), tok, rec) == H.user_ids(tok, spec, rec)


@pytest.mark.parametrize("decoder", ["generate", "loop"])
def test_peft_export_gives_the_engine_answers(trained, tiny, decoder):
    """PeftModel.from_pretrained + whole-text tokenisation + greedy = the engine's answers. ``generate`` is PEFT's
    own generation path (what users call); ``loop`` a cache-free greedy loop over PEFT's forward pass. When only
    ``generate`` fails, PEFT's generation broke, not the export."""
    from tests.support import peft as H

    records = squad_records(6, seed=31)
    engine, peft = _handoff(trained, tiny, records)
    assert any(engine) and len(set(engine)) > 1, engine   # answers that can tell two prompts apart
    assert H.mismatches(engine, peft[decoder], records) == []


def test_peft_handoff_check_fails_on_a_perturbed_table_and_on_other_tokens(trained, tiny, tmp_path):
    """The hand-off comparison can fail: a random table in place of the exported one, or a text tokenised differently (a trailing
    space after "Answer:", a common slip), change PEFT's answers and both decoders report it."""
    from tests.support import peft as H

    records = squad_records(6, seed=31)
    art = Path(trained[0].model.artifact_path)
    bad = H.perturbed_copy(art / "export/peft/squad", tmp_path / "perturbed")
    engine, peft = _handoff(trained, tiny, records, adapter=bad)
    for decoder in H.DECODERS:
        assert H.mismatches(engine, peft[decoder], records), f"{decoder}: a random table gave the same answers"
    engine, peft = _handoff(trained, tiny, records, text=lambda spec, r: H.user_text(spec, r) + " ")
    for decoder in H.DECODERS:
        assert H.mismatches(engine, peft[decoder], records), f"{decoder}: other input tokens gave the same answers"


def test_tokenisation_check_reports_where_whole_text_differs(tok):
    """Two fields glued together ("{context}{question}") are tokenised apart by the engine and as one word by a
    whole-text tokenizer: the check counts such a record and shows the ids and tokens where they part."""
    from stages.engine.export import input_spec
    from stages.engine.family import DecoderOnlyFamily

    tpl = parse_template(dict(SQUAD_T, prompt_template="<|VIRTUAL_PROMPT_0|>Context: {context}{question} Answer: {answer}"))
    same = [{"taskname": "squad", "context": f"{w} is here.", "question": " Which?"} for w in ("Paris", "water", "fox")]
    glued = {"taskname": "squad", "context": "Par", "question": "is"}
    spec = input_spec(DecoderOnlyFamily(), tpl, same + [glued], tok)
    assert spec["text"] == "Context: {context}{question} Answer:"
    check = spec["whole_text_tokenisation"]
    assert check["records_checked"] == 4 and check["identical"] == 3, check
    diff = check["first_difference"]
    assert diff["record"] == 3 and diff["text"] == "Context: Paris Answer:" and diff["position"] == 2
    assert "ĠParis" in diff["whole_text_tokens"] and "ĠParis" not in diff["engine_tokens"]


def test_batched_greedy_equals_unbatched(trained):
    from stages.engine.prompted_model import PromptedModel

    pm = PromptedModel.load(trained[0].model.artifact_path)
    recs = squad_records(6, seed=11)
    recs[2]["context"] = "fox " * 30 + "dog."           # very different lengths -> real left padding
    for use in (True, False):
        batched = pm.generate(recs, tokens_to_generate=8, batch_size=6, use_virtual_prompt=use, stop_strings=(), progress=False)
        single = [pm.generate([r], tokens_to_generate=8, batch_size=1, use_virtual_prompt=use, stop_strings=(), progress=False)[0]
                  for r in recs]
        assert batched == single
        assert any(batched)
    d = pm.describe()
    assert d["virtual_tokens"] == {"squad": 4} and d["family"] == "gpt"


def test_generate_errors_and_baseline(trained, tiny):
    from stages.engine.prompted_model import PromptedModel

    pm = PromptedModel.load(trained[0].model.artifact_path)
    with pytest.raises(UserError, match=r"records\[1\]: missing field 'question'"):
        pm.generate([squad_records(1)[0], {"taskname": "squad", "context": "x"}], progress=False)
    base = PromptedModel.load(None, tiny, task_templates=[SQUAD_T])
    assert base.describe()["virtual_tokens"] == {"squad": 0}
    rec = squad_records(1)[0]
    # baseline == tuned model with the virtual prompt switched off
    assert base.generate([rec], progress=False, stop_strings=()) == pm.generate([rec], use_virtual_prompt=False, progress=False, stop_strings=())


def test_incompatible_base_model(trained, tiny_other):
    from stages.engine.prompted_model import PromptedModel

    art = trained[0].model.artifact_path
    with pytest.raises(UserError, match=rf"artifact {art} was trained on base model .* but language_model_path points to {tiny_other}"):
        PromptedModel.load(art, tiny_other)


def test_p_tuning_table_equals_encoder_output(tmp_path, tiny):
    from stages.engine.prompted_model import PromptedModel

    captured = {}

    class Grab(__import__("pytorch_lightning").Callback):
        def on_fit_end(self, trainer, module):
            module.prompts.eval()
            with torch.no_grad():
                captured["table"] = module.prompts.table("squad").clone()
                batch = C.collate([D.build_example(parse_template(SQUAD_T), squad_records(1)[0], D.TokenizerInfo(make_tokenizer()),
                                                   max_seq_length=128, add_eos=False, where="r")], {"squad": 0}, 1)
                x = module.prompts.embed(module.base_model.get_input_embeddings(), batch["input_ids"], batch["virtual_index"], batch["task_ids"])
                captured["logits"] = module.base_model(inputs_embeds=x, attention_mask=batch["attention_mask"]).logits
                captured["batch"] = batch

    cfg = make_cfg(tmp_path, tiny, style="p-tuning", max_steps=3)
    train(cfg, callbacks=[Grab()])
    art = cfg.model.artifact_path
    assert json.loads((Path(art) / "artifact.json").read_text())["virtual_prompt_style"] == "p-tuning"
    assert torch.allclose(tables(art)["prompt_table.squad"], captured["table"], atol=0, rtol=0)
    pm = PromptedModel.load(art)     # no encoder at inference
    assert not any(True for _ in pm.store.parameters())
    b = captured["batch"]
    with torch.no_grad():
        x = pm.store.embed(pm.model.get_input_embeddings(), b["input_ids"], b["virtual_index"], b["task_ids"])
        logits = pm.model(inputs_embeds=x, attention_mask=b["attention_mask"]).logits
    assert torch.allclose(logits, captured["logits"], atol=1e-6)


def test_lstm_encoder_trains(tmp_path, tiny):
    cfg = make_cfg(tmp_path, tiny, style="p-tuning", max_steps=2)
    OmegaConf.update(cfg, "model.p_tuning.encoder_type", "lstm")
    s = train(cfg)
    assert tables(cfg.model.artifact_path)["prompt_table.squad"].shape == (4, 32) and s["steps"] == 2


def test_two_task_incremental(tmp_path, tiny):
    check_two_task_incremental(tmp_path, make_cfg, tiny, SQUAD_T, hidden=32, n_train=16)


def test_resume_after_interruption_matches_uninterrupted(tmp_path, tiny):
    import pytorch_lightning as pl

    full = make_cfg(tmp_path / "full", tiny, max_steps=6)
    train(full)

    class Boom(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == 5:
                raise RuntimeError("simulated crash")

    part = make_cfg(tmp_path / "part", tiny, max_steps=6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(part, callbacks=[Boom()])
    assert (Path(part.exp_manager.explicit_log_dir) / "checkpoints" / "last.ckpt").is_file()
    train(part)   # resume_if_exists: continues from the step-4 checkpoint
    a = tables(full.model.artifact_path)["prompt_table.squad"]
    b = tables(part.model.artifact_path)["prompt_table.squad"]
    assert torch.equal(a, b)
    ha = json.loads((Path(full.exp_manager.explicit_log_dir) / "loss_history.json").read_text())
    hb = json.loads((Path(part.exp_manager.explicit_log_dir) / "loss_history.json").read_text())
    assert ha["val"] == hb["val"]


def test_stage_entry_reports_user_error_in_one_line(tmp_path, tiny):
    import subprocess
    import sys

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"taskname": "squad", "context": "x", "answer": "y"}])
    cfg = make_cfg(tmp_path, tiny, train=bad)
    OmegaConf.save(cfg, tmp_path / "c.yaml")
    p = subprocess.run([sys.executable, str(ROOT / "stages/prompt_learning/run.py"), "--config", str(tmp_path / "c.yaml")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == f"error: {bad}:1: record has no field 'question' required by the template of task 'squad'; add it or fix the template"


def test_a_base_model_sharing_the_embeddings_is_still_another_model(trained, tiny, tmp_path):
    """A fine-tune keeps the embedding rows; the fingerprint samples every weight, so the artifact tells it apart."""
    import shutil

    from safetensors.torch import load_file, save_file

    from stages.engine.prompted_model import PromptedModel

    other = tmp_path / "finetuned"
    shutil.copytree(tiny, other)
    weights = load_file(str(other / "model.safetensors"))
    name = next(k for k in weights if "mlp.down_proj" in k)
    weights[name] = weights[name] + 0.01                 # one MLP matrix moved, embeddings and config untouched
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    art = trained[0].model.artifact_path
    with pytest.raises(UserError, match=rf"artifact {art} was trained on base model .*but language_model_path points to {other}"):
        PromptedModel.load(art, str(other))
