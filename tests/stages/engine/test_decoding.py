"""Greedy decoding (stages/engine/decoding.py): finished rows leaving the batch and prompt-lookup drafts
give exactly the tokens of a naive one-token-at-a-time loop without any cache, row by row, on the tiny random
Llama (eager and sdpa), with and without shared prefixes, virtual tokens, stop rules and the token limit."""
from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from stages.common.errors import UserError  # noqa: E402
from stages.engine.decoding import draft_from  # noqa: E402
from stages.engine.family import DecoderOnlyFamily  # noqa: E402
from tests.support.engine import load_model, prompted, squad_rows  # noqa: E402
from tests.support.records import paragraph_records  # noqa: E402
from tests.support.templates import SENT_T, SQUAD_T  # noqa: E402


# ---- drafts ---------------------------------------------------------------------------------------------

def test_draft_is_what_followed_the_earliest_longest_match():
    seq = [5, 6, 7, 8, 9, 1, 6, 7, 2, 3, 6, 7]
    assert draft_from(seq, 3, ngram=3) == [8, 9, 1]          # "6 7" first seen at 1, followed by 8 9 1
    assert draft_from(seq, 2, ngram=1) == [8, 9]             # "7" alone: the same earliest match
    assert draft_from([1, 2, 3, 9, 2, 3, 4, 1, 2, 3], 2) == [9, 2]   # the 3-gram "1 2 3" wins over the later "2 3"
    assert draft_from(seq, 0) == []
    assert draft_from([1, 2, 3], 4) == []                    # last token never seen before
    assert draft_from([4, 4], 3) == [4]                      # the match may overlap the tail


def test_drafts_never_match_or_copy_virtual_slots():
    assert draft_from([-1, -1, 5, 6, -1, 7, 5], 3) == [6]     # the copy stops before a virtual slot
    assert draft_from([-1, 5, -1, -1, 5], 3) == []            # 5 is followed only by virtual slots
    assert draft_from([-1, -1, -1], 2) == []


# ---- exactness against a naive loop ------------------------------------------------------------------------

def naive_greedy(model, store, row, steps: int, eos_ids: set[int]) -> list[int]:
    """One row alone, no KV cache, no padding: re-run the whole sequence for every new token."""
    fam = DecoderOnlyFamily()
    ids, vidx, task = row
    x = fam.embed(model, store, torch.tensor([ids]), torch.tensor([vidx]), torch.tensor([task]))
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            tok = int(model(inputs_embeds=x).logits[0, -1].argmax())
            if tok in eos_ids:
                break
            out.append(tok)
            x = torch.cat([x, model.get_input_embeddings()(torch.tensor([[tok]]))], dim=1)
    return out


def repetitive_records(seed: int = 3) -> list[dict]:
    """Contexts with repeated phrases, so the random model's loops are found in the prompt and drafts get accepted."""
    recs = paragraph_records(3, 3, seed=seed)
    for k, r in enumerate(recs):
        if k % 2 == 0:
            r["context"] = ("fox dog " * (4 + k)) + r["context"]
    return recs


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("shared", [False, True])
def test_lookup_and_compaction_give_the_naive_tokens(tiny, attn, shared):
    pm = prompted(tiny, [SQUAD_T])
    model = load_model(tiny, attn)
    recs = repetitive_records()
    rows, plens = squad_rows(pm, recs)
    steps = 12
    want = [naive_greedy(model, pm.store, r, steps, set()) for r in rows]
    fam = DecoderOnlyFamily()
    extra = {"prefix_lens": plens} if shared else {}
    seen = {}
    for k, budget in ((0, None), (1, None), (4, None), (9, None), (4, 12), (4, 1)):
        stats: dict[str, int] = {}
        got = fam.generate(model, pm.store, rows, pad_id=pm.tok.pad_id, eos_ids=set(), tokens_to_generate=steps,
                           is_done=lambda i, g: False, prompt_lookup_num_tokens=k, pass_budget=budget, stats=stats, **extra)
        assert got == want, f"prompt_lookup_num_tokens={k} pass_budget={budget}"
        seen[k, budget] = stats
    seen = {k: v for (k, b), v in seen.items() if b is None} | {("budget", b): v for (k, b), v in seen.items() if b}
    assert seen["budget", 1]["drafted"] == 0                    # a budget of one row-token per pass: no drafts
    assert seen[0]["drafted"] == 0 and seen[0]["forward_passes"] == steps - 1
    assert seen[4]["accepted"] > 0, seen[4]                     # the drafts did something...
    alone = []
    for row, plen in zip(rows, plens):                          # ...and saved passes on some rows
        stats = {}
        fam.generate(model, pm.store, [row], pad_id=pm.tok.pad_id, eos_ids=set(), tokens_to_generate=steps,
                     is_done=lambda i, g: False, prompt_lookup_num_tokens=4, stats=stats, **({"prefix_lens": [plen]} if shared else {}))
        alone.append(stats["forward_passes"])
    assert min(alone) < steps - 1, alone


def test_rows_stop_where_the_one_token_loop_stops(tiny):
    """Stop strings, EOS and the token limit end each row at the same token, whatever the drafts proposed;
    finished rows leave the batch (fewer row-tokens than rows x passes)."""
    pm = prompted(tiny, [SQUAD_T])
    recs = repetitive_records(seed=11)
    rows, plens = squad_rows(pm, recs)
    fam = DecoderOnlyFamily()
    free = [naive_greedy(pm.model, pm.store, r, 10, set()) for r in rows]
    eos = {free[0][2]}                                         # a token row 0 emits third: acts as EOS there
    stop_after = {i: len(g) // 2 + 1 for i, g in enumerate(free) if i % 3 == 1}

    def is_done(i, gen):
        return i in stop_after and len(gen) >= stop_after[i]

    want = []
    for i, g in enumerate(free):
        out = []
        for tok in g:
            if tok in eos:
                break
            out.append(tok)
            if is_done(i, out):
                break
        want.append(out)
    assert len({len(w) for w in want}) > 1
    for k in (0, 3, 8):
        stats: dict[str, int] = {}
        got = fam.generate(pm.model, pm.store, rows, pad_id=pm.tok.pad_id, eos_ids=eos, tokens_to_generate=10,
                           is_done=is_done, prompt_lookup_num_tokens=k, stats=stats, prefix_lens=plens)
        assert got == want, k
        assert all(len(g) <= 10 for g in got)
        if k == 0:
            assert stats["row_tokens"] < len(rows) * stats["forward_passes"]


@pytest.mark.parametrize("use_virtual", [True, False])
def test_prompted_model_answers_identical_with_lookup(tiny, use_virtual):
    """PromptedModel.generate end to end, mixed tasks and batch sizes: same answer strings; stats add up."""
    pm = prompted(tiny, [SQUAD_T, SENT_T])
    recs = repetitive_records(seed=5) + [{"taskname": "sentiment", "review": "good dog"}] * 2
    random.Random(2).shuffle(recs)
    kw = dict(tokens_to_generate=10, stop_strings=(".",), progress=False, use_virtual_prompt=use_virtual)
    for bs in (2, 8):
        base = pm.generate(recs, batch_size=bs, **kw)
        for share in (False, True):
            stats: dict[str, int] = {}
            got = pm.generate(recs, batch_size=bs, share_prefix=share, prompt_lookup_num_tokens=5, stats=stats, **kw)
            assert got == base
            assert stats["forward_passes"] > 0 and stats["accepted"] <= stats["drafted"]


def test_prompt_lookup_num_tokens_is_checked(tiny):
    pm = prompted(tiny, [SQUAD_T])
    for bad in (-1, 1.5, True, "4"):
        with pytest.raises(UserError, match="prompt_lookup_num_tokens: must be an integer >= 0"):
            pm.generate(paragraph_records(1, 1), prompt_lookup_num_tokens=bad, progress=False)
    for bad in (0, -3, 2.0, False):
        with pytest.raises(UserError, match="prompt_lookup_pass_budget: must be an integer >= 1"):
            pm.generate(paragraph_records(1, 1), prompt_lookup_num_tokens=2, prompt_lookup_pass_budget=bad, progress=False)


def test_only_the_decoder_only_family_drafts():
    from stages.engine.family.t5 import EncoderDecoderFamily

    assert DecoderOnlyFamily.prompt_lookup and not EncoderDecoderFamily.prompt_lookup


def test_positions_count_only_real_slots(tiny):
    """Every fed token's position id is the number of real (unmasked) cache slots before it: rejected drafts and
    left padding never shift positions (a RoPE shift of a few places may not flip a tiny model's argmax, so this
    invariant is checked directly)."""
    pm = prompted(tiny, [SQUAD_T])
    rows, plens = squad_rows(pm, repetitive_records(seed=3))
    model = pm.model
    calls = []
    real_forward = model.forward

    def spy(*args, **kw):
        if kw.get("input_ids") is not None:    # decoding passes (prefill feeds embeddings)
            calls.append((kw["attention_mask"].clone(), kw["position_ids"].clone(), kw["input_ids"].shape[1]))
        return real_forward(*args, **kw)

    model.forward = spy
    try:
        stats: dict[str, int] = {}
        DecoderOnlyFamily().generate(model, pm.store, rows, pad_id=pm.tok.pad_id, eos_ids=set(), tokens_to_generate=12,
                                     is_done=lambda i, g: False, prompt_lookup_num_tokens=4, stats=stats, prefix_lens=plens)
    finally:
        del model.forward
    assert stats["drafted"] > stats["accepted"] > 0          # some drafts were rejected: their slots are masked
    assert any(not bool(m.all()) for m, _, _ in calls[1:])
    for mask, pos, width in calls:
        before = mask[:, :-width].sum(1)
        assert pos[:, 0].tolist() == before.tolist()


def test_pass_budget_caps_the_row_tokens_of_every_pass(tiny):
    """With ``pass_budget`` a pass carries at most max(budget, rows) row-tokens: drafts shrink while many rows are
    active and grow as rows finish."""
    pm = prompted(tiny, [SQUAD_T])
    rows, plens = squad_rows(pm, repetitive_records(seed=3))
    widths = []
    real_forward = pm.model.forward

    def spy(*args, **kw):
        if kw.get("input_ids") is not None:
            widths.append(tuple(kw["input_ids"].shape))
        return real_forward(*args, **kw)

    pm.model.forward = spy
    try:
        DecoderOnlyFamily().generate(pm.model, pm.store, rows, pad_id=pm.tok.pad_id, eos_ids=set(), tokens_to_generate=12,
                                     is_done=lambda i, g: False, prompt_lookup_num_tokens=6, pass_budget=16, prefix_lens=plens)
    finally:
        del pm.model.forward
    assert all(b * w <= max(16, b) for b, w in widths), widths
    assert widths[0] == (len(rows), 1) and len(rows) > 8          # 9 rows: no room for drafts at first
