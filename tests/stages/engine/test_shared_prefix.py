"""Exact speed-ups of the decoder-only engine, each proven against the plain path on the tiny random Llama:
answer-only logits, length-bucketed batches, and shared-context prefixes (training loss/gradients, generation)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from stages.common.errors import UserError  # noqa: E402
from stages.engine.template import parse_template, parse_templates  # noqa: E402
from stages.engine import collate as C  # noqa: E402
from stages.engine import dataset as DS  # noqa: E402
from stages.engine import examples as D  # noqa: E402
from stages.engine.samplers import BucketBatchSampler  # noqa: E402
from stages.engine.family import DecoderOnlyFamily  # noqa: E402
from tests.support.engine import assert_close_grads, load_model, loss_and_grad, make_store, prompted  # noqa: E402
from tests.support.records import WORDS, paragraph_records, write_jsonl  # noqa: E402
from tests.support.templates import SENT_T, SQUAD_T  # noqa: E402
from tests.support.training import make_cfg, tables, train  # noqa: E402


# ---- 1. answer-only logits -----------------------------------------------------------------------------

def test_answer_only_logits_equal_full_logits(tiny, info):
    """family.loss applies the LM head only where labels != -100; same loss and prompt gradient as full logits."""
    model = load_model(tiny)
    tpl = parse_template(SQUAD_T)
    exs = [D.build_example(tpl, r, info, max_seq_length=128, add_eos=True, where="r") for r in paragraph_records(3, 2)]
    batch = C.collate(exs, {"squad": 0}, info.pad_id)
    store = make_store({"squad": 4}, 32)
    fast = loss_and_grad(model, store, batch)
    store.zero_grad()
    x = store.embed(model.get_input_embeddings(), batch["input_ids"], batch["virtual_index"], batch["task_ids"])
    logits = model(inputs_embeds=x, attention_mask=batch["attention_mask"]).logits   # every position
    full = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             batch["labels"][:, 1:].reshape(-1), reduction="sum", ignore_index=D.IGNORE)
    full.backward()
    assert fast[1] == int((batch["labels"][:, 1:] != D.IGNORE).sum()) > 0
    assert fast[0] == pytest.approx(float(full.detach()), rel=1e-6)
    assert_close_grads(fast[2], {"task0": store.tables["task0"].grad.clone()}, rel=1e-6)


# ---- 2. length bucketing -----------------------------------------------------------------------------

def _padding(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)


def test_length_bucketing_same_examples_less_padding_resumable():
    rng = random.Random(0)
    lengths = [rng.randint(20, 300) for _ in range(203)]
    epoch = {"e": 0}

    def make(**kw):
        return BucketBatchSampler(len(lengths), 8, shuffle=True, seed=3, epoch_fn=lambda: epoch["e"], chunk_batches=5, **kw)

    from stages.engine.samplers import ResumableBatchSampler

    plain = ResumableBatchSampler(len(lengths), 8, shuffle=True, seed=3, epoch_fn=lambda: epoch["e"])
    bucket = make(lengths=lengths)
    for e in (0, 1):
        epoch["e"] = e
        got = list(bucket)
        ref = list(plain)
        assert sorted(i for b in got for i in b) == list(range(len(lengths)))     # every example once per epoch
        assert len(got) == len(ref) == len(bucket) == len(plain)                   # same number of batches
        assert sorted(len(b) for b in got) == sorted(len(b) for b in ref)          # all full but one
        assert _padding(got, lengths) < 0.5 * _padding(ref, lengths)               # padding reduced
        assert got == list(make(lengths=lengths))                                   # a pure function of (seed, epoch)
    epoch["e"] = 0
    first = list(bucket)
    epoch["e"] = 1
    assert list(bucket) != first                                                    # epochs differ
    # resume: the checkpoint's skip drops exactly the batches already consumed
    epoch["e"] = 1
    full = list(make(lengths=lengths))
    resumed = make(lengths=lengths)
    resumed.skip, resumed.skip_epoch = 7, 1
    assert list(resumed) == full[7:]
    assert list(resumed) == full   # the skip applies once


def test_prefix_groups_stay_together_in_batches():
    groups = [[0, 1, 2, 3, 4], [5, 6], [7], [8, 9, 10, 11], [12, 13, 14, 15, 16, 17]]
    lengths = [50] * 5 + [90] * 2 + [10] + [70] * 4 + [30] * 6
    s = BucketBatchSampler(18, 4, shuffle=True, seed=1, epoch_fn=lambda: 0, lengths=lengths, groups=groups)
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(18)) and len(batches) == 5
    where = {i: k for k, b in enumerate(batches) for i in b}
    for g in groups:   # a group spans at most two batches (split at a batch boundary)
        assert len({where[i] for i in g}) <= 2
    with pytest.raises(ValueError):
        BucketBatchSampler(5, 2, shuffle=True, seed=1, epoch_fn=lambda: 0, groups=[[0, 1], [3, 4]])


def test_dynamic_padding_loss_equals_unpadded(tiny, info):
    """A length-bucketed batch is padded to its own longest example: the loss is the sum of each example alone."""
    model = load_model(tiny)
    tpl = parse_template(SQUAD_T)
    exs = [D.build_example(tpl, r, info, max_seq_length=128, add_eos=True, where="r") for r in paragraph_records(4, 1, seed=2)]
    assert len({len(e.input_ids) for e in exs}) > 1
    store = make_store({"squad": 4}, 32)
    batched = loss_and_grad(model, store, C.collate(exs, {"squad": 0}, info.pad_id))
    alone = [loss_and_grad(model, store, C.collate([e], {"squad": 0}, info.pad_id)) for e in exs]
    assert batched[0] == pytest.approx(sum(a[0] for a in alone), rel=1e-5)
    assert batched[1] == sum(a[1] for a in alone)


# ---- 3. shared-context prefixes: training ------------------------------------------------------------------

def shared_vs_plain(model, exs, tasks, info, rel=1e-5):
    task_ids = {t: i for i, t in enumerate(tasks)}
    store = make_store(tasks, model.config.hidden_size)
    shared = C.collate_shared(exs, task_ids, info.pad_id)
    assert "prefix_row" in shared
    a = loss_and_grad(model, store, C.collate(exs, task_ids, info.pad_id))
    b = loss_and_grad(model, store, shared)
    assert a[1] == b[1] > 0
    assert b[0] == pytest.approx(a[0], rel=rel)
    assert_close_grads(a[2], b[2], rel=rel)
    return shared


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_shared_prefix_loss_and_gradient_equal_plain(tiny, info, attn):
    model = load_model(tiny, attn)
    tpl = parse_template(SQUAD_T)
    recs = paragraph_records(3, 3) + paragraph_records(1, 1, seed=9)      # 3 groups of 3 + a lone question
    random.Random(0).shuffle(recs)
    exs = [D.build_example(tpl, r, info, max_seq_length=128, add_eos=True, where="r") for r in recs]
    shared = shared_vs_plain(model, exs, {"squad": 4}, info)
    assert shared["prefix_input_ids"].shape[0] == 4 and shared["input_ids"].shape[0] == 10
    assert len(set(shared["prefix_attention_mask"].sum(1).tolist())) > 1      # prefixes of different lengths: padded
    # the prefix is [virtual x4] + "Context:" + context; the suffix starts at " Question:"
    e = exs[0]
    assert e.virtual_index[:4] == [0, 1, 2, 3] and info.decode(e.input_ids[e.prefix_len:]).startswith(" Question:")


def test_shared_prefix_two_tasks_virtual_tokens_in_suffix(tiny, info):
    """Mixed tasks; the sentiment template has virtual tokens after its shared field (they sit in the suffix)."""
    model = load_model(tiny)
    tpls = parse_templates([SQUAD_T, SENT_T])
    recs = paragraph_records(2, 2) + [{"taskname": "sentiment", "review": "good dog", "label": lab} for lab in ("positive", "negative")]
    exs = [D.build_example(tpls[r["taskname"]], r, info, max_seq_length=128, add_eos=True, where="r") for r in recs]
    shared = shared_vs_plain(model, exs, {"squad": 4, "sentiment": 6}, info)
    assert (shared["virtual_index"] >= 0).any()                                # the <|VIRTUAL_PROMPT_1|> rows
    assert shared["prefix_task_ids"].tolist() == [0, 0, 1]


def test_labels_inside_the_prefix_shrink_it(tiny, info):
    """answer_only_loss=false puts labels on the context: the shared prefix stops before the first label's
    prediction (here: the virtual tokens but the last), and the loss is still the plain one."""
    model = load_model(tiny)
    tpl = parse_template({**SQUAD_T, "answer_only_loss": False})
    exs = [D.build_example(tpl, r, info, max_seq_length=128, add_eos=True, where="r") for r in paragraph_records(2, 3)]
    first_label = next(i for i, t in enumerate(exs[0].labels) if t != D.IGNORE)
    assert exs[0].prefix_len == first_label - 1 == 3
    shared = shared_vs_plain(model, exs, {"squad": 4}, info)
    assert shared["prefix_input_ids"].shape == (1, 3)                            # all six share the virtual prompt


def test_collate_shared_falls_back_to_plain_when_nothing_is_shared(info):
    tpl = parse_template(SQUAD_T)
    exs = [D.build_example(tpl, r, info, max_seq_length=128, add_eos=True, where="r") for r in paragraph_records(3, 1)]
    got = C.collate_shared(exs, {"squad": 0}, info.pad_id)
    ref = C.collate(exs, {"squad": 0}, info.pad_id)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_truncated_contexts_share_only_identical_ids(info):
    """truncate_field cuts each question's context by its own length: only identical prefix ids are grouped."""
    tpl = parse_template(SQUAD_T)
    ctx = " ".join(WORDS * 4)
    recs = [{"taskname": "squad", "context": ctx, "question": q, "answer": "fox"} for q in ("Which?", "Which?", "Which dog fox lazy brown?")]
    exs = [D.build_example(tpl, r, info, max_seq_length=40, add_eos=True, where="r") for r in recs]
    assert C.prefix_groups(exs) == [[0, 1], [2]]
    assert exs[2].prefix_len < exs[0].prefix_len


def test_group_sampling_takes_whole_paragraphs(info):
    recs = [(r, f"f:{i}") for i, r in enumerate(paragraph_records(20, 5))]
    tpls = parse_templates([SQUAD_T])
    exs, _ = DS.build_dataset([], tpls, info, key="k", max_seq_length=128, min_seq_length=1, add_eos=True,
                             max_examples=23, seed=4, records=recs, group_sample=True)
    assert len(exs) == 23
    sizes = sorted(len(g) for g in C.prefix_groups(exs))
    assert sizes == [3, 5, 5, 5, 5]          # four whole paragraphs and the first 3 questions of a fifth
    scattered, _ = DS.build_dataset([], tpls, info, key="k", max_seq_length=128, min_seq_length=1, add_eos=True,
                                   max_examples=23, seed=4, records=recs)
    assert len(C.prefix_groups(scattered)) > 10


# ---- 3b. shared-context prefixes: training end to end, resumable -------------------------------------------

def shared_cfg(tmp: Path, model_dir: str, **over):
    tmp.mkdir(parents=True, exist_ok=True)
    tr = write_jsonl(tmp / "ptrain.jsonl", paragraph_records(8, 4, seed=1))
    va = write_jsonl(tmp / "pval.jsonl", paragraph_records(2, 3, seed=2))
    cfg = make_cfg(tmp, model_dir, train=tr, val=va, **{"max_steps": 6, **over})
    cfg.model.data.share_prefix = True
    cfg.model.data.length_bucketing = True
    return cfg


def test_shared_training_resumes_to_the_uninterrupted_prompt(tmp_path, tiny):
    import pytorch_lightning as pl

    seen: list[list[int]] = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            assert "prefix_row" in batch                 # shared batches reach the model
            seen.append(batch["prefix_row"].tolist())

    full = shared_cfg(tmp_path / "full", tiny)
    train(full, callbacks=[Record()])
    assert len(seen) == 6 and all(len(set(r)) < len(r) for r in seen)

    class Boom(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == 5:
                raise RuntimeError("simulated crash")

    part = shared_cfg(tmp_path / "part", tiny)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(part, callbacks=[Boom()])
    train(part)
    assert torch.equal(tables(full.model.artifact_path)["prompt_table.squad"], tables(part.model.artifact_path)["prompt_table.squad"])
    ha = json.loads((Path(full.exp_manager.explicit_log_dir) / "loss_history.json").read_text())
    hb = json.loads((Path(part.exp_manager.explicit_log_dir) / "loss_history.json").read_text())
    assert ha == hb
    # a checkpoint of shared batching does not resume a plain run (it would see other batches)
    plain = shared_cfg(tmp_path / "part", tiny, max_steps=8)
    plain.model.data.share_prefix = False
    plain.model.data.length_bucketing = False
    with pytest.raises(UserError, match=r"checkpoint was written by a run with other settings \(prompt_learning\.batching "
                                        r"\(derived\), prompt_learning\.model\.data\.length_bucketing, "
                                        r"prompt_learning\.model\.data\.share_prefix\)"):
        train(plain)


def test_batching_options_are_checked(tmp_path, tiny):
    cfg = shared_cfg(tmp_path, tiny)
    cfg.model.data.share_prefix = "yes"
    with pytest.raises(UserError, match=r"^prompt_learning\.model\.data\.share_prefix: must be true or false, got .yes.$"):
        train(cfg)


def test_launcher_checks_types_and_the_stage_falls_back_where_sharing_cannot_apply(caplog):
    import logging

    from omegaconf import OmegaConf

    from stages.engine.family.t5 import EncoderDecoderFamily
    from stages.prompt_learning.config import check_batching_flags
    from stages.prompt_learning.batching import batching_options

    assert check_batching_flags(OmegaConf.create({"data": {"share_prefix": True, "length_bucketing": False}})) == (True, False)
    with pytest.raises(UserError, match=r"^prompt_learning\.model\.data\.length_bucketing: must be true or false, got 'no'$"):
        check_batching_flags(OmegaConf.create({"data": {"length_bucketing": "no"}}))
    flags = check_batching_flags(OmegaConf.create({"data": {"share_prefix": True, "length_bucketing": True}}))
    assert batching_options(flags, DecoderOnlyFamily(), parallel=False) == (True, True)
    with caplog.at_level(logging.WARNING, logger="promptlaunch.prompt_learning"):
        assert batching_options(flags, DecoderOnlyFamily(), parallel=True) == (False, False)
        assert batching_options(flags, EncoderDecoderFamily.__new__(EncoderDecoderFamily), parallel=False) == (False, True)
    assert "parallel engine uses plain batches" in caplog.text and "cannot share prefixes" in caplog.text


# ---- 4. shared-context prefixes: generation ----------------------------------------------------------------

def test_shared_prefill_logits_equal_plain(tiny):
    """The first decoding step sees the same logits (float rounding aside) with and without the shared prefill."""
    from stages.engine import shared_prefix as SP

    pm = prompted(tiny, [SQUAD_T])
    tpl = pm.templates["squad"]
    recs = paragraph_records(3, 3, seed=5)
    split = [D.build_prompt_split(tpl, r, pm.tok, where="r") for r in recs]
    rows = [(ids, v, 0) for ids, v, _ in split]
    assert all(D.build_prompt(tpl, r, pm.tok, where="r") == (ids, v) for r, (ids, v, _) in zip(recs, split))
    fam = DecoderOnlyFamily()
    with torch.no_grad():
        plain, pm_mask, _ = fam._prefill(pm.model, pm.store, rows, pm.tok.pad_id)
        shared, sh_mask, pos = SP.prefill_shared(fam, pm.model, pm.store, rows, [p for *_, p in split], pm.tok.pad_id)
    a, b = plain.logits[:, -1], shared.logits[:, -1]
    assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert pos[:, -1].tolist() == [len(ids) - 1 for ids, _, _ in rows]
    assert sh_mask.sum(1).tolist() == pm_mask.sum(1).tolist()


def test_prefixes_of_very_different_lengths_run_in_separate_passes(tiny, monkeypatch):
    """Packed sequences ([prefix] [suffixes of its questions]) whose padding would cost more than 15 % run in
    separate passes (``length_groups``); the cache gathered from them gives the plain prefill's logits and the same
    answers."""
    from stages.engine import shared_prefix as SP

    assert SP.length_groups([266, 206, 129]) == [[0, 1], [2]]          # 266 and 206 together, 129 alone
    assert SP.length_groups([100, 98, 95, 50, 49, 10]) == [[0, 1, 2], [3, 4], [5]]
    pm = prompted(tiny, [SQUAD_T])
    tpl = pm.templates["squad"]
    recs = paragraph_records(3, 2, seed=5)
    recs[0]["context"] = recs[1]["context"] = "fox dog " * 25 + "Paris."    # one long paragraph
    split = [D.build_prompt_split(tpl, r, pm.tok, where="r") for r in recs]
    rows = [(ids, v, 0) for ids, v, _ in split]
    passes = []
    real = SP._run_packed
    monkeypatch.setattr(SP, "_run_packed", lambda *a: passes.append([len(pk.ids) for pk in a[3]]) or real(*a))
    fam = DecoderOnlyFamily()
    with torch.no_grad():
        plain, plain_mask, _ = fam._prefill(pm.model, pm.store, rows, pm.tok.pad_id)
        shared, mask, pos = SP.prefill_shared(fam, pm.model, pm.store, rows, [p for *_, p in split], pm.tok.pad_id)
    distinct = {(tuple(ids[:p]), tuple(v[:p])) for ids, v, p in split}
    packed_tokens = sum(len(k[0]) for k in distinct) + sum(len(ids) - p for ids, _, p in split)
    assert sum(len(p) for p in passes) == len(distinct) and len(passes) > 1 and len(passes[0]) == 1, passes
    assert sum(len(p) * max(p) for p in passes) <= 1.15 * packed_tokens          # little padding computed
    assert sum(len(p) * max(p) for p in passes) < plain_mask.numel()              # less than one plain pass
    a, b = plain.logits[:, -1], shared.logits[:, -1]
    assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())
    assert pos[:, -1].tolist() == [len(ids) - 1 for ids, _, _ in rows]
    kw = dict(tokens_to_generate=8, stop_strings=(), progress=False)
    assert pm.generate(recs, batch_size=6, share_prefix=True, **kw) == pm.generate(recs, batch_size=6, **kw)


@pytest.mark.parametrize("use_virtual", [True, False])
def test_shared_generation_identical_predictions(tiny, use_virtual):
    pm = prompted(tiny, [SQUAD_T, SENT_T])
    recs = paragraph_records(4, 4, seed=7) + [{"taskname": "sentiment", "review": "good dog"}] * 2 + paragraph_records(1, 1, seed=8)
    recs[3]["context"] = "fox " * 30 + "dog."       # one very long prompt: real left padding of the suffixes
    random.Random(1).shuffle(recs)
    kw = dict(tokens_to_generate=8, stop_strings=(), progress=False, use_virtual_prompt=use_virtual)
    for bs in (3, 8):
        plain = pm.generate(recs, batch_size=bs, **kw)
        shared = pm.generate(recs, batch_size=bs, share_prefix=True, **kw)
        assert shared == plain and len(set(plain)) > 1
    # token ids too, straight from the family (strings could hide a difference after a stop)
    tpl = pm.templates["squad"]
    sq = [r for r in recs if r["taskname"] == "squad"][:6]
    split = [D.build_prompt_split(tpl, r, pm.tok, where="r", use_virtual=use_virtual) for r in sq]
    fam, store = DecoderOnlyFamily(), (pm.store if use_virtual else None)
    common = dict(pad_id=pm.tok.pad_id, eos_ids=set(), tokens_to_generate=10, is_done=lambda i, g: False)
    a = fam.generate(pm.model, store, [(i, v, 0) for i, v, _ in split], **common)
    b = fam.generate(pm.model, store, [(i, v, 0) for i, v, _ in split], prefix_lens=[p for *_, p in split], **common)
    assert a == b and all(len(g) == 10 for g in a)


def test_shared_chunks_keep_paragraphs_together():
    from stages.engine.prompted_model import shared_chunks

    rows = [([1, 2, 3, 10 + i], [-1] * 4, 0) for i in range(5)] + [([4, 5, 20 + i], [-1] * 3, 0) for i in range(3)]
    chunks = shared_chunks(rows, [3] * 5 + [2] * 3, 4)
    assert sorted(i for c in chunks for i in c) == list(range(8))
    assert all(len(c) <= 4 for c in chunks)
    assert [5, 6, 7] in chunks                                     # the short paragraph whole
    assert sum(1 for c in chunks if set(c) & set(range(5))) == 2   # the 5-question one split in two


def test_only_the_decoder_only_family_shares_prefixes():
    from stages.engine.family.t5 import EncoderDecoderFamily

    assert DecoderOnlyFamily.shares_prefix and not EncoderDecoderFamily.shares_prefix
