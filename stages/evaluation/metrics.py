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
from typing import Any, Iterable, Sequence


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


BOOTSTRAP_RESAMPLES = 2000


def aggregate(scores: Iterable[Score]) -> dict[str, Any]:
    """``exact_match`` and ``f1`` in percent (as the official script reports them), ``total``, and the 95 %
    bootstrap confidence interval of each (``exact_match_ci95``, ``f1_ci95``: [low, high] in percent)."""
    scores = list(scores)
    n = len(scores)
    if n == 0:
        return {"exact_match": 0.0, "f1": 0.0, "total": 0}
    return {
        "exact_match": 100.0 * sum(s.em for s in scores) / n,
        "f1": 100.0 * sum(s.f1 for s in scores) / n,
        "total": n,
        "exact_match_ci95": bootstrap_ci([s.em for s in scores]),
        "f1_ci95": bootstrap_ci([s.f1 for s in scores]),
    }


def bootstrap_ci(values: Sequence[float], paired: Sequence[float] | None = None, level: float = 0.95,
                 resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> list[float]:
    """Percentile bootstrap interval of the mean (in percent) of per-question scores in [0, 1]; with ``paired``,
    of the mean difference ``values - paired`` over the same resampled questions (tuned vs baseline).

    Why a bootstrap: F1 on a few hundred questions moves by several points between samples of the same model,
    so a figure without its interval invites reading noise as progress. Seeded: the same scores give the same
    interval."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    if paired is not None:
        x = x - np.asarray(paired, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return [round(100.0 * float(lo), 2), round(100.0 * float(hi), 2)]
