"""``model.data.truncate_keep_answer``: a too-long context is cut to a window that holds the answer
(``examples.answer_window``), for both families, instead of from its end (NeMo's cut, still the default)."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from stages.engine import examples as D  # noqa: E402
from stages.engine.template import parse_template  # noqa: E402
from tests.support.templates import SQUAD_T  # noqa: E402

FILLER = " ".join(f"word{i} is here" for i in range(60))


def record(answer: str, before: str = FILLER, after: str = "") -> dict:
    return {"taskname": "squad", "context": f"{before} The capital is {answer}. {after}".strip(),
            "question": "What is the capital?", "answer": answer}


def contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


@pytest.fixture
def setup(info):
    return parse_template(SQUAD_T), info


def build(setup, rec, keep_answer, max_len=64):
    tpl, info = setup
    cut = D.answer_window(tpl, rec, info) if keep_answer else None
    return D.build_example(tpl, rec, info, max_seq_length=max_len, add_eos=True, where="r", cut=cut)


def test_the_window_keeps_the_answer_the_end_cut_loses(setup):
    tpl, info = setup
    rec = record("Zanzibar")
    answer_ids = info.encode(" Zanzibar")
    end = build(setup, rec, keep_answer=False)
    win = build(setup, rec, keep_answer=True)
    context_end = end.input_ids[: -len(answer_ids) - 1]      # everything before the answer field and EOS
    context_win = win.input_ids[: -len(answer_ids) - 1]
    assert not contains(context_end, answer_ids)            # the plain cut dropped the answer from the context
    assert contains(context_win, answer_ids)
    assert len(win.input_ids) == len(end.input_ids) == 64  # the same length budget, used fully
    assert win.labels == end.labels                         # the same target
    assert build(setup, rec, keep_answer=True).input_ids == win.input_ids   # the same record, the same cut


def test_window_position_varies_between_records_and_short_contexts_are_untouched(setup):
    tpl, info = setup
    starts = set()
    for i in range(8):
        rec = record("Zanzibar", before=FILLER + f" variant {i}", after=FILLER[: 40 + 7 * i])
        ids = build(setup, rec, keep_answer=True).input_ids
        starts.add(tuple(ids[4:12]))
    assert len(starts) > 1                                  # not always the same offset around the answer
    short = {"taskname": "squad", "context": "The capital is Paris.", "question": "Q?", "answer": "Paris"}
    assert build(setup, short, True).input_ids == build(setup, short, False).input_ids


def test_answer_not_in_context_falls_back_to_the_end_cut(setup):
    rec = record("Zanzibar")
    rec["answer"] = "Dodoma"
    assert build(setup, rec, True).input_ids == build(setup, rec, False).input_ids


def test_t5_family_takes_the_same_window(tmp_path):
    """On the tiny RANDOMLY INITIALISED T5's tokenizer (tests.support.tiny_models)."""
    from stages.engine.family.t5 import EncoderDecoderFamily
    from tests.support.tiny_models import build_tokenizer

    tok = build_tokenizer("t5", tmp_path)
    info = D.TokenizerInfo(tok)
    tpl = parse_template(SQUAD_T)
    fam = EncoderDecoderFamily(tok)
    rec = record("Zanzibar")
    plain = fam.build_example(tpl, rec, info, max_seq_length=64, add_eos=True, where="r")
    win = fam.build_example(tpl, rec, info, max_seq_length=64, add_eos=True, where="r", cut=D.answer_window(tpl, rec, info))
    answer_ids = info.encode(" Zanzibar")
    assert not contains(plain.input_ids, answer_ids) and contains(win.input_ids, answer_ids)
