"""SQuAD v1.1 scoring: hand-made cases and a cross-check against the official evaluate-v1.1.py semantics."""
from __future__ import annotations

import random
import re
import string
from collections import Counter

import pytest

from stages.evaluation.metrics import bootstrap_ci, Score, aggregate, score


# ---- reference: the functions of the official SQuAD v1.1 script (evaluate-v1.1.py), test-only copy ----
def ref_normalize_answer(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def ref_f1_score(prediction, ground_truth):
    prediction_tokens = ref_normalize_answer(prediction).split()
    ground_truth_tokens = ref_normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def ref_exact_match_score(prediction, ground_truth):
    return ref_normalize_answer(prediction) == ref_normalize_answer(ground_truth)


def ref_metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
    return max(metric_fn(prediction, gt) for gt in ground_truths)


def ref_evaluate(cases):
    """cases: [(prediction, [gold, ...])] -> {'exact_match', 'f1'} in percent, as the official script."""
    f1 = exact_match = total = 0
    for prediction, ground_truths in cases:
        total += 1
        exact_match += ref_metric_max_over_ground_truths(ref_exact_match_score, prediction, ground_truths)
        f1 += ref_metric_max_over_ground_truths(ref_f1_score, prediction, ground_truths)
    return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}


# ---- hand-made cases with known answers ----
@pytest.mark.parametrize(
    "pred,golds,em,f1",
    [
        ("Eiffel Tower", ["Eiffel Tower"], 1, 1.0),
        ("the Eiffel Tower.", ["Eiffel tower"], 1, 1.0),                   # article, punctuation, case
        ("An apple", ["apple"], 1, 1.0),
        ("Eiffel", ["Eiffel Tower"], 0, 2 / 3),                            # P=1, R=1/2
        ("the big red Eiffel Tower", ["Eiffel Tower"], 0, 2 * 0.5 * 1 / 1.5),  # P=2/4, R=1
        ("Paris", ["London", "Paris, France", "paris"], 1, 1.0),             # max over several golds
        ("Paris France", ["Paris", "France"], 0, 2 / 3),
        ("1,000", ["1000"], 1, 1.0),                                        # punctuation inside numbers goes
        ("  Lake   Zürich ", ["Lake Zürich", "Zürich"], 1, 1.0),            # whitespace, unicode letters
        ("東京", ["東京"], 1, 1.0),
        ("Tokyo", ["東京"], 0, 0.0),
        ("theatre", ["the atre"], 0, 0.0),                                  # \b: 'the' inside a word stays
        ("“Paris”", ["Paris"], 0, 0.0),                                     # unicode quotes are not ASCII punctuation
        ("", ["Paris"], 0, 0.0),                                           # empty prediction
        ("", ["the"], 1, 0.0),                                             # v1.1: EM 1 but F1 0 (torchmetrics alone says 1)
        ("a", [".", "Paris"], 1, 0.0),
        ("red red", ["red"], 0, 2 * 0.5 * 1 / 1.5),                         # token counts, not sets
    ],
)
def test_hand_made_cases(pred, golds, em, f1):
    s = score(pred, golds)
    assert s.em == em
    assert s.f1 == pytest.approx(f1, abs=1e-6)
    assert s.em == float(ref_metric_max_over_ground_truths(ref_exact_match_score, pred, golds))
    assert s.f1 == pytest.approx(ref_metric_max_over_ground_truths(ref_f1_score, pred, golds), abs=1e-6)


def test_aggregate_is_percent_and_matches_official_on_random_cases():
    rng = random.Random(1234)
    vocab = ["the", "a", "an", "The", "An", "Paris", "paris", "tower", "Eiffel", "1889", "1,889", "Zürich", "東京",
             "café", "naïve", "Straße", "co-op", "U.S.", "’s", "—", "...", "(", ")", "!", "", " ", "\t", "theatre", "another"]

    def text():
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 5))) + rng.choice(["", ".", "!", " ", "\n"])

    cases = [(text(), [text() for _ in range(rng.randint(1, 4))]) for _ in range(400)]
    ours = [score(p, g) for p, g in cases]
    for (p, g), s in zip(cases, ours):
        assert s.em == float(ref_metric_max_over_ground_truths(ref_exact_match_score, p, g)), (p, g)
        assert s.f1 == pytest.approx(ref_metric_max_over_ground_truths(ref_f1_score, p, g), abs=1e-6), (p, g)
    agg, ref = aggregate(ours), ref_evaluate(cases)
    assert agg["total"] == 400
    assert agg["exact_match"] == pytest.approx(ref["exact_match"], abs=1e-4)
    assert agg["f1"] == pytest.approx(ref["f1"], abs=1e-4)
    assert 0 < agg["f1"] < 100


def test_matches_torchmetrics_squad_metric_when_no_empty_answers():
    """Away from the v1.1/v2.0 empty-answer rule, the aggregate equals torchmetrics' own SQuAD metric."""
    from torchmetrics.text import SQuAD

    cases = [("the Eiffel Tower", ["Eiffel Tower"]), ("Eiffel", ["Eiffel Tower", "tower"]), ("Rome", ["Paris"]), ("1,000 km", ["1000"])]
    metric = SQuAD()
    metric.update(
        [{"prediction_text": p, "id": str(i)} for i, (p, _) in enumerate(cases)],
        [{"answers": {"text": g, "answer_start": [0] * len(g)}, "id": str(i)} for i, (_, g) in enumerate(cases)],
    )
    tm = metric.compute()
    agg = aggregate(score(p, g) for p, g in cases)
    assert agg["exact_match"] == pytest.approx(float(tm["exact_match"]), abs=1e-4)
    assert agg["f1"] == pytest.approx(float(tm["f1"]), abs=1e-4)


def test_aggregate_empty_and_no_gold():
    assert aggregate([]) == {"exact_match": 0.0, "f1": 0.0, "total": 0}
    two = aggregate([Score(1.0, 0.5), Score(0.0, 0.0)])
    assert {k: two[k] for k in ("exact_match", "f1", "total")} == {"exact_match": 50.0, "f1": 25.0, "total": 2}
    assert two["exact_match_ci95"] == [0.0, 100.0] and two["f1_ci95"] == [0.0, 50.0]   # every resample of 2


def test_bootstrap_interval_matches_the_normal_approximation():
    """Independent check: for n=500 fair coin flips the 95 % interval of the mean is p +- 1.96 sqrt(p(1-p)/n),
    i.e. +-4.38 points; the percentile bootstrap agrees to a few tenths. Constant scores give a point; the paired
    interval of a constant shift is that shift; the same input gives the same interval (seeded)."""
    import random

    rng = random.Random(1)
    flips = [float(rng.random() < 0.5) for _ in range(500)]
    mean = 100 * sum(flips) / len(flips)
    lo, hi = bootstrap_ci(flips)
    half = 100 * 1.96 * (0.25 / 500) ** 0.5
    assert abs((hi - lo) / 2 - half) < 0.4 and lo < mean < hi
    assert bootstrap_ci([0.7] * 50) == [70.0, 70.0]
    assert bootstrap_ci([x + 0.1 for x in flips[:50]], paired=flips[:50]) == [10.0, 10.0]
    assert bootstrap_ci(flips) == [lo, hi]
    with pytest.raises(ValueError):
        score("x", [])
