"""Encoder-decoder prompt learning (family "t5") on tiny RANDOMLY INITIALISED T5 / mT5 models with real tokenizers.

The model folders come from ``tests.support.tiny_models`` (SentencePiece trained offline on a built-in
corpus, random weights d_model 64), built once per session. One module over 400 lines, on purpose: it follows the
encoder-decoder family's whole path (encoder input and labels, training, artifact, generation, the PEFT hand-off)
on one trained model and its fixtures, the way the decoder-only path is split over ``tests/stages/engine`` and
``test_prompt_learning.py``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytorch_lightning")
pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

from omegaconf import OmegaConf  # noqa: E402

from stages.common.errors import UserError  # noqa: E402
from stages.engine.template import parse_template  # noqa: E402
from stages.engine import examples as D  # noqa: E402
from tests.support import records  # noqa: E402
from tests.support.records import write_jsonl  # noqa: E402
from tests.support.templates import SENT_T  # noqa: E402
from tests.support.tiny_models import make_model_dir, make_tokenizer  # noqa: E402
from tests.support.training import check_two_task_incremental, make_cfg, tables, train  # noqa: E402

T5_SQUAD = {  # the t5/squad recipe's template, fewer virtual tokens
    "taskname": "squad",
    "prompt_template": "<|VIRTUAL_PROMPT_0|> Question: {question} Context: {context} Answer: {answer}",
    "total_virtual_tokens": 4,
    "virtual_token_splits": [4],
    "truncate_field": "context",
    "answer_only_loss": True,
    "answer_field": "answer",
}
PAIRS = [("What is the capital of France?", "Paris"), ("When was the Eiffel Tower completed?", "1889"),
         ("What lake is Zürich on?", "Lake Zürich"), ("Which country's capital is Tokyo?", "Japan")]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is fastest and does not fight other processes for the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> str:
    from tests.support.tiny_models import build

    return str(build("t5", tmp_path_factory.mktemp("tiny_t5") / "t5_tiny_random"))


@pytest.fixture(scope="session")
def tiny_mt5(tmp_path_factory) -> str:
    from tests.support.tiny_models import build

    return str(build("mt5", tmp_path_factory.mktemp("tiny_mt5") / "mt5_tiny_random"))


@pytest.fixture(scope="session")
def t5tok(tiny_t5):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_t5)


def family_of(model_dir: str):
    from transformers import AutoConfig, AutoTokenizer

    from stages.engine.family import family_for

    tok = AutoTokenizer.from_pretrained(model_dir)
    return family_for(AutoConfig.from_pretrained(model_dir), tok), D.TokenizerInfo(tok)


def squad_records(n: int, seed: int = 0) -> list[dict]:
    """Toy records in the tiny T5/mT5 tokenizer's vocabulary (a non-ASCII word included)."""
    return records.squad_records(n, seed, words=("Paris", "France", "Tower", "Eiffel", "capital", "city", "Tokyo", "Japan",
                                            "lake", "Zürich"), context_words=(3, 10))


def t5_cfg(tmp: Path, model_dir: str, **kw):
    kw.setdefault("templates", (T5_SQUAD,))
    if "train" not in kw:
        tmp.mkdir(parents=True, exist_ok=True)
        kw["train"] = write_jsonl(tmp / "train.jsonl", squad_records(16))
        kw["val"] = write_jsonl(tmp / "val.jsonl", squad_records(4, seed=5))
    return make_cfg(tmp, model_dir, **kw)


def param_hash(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# the tiny model folders
# ----------------------------------------------------------------------------------------------------------

def test_tiny_model_folders_are_labelled_t5_layout_and_deterministic(tiny_t5, tiny_mt5, t5tok, tmp_path):
    from transformers import AutoConfig

    from tests.support.tiny_models import LABEL, build_tokenizer

    for folder, model_type in ((tiny_t5, "t5"), (tiny_mt5, "mt5")):
        assert (Path(folder) / "README.txt").read_text(encoding="utf-8").startswith("RANDOMLY INITIALISED — for tests only")
        cfg = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        assert cfg["promptlaunch_note"] == LABEL and cfg["model_type"] == model_type and cfg["is_encoder_decoder"]
        assert (cfg["d_model"], cfg["num_layers"], cfg["num_heads"], cfg["d_ff"]) == (64, 2, 4, 128)
        assert AutoConfig.from_pretrained(folder).model_type == model_type
    # T5's id layout: <pad>=0, </s>=1, <unk>=2, sentinels after the SentencePiece pieces, <extra_id_0> last
    assert (t5tok.pad_token_id, t5tok.eos_token_id, t5tok.unk_token_id) == (0, 1, 2)
    assert t5tok.convert_tokens_to_ids("<extra_id_0>") == len(t5tok) - 1
    assert t5tok.convert_tokens_to_ids("<extra_id_99>") == len(t5tok) - 100
    assert t5tok.convert_ids_to_tokens(t5tok("Paris", add_special_tokens=False).input_ids) == ["▁Paris"]
    # the tokenizer is trained deterministically
    build_tokenizer("t5", tmp_path / "a")
    assert (tmp_path / "a" / "spiece.model").read_bytes() == (Path(tiny_t5) / "spiece.model").read_bytes()


# ----------------------------------------------------------------------------------------------------------
# encoder input and decoder labels
# ----------------------------------------------------------------------------------------------------------

def test_encoder_input_and_decoder_labels_exactly(tiny_t5, t5tok):
    fam, info = family_of(tiny_t5)
    assert fam.name == "t5"
    t = parse_template(T5_SQUAD)
    rec = {"question": "Which city?", "context": "The Eiffel Tower is in Paris.", "answer": "Paris"}
    ex = fam.build_example(t, rec, info, max_seq_length=200, add_eos=True, where="r")
    sentinel = t5tok.convert_tokens_to_ids("<extra_id_0>")
    # encoder: 4 virtual slots, then the template text up to {answer} as T5 tokenises it, then <extra_id_0> (no </s>)
    text = t5tok("Question: Which city? Context: The Eiffel Tower is in Paris. Answer:", add_special_tokens=False).input_ids
    assert ex.input_ids == [info.pad_id] * 4 + text + [sentinel]
    assert ex.virtual_index == [0, 1, 2, 3] + [-1] * (len(text) + 1)
    assert ex.input_ids == [info.pad_id] * 4 + t5tok("Question: Which city? Context: The Eiffel Tower is in Paris. Answer: <extra_id_0>",
                                                     add_special_tokens=False).input_ids
    toks = t5tok.convert_ids_to_tokens(ex.input_ids)
    assert toks[-1] == "<extra_id_0>" and toks[-2] == ":" and "</s>" not in toks
    # decoder target: <extra_id_0> answer </s>, exactly what the tokenizer makes of "<extra_id_0> Paris"
    assert t5tok.convert_ids_to_tokens(ex.labels) == ["<extra_id_0>", "▁Paris", "</s>"]
    assert ex.labels == t5tok("<extra_id_0> Paris").input_ids
    assert fam.build_example(t, rec, info, max_seq_length=200, add_eos=False, where="r").labels == [sentinel, ex.labels[1]]
    # the generation prompt is the same encoder input
    assert fam.build_prompt(t, rec, info, where="r") == (ex.input_ids, ex.virtual_index)
    ids, vidx = fam.build_prompt(t, rec, info, where="r", use_virtual=False)
    assert ids == text + [sentinel] and vidx == [-1] * len(ids)
    # batch: right padding + mask, labels padded with -100, decoder input = <decoder_start> + labels[:-1]
    ex2 = fam.build_example(t, {**rec, "question": "Which city is it, in the end?", "answer": "Lake Zürich"}, info,
                            max_seq_length=200, add_eos=True, where="r")
    b = fam.collate([ex, ex2], {"squad": 0}, info.pad_id)
    n_enc = max(len(ex.input_ids), len(ex2.input_ids))
    assert b["input_ids"][0].tolist() == ex.input_ids + [info.pad_id] * (n_enc - len(ex.input_ids))
    assert b["attention_mask"][0].tolist() == [1] * len(ex.input_ids) + [0] * (n_enc - len(ex.input_ids))
    n_dec = len(ex2.labels)
    assert b["labels"][0].tolist() == ex.labels + [-100] * (n_dec - 3)
    assert b["decoder_input_ids"][0].tolist() == [0, sentinel, ex.labels[1]] + [info.pad_id] * (n_dec - 3)
    assert b["decoder_input_ids"][1].tolist() == [0] + ex2.labels[:-1]
    assert b["decoder_attention_mask"][0].tolist() == [1, 1, 1] + [0] * (n_dec - 3)


def test_markers_in_the_middle_and_truncation_of_the_encoder_only(tiny_t5, t5tok):
    fam, info = family_of(tiny_t5)
    t = parse_template({**T5_SQUAD, "prompt_template": "<|VIRTUAL_PROMPT_0|> Question: {question}<|VIRTUAL_PROMPT_1|> Context: {context} Answer: {answer}",
                        "total_virtual_tokens": 5, "virtual_token_splits": [2, 3]})
    ctx = "The Eiffel Tower was completed in 1889 in Paris, France."
    rec = {"question": "When?", "context": ctx, "answer": "1889"}
    full = fam.build_example(t, rec, info, max_seq_length=500, add_eos=True, where="r")
    q = t5tok("Question: When?", add_special_tokens=False).input_ids
    assert full.virtual_index[:2] == [0, 1] and full.virtual_index[2 + len(q):2 + len(q) + 3] == [2, 3, 4]
    assert full.input_ids[2:2 + len(q)] == q
    ctx_ids = t5tok(ctx, add_special_tokens=False).input_ids
    tail = t5tok("Answer:", add_special_tokens=False).input_ids + [t5tok.convert_tokens_to_ids("<extra_id_0>")]
    assert full.input_ids[-len(ctx_ids) - len(tail):] == ctx_ids + tail
    # 4 tokens too many: the context loses its last 4 tokens; sentinel, question, target untouched
    stats = D.BuildStats()
    cut = fam.build_example(t, rec, info, max_seq_length=len(full.input_ids) - 4, add_eos=True, where="r", stats=stats)
    assert len(cut.input_ids) == len(full.input_ids) - 4 and stats.truncated == 1
    assert cut.input_ids == full.input_ids[: -len(ctx_ids) - len(tail)] + ctx_ids[:-4] + tail
    assert cut.labels == full.labels and cut.virtual_index[:2 + len(q) + 3] == full.virtual_index[:2 + len(q) + 3]
    # cannot fit even with an empty context, or no truncate field -> dropped and counted; the target never counts
    assert fam.build_example(t, rec, info, max_seq_length=8, add_eos=True, where="r", stats=stats) is None
    t2 = parse_template({**T5_SQUAD, "truncate_field": None})
    assert fam.build_example(t2, rec, info, max_seq_length=10, add_eos=True, where="r", stats=stats) is None
    assert stats.dropped_too_long == 2
    long_answer = {**rec, "answer": " ".join(["Paris"] * 50)}
    assert len(fam.build_example(t, long_answer, info, max_seq_length=len(full.input_ids), add_eos=True, where="r").labels) == 52


def test_tokenizer_without_sentinel_is_a_clear_error(tiny_t5):
    from transformers import AutoConfig

    from stages.engine.family import family_for

    with pytest.raises(UserError, match=r"model\.language_model_path: the model is encoder-decoder but its tokenizer has no sentinel token <extra_id_0>"):
        family_for(AutoConfig.from_pretrained(tiny_t5), make_tokenizer())
    fam, info = family_of(tiny_t5)
    with pytest.raises(UserError, match=r"answer_field: required for encoder-decoder models"):
        fam.build_example(parse_template({**T5_SQUAD, "answer_only_loss": False, "answer_field": None}),
                          {"question": "q", "context": "c", "answer": "a"}, info, max_seq_length=100, add_eos=True, where="r")


# ----------------------------------------------------------------------------------------------------------
# learning through the soft prompt alone
# ----------------------------------------------------------------------------------------------------------

QA_T = {"taskname": "qa", "prompt_template": "<|VIRTUAL_PROMPT_0|> Question: {question} Answer: {answer}",
        "total_virtual_tokens": 32, "virtual_token_splits": [32], "truncate_field": None, "answer_only_loss": True,
        "answer_field": "answer"}


def train_qa(tmp_path: Path, model_dir: str, callbacks=()):
    """(cfg, summary) of a soft prompt trained to memorise PAIRS on ``model_dir`` (120 steps, ~2 s)."""
    data = write_jsonl(tmp_path / "qa.jsonl", [{"taskname": "qa", "question": q, "answer": a} for q, a in PAIRS])
    cfg = make_cfg(tmp_path, model_dir, templates=(QA_T,), new_tasks=("qa",), train=data, val=data, max_steps=120)
    OmegaConf.update(cfg, "model.optim.lr", 0.1)
    OmegaConf.update(cfg, "model.optim.sched.name", "constant")
    OmegaConf.update(cfg, "trainer.val_check_interval", 60)
    cfg._check_frozen = True
    return cfg, train(cfg, callbacks=list(callbacks))


@pytest.mark.parametrize("which", ["t5", "mt5"])
def test_soft_prompt_alone_memorises_a_toy_mapping(tmp_path, which, tiny_t5, tiny_mt5):
    import pytorch_lightning as pl

    from stages.engine.prompted_model import PromptedModel
    from stages.engine.base_model import load_model

    model_dir = tiny_t5 if which == "t5" else tiny_mt5
    hashes = {}

    class Hash(pl.Callback):
        def on_fit_start(self, trainer, module):
            hashes["start"] = param_hash(module.base_model)

        def on_fit_end(self, trainer, module):
            hashes["end"] = param_hash(module.base_model)

    cfg, s = train_qa(tmp_path, model_dir, callbacks=[Hash()])
    assert s["first_val_loss"] > 10 and s["final_val_loss"] < 0.1, s     # strongly decreasing
    on_disk = param_hash(load_model(model_dir))
    assert hashes["start"] == hashes["end"] == on_disk                    # every base parameter unchanged
    pm = PromptedModel.load(cfg.model.artifact_path)
    assert pm.describe()["family"] == "t5"
    inputs = [{"taskname": "qa", "question": q} for q, _ in PAIRS]
    assert pm.generate(inputs, tokens_to_generate=8, batch_size=4, stop_strings=(), progress=False) == [a for _, a in PAIRS]
    assert param_hash(pm.model) == on_disk
    # the same model without the virtual prompt does not know the answers
    assert pm.generate(inputs, tokens_to_generate=8, use_virtual_prompt=False, stop_strings=(), progress=False) != [a for _, a in PAIRS]


# ----------------------------------------------------------------------------------------------------------
# artifact, exports, generation
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_t5(tmp_path_factory, tiny_t5):
    tmp = tmp_path_factory.mktemp("t5pt")
    cfg = t5_cfg(tmp, tiny_t5, max_steps=4)
    OmegaConf.update(cfg, "model.prompt_tuning.new_prompt_init_methods", ["text"])
    OmegaConf.update(cfg, "model.prompt_tuning.new_prompt_init_text", ["Answer the question."])
    cfg._check_frozen = True
    return cfg, train(cfg)


def test_artifact_records_family_fingerprint_and_exports(trained_t5, tiny_t5):
    import numpy as np

    from stages.engine.base_model import fingerprint, load_model

    cfg, summary = trained_t5
    art = Path(cfg.model.artifact_path)
    meta = json.loads((art / "artifact.json").read_text())
    assert meta["family"] == "t5" and meta["virtual_prompt_style"] == "prompt-tuning"
    assert meta["base_model"]["fingerprint"] == fingerprint(load_model(tiny_t5))
    assert meta["base_model"]["model_type"] == "t5" and meta["base_model"]["hidden_size"] == 64
    assert meta["encoder_decoder"]["decoder_target"] == "<extra_id_0> answer </s>"
    assert meta["tasks"]["squad"]["peft_export_exact"] is True
    assert summary["steps"] == 4 and summary["final_val_loss"] is not None
    t = tables(str(art))["prompt_table.squad"]
    assert t.shape == (4, 64) and np.array_equal(np.load(art / "export/npy/squad.npy"), t.numpy())
    peft_cfg = json.loads((art / "export/peft/squad/adapter_config.json").read_text())
    assert peft_cfg["task_type"] == "SEQ_2_SEQ_LM" and peft_cfg["num_transformer_submodules"] == 1


def test_peft_seq2seq_adapter_gives_the_same_logits(trained_t5, tiny_t5, t5tok):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSeq2SeqLM

    from stages.engine.prompted_model import PromptedModel

    art = Path(trained_t5[0].model.artifact_path)
    pm = PromptedModel.load(str(art))
    rec = {"taskname": "squad", "question": "Which city?", "context": "The Eiffel Tower is in Paris."}
    ids, vidx = pm.family.build_prompt(pm.templates["squad"], rec, pm.tok, where="r")
    dec = torch.tensor([[0, t5tok.convert_tokens_to_ids("<extra_id_0>"), 5]])
    with torch.no_grad():
        x = pm.store.embed(pm.model.get_input_embeddings(), torch.tensor([ids]), torch.tensor([vidx]), torch.tensor([0]))
        ours = pm.model(inputs_embeds=x, attention_mask=torch.ones(1, len(ids), dtype=torch.long), decoder_input_ids=dec).logits
        pmodel = peft.PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5), str(art / "export/peft/squad"))
        assert pmodel.peft_config["default"].num_transformer_submodules == 1
        text = torch.tensor([ids[4:]])   # PEFT prepends the 4 virtual rows itself; the caller adds text + <extra_id_0>
        theirs = pmodel(input_ids=text, attention_mask=torch.ones_like(text), decoder_input_ids=dec).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_batched_greedy_equals_unbatched_and_errors(trained_t5):
    from stages.engine.prompted_model import PromptedModel

    pm = PromptedModel.load(trained_t5[0].model.artifact_path)
    recs = squad_records(5, seed=11)
    recs[2]["context"] = "Paris " * 40 + "France."    # very different lengths -> real right padding
    for use in (True, False):
        batched = pm.generate(recs, tokens_to_generate=6, batch_size=5, use_virtual_prompt=use, stop_strings=(), progress=False)
        single = [pm.generate([r], tokens_to_generate=6, batch_size=1, use_virtual_prompt=use, stop_strings=(), progress=False)[0]
                  for r in recs]
        assert batched == single
    with pytest.raises(UserError, match=r"records\[0\]: missing field 'question'"):
        pm.generate([{"taskname": "squad", "context": "x"}], progress=False)
    assert pm.describe()["virtual_tokens"] == {"squad": 4} and pm.describe()["family"] == "t5"


def test_generation_strips_leading_sentinel_and_stops_at_next(trained_t5, monkeypatch):
    """Scripted decoder: <extra_id_0> ▁Paris <extra_id_1> ... -> 'Paris'; budget excludes the leading sentinel."""
    from stages.engine.prompted_model import PromptedModel

    pm = PromptedModel.load(trained_t5[0].model.artifact_path)
    tok = pm.tokenizer
    s0, s1 = tok.convert_tokens_to_ids("<extra_id_0>"), tok.convert_tokens_to_ids("<extra_id_1>")
    paris, france = tok.convert_tokens_to_ids("▁Paris"), tok.convert_tokens_to_ids("▁France")
    script = {"stop": [s0, paris, s1, france], "eos": [s0, france, 1, paris], "budget": [s0, paris, france, paris, france]}
    real_forward = pm.model.forward
    state = {}

    def fake_forward(*a, **kw):
        out = real_forward(*a, **kw)
        if "encoder_outputs" in kw:   # decoder steps only
            step = state["step"] = state.get("step", -1) + 1
            seq = state["seq"]
            out.logits[:] = -1e4
            out.logits[:, -1, seq[min(step, len(seq) - 1)]] = 1e4
        return out

    monkeypatch.setattr(pm.model, "forward", fake_forward)
    rec = {"taskname": "squad", "question": "q", "context": "c"}
    got = {}
    for name, seq in script.items():
        state.clear()
        state["seq"] = seq
        got[name] = pm.generate([rec], tokens_to_generate=2 if name == "budget" else 8, stop_strings=(), progress=False)[0]
    assert got == {"stop": "Paris", "eos": "France", "budget": "Paris France"}


# ----------------------------------------------------------------------------------------------------------
# p-tuning, incremental tasks, family checks
# ----------------------------------------------------------------------------------------------------------

def test_p_tuning_table_equals_encoder_output_t5(tmp_path, tiny_t5):
    import pytorch_lightning as pl

    from stages.engine.prompted_model import PromptedModel

    fam, info = family_of(tiny_t5)
    captured = {}

    class Grab(pl.Callback):
        def on_fit_end(self, trainer, module):
            module.prompts.eval()
            with torch.no_grad():
                captured["table"] = module.prompts.table("squad").clone()
                ex = fam.build_example(parse_template(T5_SQUAD), squad_records(1)[0], info, max_seq_length=128, add_eos=True, where="r")
                batch = fam.collate([ex], {"squad": 0}, info.pad_id)
                captured["loss"] = module.family.loss(module.base_model, module.prompts, batch)[0]
                captured["batch"] = batch

    cfg = t5_cfg(tmp_path, tiny_t5, style="p-tuning", max_steps=3)
    train(cfg, callbacks=[Grab()])
    art = cfg.model.artifact_path
    assert json.loads((Path(art) / "artifact.json").read_text())["virtual_prompt_style"] == "p-tuning"
    assert torch.equal(tables(art)["prompt_table.squad"], captured["table"])
    pm = PromptedModel.load(art)           # no encoder at inference: a frozen table
    assert not any(True for _ in pm.store.parameters())
    with torch.no_grad():
        loss = pm.family.loss(pm.model, pm.store, captured["batch"])[0]
    assert torch.allclose(loss, captured["loss"], atol=1e-5)


def test_incremental_task_t5(tmp_path, tiny_t5):
    check_two_task_incremental(tmp_path, t5_cfg, tiny_t5, T5_SQUAD, hidden=64, n_train=8)


@pytest.fixture(scope="module")
def gpt_artifact(tmp_path_factory):
    from tests.support.artifacts import save_tiny_artifact

    root = tmp_path_factory.mktemp("gpt_art")
    model_dir = make_model_dir(root / "tiny_llama")
    return str(save_tiny_artifact(root / "artifact", model_dir)), str(model_dir)


def test_artifact_of_another_family_is_a_clear_user_error(gpt_artifact, trained_t5, tiny_t5, tmp_path):
    from stages.engine.prompted_model import PromptedModel

    gpt_art, gpt_model = gpt_artifact
    with pytest.raises(UserError, match=rf"artifact {gpt_art} holds prompts for a gpt \(decoder-only\) model .*, but language_model_path "
                                        rf"points to {tiny_t5}, a t5 \(encoder-decoder\) model; prompts do not transfer"):
        PromptedModel.load(gpt_art, tiny_t5)
    t5_art = trained_t5[0].model.artifact_path
    with pytest.raises(UserError, match=r"holds prompts for a t5 \(encoder-decoder\) model .* a gpt \(decoder-only\) model"):
        PromptedModel.load(t5_art, gpt_model)
    cfg = t5_cfg(tmp_path, tiny_t5, templates=(T5_SQUAD, SENT_T), new_tasks=("sentiment",), restore_path=gpt_art, existing_tasks=["squad"])
    with pytest.raises(UserError, match=r"holds prompts for a gpt .* but model\.language_model_path points to .*a t5"):
        train(cfg)


# ----------------------------------------------------------------------------------------------------------
# the PEFT hand-off, as a user runs it
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qa_t5(tmp_path_factory, tiny_t5):
    """A soft prompt that answers PAIRS on the tiny T5: answers worth comparing (a few steps on random data
    leave the tiny model answering nothing at all)."""
    return train_qa(tmp_path_factory.mktemp("qa_t5"), tiny_t5)[0]


def _t5_handoff(cfg, tiny_t5, records, adapter=None):
    """(engine answers, {decoder: PEFT answers}, input spec): PeftModel.from_pretrained on the export, the text and
    tokenizer call of promptlaunch_input.json, greedy through PEFT's generate and through a cache-free loop."""
    from stages.engine.prompted_model import PromptedModel
    from tests.support import peft as H

    art = Path(cfg.model.artifact_path)
    pm = PromptedModel.load(str(art))
    engine = pm.generate(records, tokens_to_generate=8, batch_size=len(records), stop_strings=(), progress=False)
    spec = H.input_spec(art / "export/peft/qa")
    model = H.load_peft(tiny_t5, adapter or art / "export/peft/qa", seq2seq=True)
    fam = pm.family
    stops = {pm.tok.eos_id} | (fam.sentinels - {fam.sentinel})
    peft = {decoder: [pm.tok.decode(H.seq2seq_answer(model, H.user_ids(pm.tokenizer, spec, r), max_new_tokens=8,
                                                      stop_ids=stops, sentinel=fam.sentinel, vocab_limit=fam.vocab_limit,
                                                      decoder=decoder)).strip() for r in records]
            for decoder in H.DECODERS}
    return engine, peft, spec


QA_RECORDS = [{"taskname": "qa", "question": q} for q, _ in PAIRS]


@pytest.mark.parametrize("decoder", ["generate", "loop"])
def test_peft_seq2seq_export_gives_the_engine_answers(qa_t5, tiny_t5, decoder):
    """The T5 export used as a user would gives the engine's answers (here the memorised ones)."""
    from tests.support import peft as H

    engine, peft, spec = _t5_handoff(qa_t5, tiny_t5, QA_RECORDS)
    assert engine == [a for _, a in PAIRS]
    assert spec["text"] == " Question: {question} Answer:<extra_id_0>"
    assert spec["tokenizer_call"] == "tokenizer(text, add_special_tokens=False)"   # no </s> after the sentinel
    assert spec["whole_text_tokenisation"] == {"records_checked": 8, "identical": 8, "first_difference": None}   # val + train
    assert H.mismatches(engine, peft[decoder], QA_RECORDS) == []


def test_peft_seq2seq_handoff_check_fails_on_a_perturbed_table(qa_t5, tiny_t5, tmp_path):
    """The comparison can fail: a random table in place of the trained one changes PEFT's answers. (The memorised
    answers survive a text without its sentinel, so the tokenisation counterpart is shown on the decoder-only
    path, tests/stages/prompt_learning/test_prompt_learning.py.)"""
    from tests.support import peft as H

    art = Path(qa_t5.model.artifact_path)
    bad = H.perturbed_copy(art / "export/peft/qa", tmp_path / "perturbed")
    engine, peft, _ = _t5_handoff(qa_t5, tiny_t5, QA_RECORDS, adapter=bad)
    for decoder in H.DECODERS:
        assert H.mismatches(engine, peft[decoder], QA_RECORDS), f"{decoder}: a random table gave the same answers"
