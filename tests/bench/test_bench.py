"""The bench scripts' core functions on a tiny random Llama, one repeat each, so the benchmark code cannot rot:
our training loss (plain and, when the engine has it, shared-prefix) equals PEFT's on the same batch, and our
generated answers equal PEFT's. The figures themselves are not checked here (bench/README.md)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.paths import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import common as C  # noqa: E402
import measure as M  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "squad_tiny"


def fixture_records(split: str) -> list[dict[str, Any]]:
    """Records of the tiny SQuAD fixture, converted by the data_preparation stage's own code."""
    from stages.data_preparation.squad import Origin, load_squad, questions, records

    path = FIXTURES / f"{split}-v1.1.json"
    src = Origin(path, "fix the fixture")
    return list(records("squad", questions(load_squad(path, src), src), lambda q: q.answers[0]))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> C.Setup:
    from tests.support.tiny_models import build

    folder = build("llama", tmp_path_factory.mktemp("bench") / "llama_tiny_random")
    return C.load_setup(str(folder), "eager")


def test_paragraph_batches_keep_questions_of_a_context_together() -> None:
    recs = fixture_records("train")
    batches = C.paragraph_batches(recs, n_batches=2, batch_size=3, seed=0)
    assert [len(b) for b in batches] == [3, 3]
    flat = [r["id"] for b in batches for r in b]
    assert len(set(flat)) == 6
    for b in batches:   # whole paragraphs in a row: a context never reappears after another one
        contexts = [r["context"] for r in b]
        assert contexts == sorted(contexts, key=contexts.index)


def test_train_bench_losses_agree(setup: C.Setup) -> None:
    import train_vs_peft as T

    batches = C.paragraph_batches(fixture_records("train"), n_batches=1, batch_size=4, seed=0)
    table = C.prompt_table(setup, init="random", seed=0)
    result = T.run(setup, batches, table, repeats=2, warmup=1, max_seq_length=512, peak_repeats=1, bf16=True)
    assert result["agreement"]["ok"], result["agreement"]
    assert {"ours-plain-bf16", "ours-shared-bf16"} <= set(result["rows"]) and "matmul_peak_bf16" in result
    bf16 = result["agreement"]["per_side"]["ours-shared-bf16"]
    assert 0 < bf16["loss_rel_diff"] <= bf16["tol"] == T.bf16_tolerance(setup.model.config)   # bf16 really ran
    assert "bf16-true vs fp32, shared-prefix step" in T.report(result)
    assert len(result["matmul_peak"]["per_round_gflops"]) == 2     # a peak per round, between the passes
    for name, row in result["rows"].items():
        assert len(row["pct_of_peak_per_round"]) == 2 and row["pct_of_peak"] > 0 and row["pct_of_peak_best"] > 0, name
    assert {"peft", "ours-plain"} <= set(result["rows"])
    for name, row in result["rows"].items():
        assert row["examples_per_s"] > 0 and row["counted_flops_batch0"] > 0, name
        assert row["speedup_vs_peft_paired"] == pytest.approx(
            M.median([a / b for a, b in zip(result["rows"]["peft"]["pass_seconds"], row["pass_seconds"])])), name
    # the analytic count is what torch counts, for the plain and the shared-prefix layouts
    for name, row in result["rows"].items():
        assert row["analytic_flops_batch0"] == pytest.approx(row["counted_flops_batch0"], rel=0.005), name
    assert "agreement OK" in T.report(result)


def test_eval_bench_answers_identical(setup: C.Setup) -> None:
    import eval_vs_peft as E

    batches = C.paragraph_batches(fixture_records("dev"), n_batches=1, batch_size=5, seed=0)
    table = C.prompt_table(setup, init="random", seed=0)
    k, budget = E.default_lookup()
    result = E.run(setup, batches, table, repeats=1, tokens_to_generate=6, peft_unbatched=True, lookup=k, pass_budget=budget)
    assert result["identical"], result["mismatches"]
    assert len(result["answers"]) == 5 and {"peft", "ours-plain", "ours-shared-lookup"} <= set(result["rows"])
    assert result["rows"]["ours-shared-lookup"]["decoding_per_pass"]["forward_passes"] > 0
    assert result["rows"]["ours-shared-lookup"]["speedup_vs_peft_paired"] > 0
    assert k > 0 and budget == 32          # the GPT evaluation config drafts from the prompt, within a budget
    assert "identical to PEFT" in E.report(result)


def test_train_bench_refuses_a_ratio_when_the_losses_disagree(setup: C.Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    import train_vs_peft as T

    real = T.peft_batch

    def fewer_labels(examples, pad_id):   # PEFT scores two tokens fewer per row: another loss
        batch = real(examples, pad_id)
        batch["labels"][:, -2:] = -100
        return batch

    monkeypatch.setattr(T, "peft_batch", fewer_labels)
    batches = C.paragraph_batches(fixture_records("train"), n_batches=1, batch_size=4, seed=0)
    result = T.run(setup, batches, C.prompt_table(setup, init="random", seed=0), repeats=1, warmup=1,
                   max_seq_length=512, measure_peak=False, compile_plain=False)
    assert not result["agreement"]["ok"] and "no speed ratio" in result["ratio_refused"]
    assert all(r["speedup_vs_peft"] is None and r["speedup_vs_peft_paired"] is None for r in result["rows"].values())
    assert "NO RATIO: loss/gradient of ours-" in T.report(result)


def test_eval_bench_refuses_a_ratio_when_the_answers_differ(setup: C.Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    import eval_vs_peft as E

    real = E.peft_generate
    monkeypatch.setattr(E, "peft_generate", lambda *a, **k: [ans + " garbage" for ans in real(*a, **k)])
    batches = C.paragraph_batches(fixture_records("dev"), n_batches=1, batch_size=5, seed=0)
    result = E.run(setup, batches, C.prompt_table(setup, init="random", seed=0), repeats=1, tokens_to_generate=4,
                   engine_batching=False, lookup=0)
    assert not result["identical"] and "10 answer(s) of ours differ" in result["ratio_refused"]   # 5 x (plain, shared)
    assert all(r["speedup_vs_peft"] is None and r["speedup_vs_peft_paired"] is None for r in result["rows"].values())
    assert "NO RATIO:" in E.report(result)


def test_host_memory_bench_runs_both_settings_in_children(setup: C.Setup, tmp_path: Path) -> None:
    import json

    import host_memory as H

    squad = tmp_path / "data" / "prompt_data" / "v1.1"
    squad.mkdir(parents=True)
    (squad / C.SQUAD_FILES["train"]).write_text("".join(json.dumps(r) + "\n" for r in fixture_records("train")))
    out = tmp_path / "hm.json"
    assert H.main(["--model", setup.model_path, "--data-dir", str(tmp_path / "data"), "--batches", "1", "--batch-size", "3",
                   "--repeats", "2", "--init", "random", "--max-seq-length", "512", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [sorted(r) for r in doc["rounds"]] == [["default", "reuse"]] * 2
    for r in doc["rounds"]:
        assert r["default"]["setting"] == "default" and r["reuse"]["setting"] == "reuse"
        for s in ("default", "reuse"):
            assert set(r[s]["passes"]) == set(H.KINDS) and r[s]["peak_rss_mb"] > 0
    for kind, row in doc["rows"].items():
        assert row["speedup_paired"] == pytest.approx(
            M.median([a / b for a, b in zip(row["seconds"]["default"], row["seconds"]["reuse"])])), kind
    assert "x paired" in H.report(doc)


def test_launcher_overhead_measures_the_dry_run() -> None:
    import launcher_overhead as L

    result = L.measure(1)
    assert set(result["median_seconds"]) == {"python -c pass", L.FLOOR, L.DRY_RUN}
    assert result["median_seconds"][L.DRY_RUN] > result["median_seconds"]["python -c pass"]


def test_paired_speedup_pairs_passes_of_the_same_round() -> None:
    # round 2 ran on a machine twice as slow for both sides: paired ratios stay 2, the ratio of medians does not
    ref, side = [4.0, 8.0, 4.2], [2.0, 4.0, 2.1]
    assert M.paired_speedup(ref, side) == pytest.approx(2.0)
    assert M.paired_speedup([10.0, 2.0, 9.0], [1.0, 2.0, 3.0]) == pytest.approx(3.0)


def test_result_file_records_machine_and_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = M.write_result(tmp_path / "r.json", {"bench": "x", "rows": {}})
    import json

    doc = json.loads(out.read_text())
    assert doc["machine"]["cpu_count"] and doc["command"] and doc["bench"] == "x"
    flags = set(Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()) if Path("/proc/cpuinfo").is_file() else set()
    assert set(doc["machine"].get("cpu_matmul_flags", [])) == flags & M.CPU_MATMUL_FLAGS
    printed = capsys.readouterr().out
    assert printed.startswith(f"machine: {doc['machine'].get('cpu_model', '?')}, ")


def test_quality_bench_runs_both_sides_and_scores_every_budget(tmp_path: Path) -> None:
    """bench/quality_vs_peft.py end to end on the tiny random Llama and the tiny SQuAD fixture, with budgets of
    about a second: both sides train interleaved, agree on the first batch, and every kept table is scored by the
    same decoder; the JSON and the plot are written."""
    import json

    from tests.support.tiny_models import build

    import quality_vs_peft as Q

    folder = build("llama", tmp_path / "llama_tiny_random")
    data = tmp_path / "data" / "prompt_data" / "v1.1"
    data.mkdir(parents=True)
    (data / "squad_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fixture_records("train")))
    dev = [{**r, "answer": [r["answer"]]} for r in fixture_records("dev")]
    (data / "squad_test_ground_truth.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dev))
    out = tmp_path / "q.json"
    code = Q.main(["--model", str(folder), "--data-dir", str(tmp_path / "data"), "--budgets", "0.01,0.02",
                   "--reference-minutes", "0.01", "--eval", "3", "--eval-offset", "0", "--train-examples", "7",
                   "--batch-size", "2", "--precision", "32", "--chunk-seconds", "0.2", "--tokens-to-generate", "4",
                   "--out", str(out)])
    doc = json.loads(out.read_text())
    assert code == 0 and doc["agreement"]["ok"], doc["agreement"]
    assert sorted(doc["rows"]) == ["ours", "peft"]
    for pts in doc["rows"].values():
        assert [p["minutes"] for p in pts] == [0.01, 0.02] and all(p["total"] == 3 and p["steps"] >= 1 for p in pts)
    assert doc["machine"]["cpu_count"] >= 1 and out.with_suffix(".png").stat().st_size > 0
    assert Q.minutes_to_reach([(1.0, 10.0), (2.0, 30.0)], 20.0) == 1.5
    assert Q.minutes_to_reach([(1.0, 10.0)], 20.0) is None


def test_cost_growth_bench_runs_on_the_tiny_model(setup: C.Setup, tmp_path: Path) -> None:
    """bench/cost_growth.py's two tables on the tiny random Llama and the tiny SQuAD fixture (one small setting each)."""
    import json

    import cost_growth as G

    data = tmp_path / "data" / "prompt_data" / "v1.1"
    data.mkdir(parents=True)
    for split, name in (("train", "squad_train.jsonl"), ("dev", "squad_val.jsonl")):
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in fixture_records(split)))
    out = tmp_path / "g.json"
    assert G.main(["--model", setup.model_path, "--data-dir", str(tmp_path / "data"), "--seq-lengths", "512",
                   "--min-fill", "0", "--batch-sizes", "2", "--repeats", "1", "--eval-questions", "3", "--eval-batch-sizes", "2",
                   "--answer-lengths", "4", "--bf16", "on", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [r["precision"] for r in doc["train"]] == ["32", "bf16-true"]
    assert all(r["step_seconds"] > 0 and r["gflop_per_step"] > 0 for r in doc["train"])
    assert doc["eval"][0]["questions_per_s"] > 0 and "not measured" in doc["gpu_assumption"]


@pytest.mark.parametrize("precision", ["32", "bf16-true"])
def test_profile_step_accounts_for_the_step(setup: C.Setup, precision: str) -> None:
    """bench/profile_step.py on the tiny Llama: the matmul FLOPs torch's profiler counts in one pass, and those of the
    matmul shapes it recorded (replayed alone), are the analytic FLOPs of that pass (train_vs_peft's count, itself
    checked against FlopCounterMode); the categories cover all the profiled self time; replayed matmuls + rest = the
    unprofiled pass."""
    import profile_step as P

    batches = C.paragraph_batches(fixture_records("train"), n_batches=1, batch_size=3, seed=0)
    table = C.prompt_table(setup, init="random", seed=0)
    r = P.run(setup, batches, table, repeats=1, max_seq_length=512, precision=precision, peak_repeats=1)
    assert r["profiled"]["categories"]["matmul"]["flops"] == pytest.approx(r["analytic_flops_per_pass"], rel=0.02)
    assert r["matmul_flops"] == pytest.approx(r["analytic_flops_per_pass"], rel=0.02)
    assert r["replayed_matmuls"]["attention"]["flops"] > 0 and r["replayed_matmuls"]["linear"]["flops"] > 0
    assert sum(v["share"] for v in r["profiled"]["categories"].values()) == pytest.approx(1.0)
    assert r["matmul_seconds"] + r["rest_seconds"] >= r["median_pass_seconds"] * 0.999
    assert sum(r["rest_apportioned_seconds"].values()) == pytest.approx(r["rest_seconds"])
    assert all(o["op"] not in P.MATMUL for o in r["profiled"]["top_non_matmul_ops"])
    assert "explanation: the step's matmuls, replayed alone" in P.report(r)
    assert [P.category(n) for n in ("aten::addmm", "aten::_softmax", "aten::silu", "aten::copy_", "MmBackward0")] == [
        "matmul", "attention softmax", "elementwise and reductions", "copies and layout", "other"]
