"""Seeded toy records for the tiny models (torch-free): SQuAD-like and sentiment records, and JSONL files of them."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

WORDS = ("Paris", "water", "fox", "dog", "capital", "boils", "quick", "lazy", "brown", "France")


def squad_records(n: int, seed: int = 0, *, words: Sequence[str] = WORDS, context_words: tuple[int, int] = (4, 12)) -> list[dict]:
    """Seeded toy SQuAD records: a context of random ``words`` ending in the answer word."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ans = rng.choice(words)
        ctx = " ".join(rng.choice(words) for _ in range(rng.randint(*context_words))) + f" {ans}."
        out.append({"taskname": "squad", "context": ctx, "question": f"Which word {i % 3}?", "answer": ans})
    return out


def sent_records(n: int, seed: int = 1) -> list[dict]:
    """Seeded toy sentiment records (the ``SENT_T`` task)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        lab = rng.choice(["positive", "negative"])
        out.append({"taskname": "sentiment", "review": "good dog" if lab == "positive" else "bad fox", "label": lab})
    return out


def paragraph_records(n_par: int, per: int, seed: int = 0) -> list[dict]:
    """SQuAD-like records: ``per`` questions (of different lengths) for each of ``n_par`` contexts of different lengths."""
    rng = random.Random(seed)
    out = []
    for p in range(n_par):
        ctx = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) + "."
        for q in range(per):
            ans = rng.choice(WORDS)
            question = "Which " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))) + f" {q}?"
            out.append({"taskname": "squad", "context": ctx, "question": question, "answer": ans})
    return out


def write_jsonl(path: Path, recs: list[dict]) -> str:
    """One JSON record per line; returns the path as a string (what a config takes)."""
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)
