"""SQuAD v1.1 exact match and F1, per example and aggregated, computed with torchmetrics.

Scores follow the official ``evaluate-v1.1.py``: answers are normalised (lower case, ASCII punctuation
removed, articles a/an/the dropped, whitespace collapsed), EM and token F1 are maxed over the gold
answers, and aggregates are percentages. Per-example scores are in [0, 1].

torchmetrics implements the SQuAD *v2.0* rule for empty answers: a prediction that normalises to
nothing gets F1 = 1 against a gold answer that also normalises to nothing (e.g. gold "the"). In v1.1
the F1 is then 0 (no shared token) while EM is 1. :func:`score` applies that one correction, so the
numbers are exactly those of the official v1.1 script (checked in tests/stages/evaluation/test_evaluation_metrics.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence


@dataclass(frozen=True)
class Score:
    """One example: exact match (0 or 1) and token F1 in [0, 1], both maxed over the gold answers."""

    em: float
    f1: float


def _tm(prediction: str, golds: Sequence[str]) -> tuple[float, float]:
    from torchmetrics.functional.text import squad  # imported on first use: config errors stay fast

    out = squad(
        [{"prediction_text": prediction, "id": "0"}],
        [{"answers": {"text": list(golds), "answer_start": [0] * len(golds)}, "id": "0"}],
    )
    return float(out["exact_match"]) / 100.0, float(out["f1"]) / 100.0


def score(prediction: str, golds: Sequence[str]) -> Score:
    """SQuAD v1.1 EM and F1 of one prediction against its gold answers (at least one)."""
    if not golds:
        raise ValueError("score() needs at least one gold answer")
    em, f1 = _tm(prediction, golds)
    if f1 == 1.0 and em == 1.0 and _tm(prediction, [""])[0] == 1.0:
        f1 = 0.0  # the prediction normalises to nothing: v1.1 gives F1 0 (torchmetrics' v2.0 rule gives 1)
    return Score(em=em, f1=f1)


def aggregate(scores: Iterable[Score]) -> dict[str, float | int]:
    """``exact_match`` and ``f1`` in percent (as the official script reports them) and ``total``."""
    scores = list(scores)
    n = len(scores)
    if n == 0:
        return {"exact_match": 0.0, "f1": 0.0, "total": 0}
    return {
        "exact_match": 100.0 * sum(s.em for s in scores) / n,
        "f1": 100.0 * sum(s.f1 for s in scores) / n,
        "total": n,
    }
