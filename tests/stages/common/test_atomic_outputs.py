"""Atomic outputs: a write interrupted at any point (an exception, or SIGKILL) never leaves a partial file under
the final name, and the stage that would read it next does not take it for complete.
"""
from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from stages.common import io
from stages.common.errors import UserError
from tests.support.launcher import ROOT, run_main


class Boom(RuntimeError):
    pass


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_path_interrupted_midway_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old complete content\n")
    with pytest.raises(Boom):
        with io.atomic_path(target) as tmp, open(tmp, "w") as fh:
            fh.write("new half")
            raise Boom()
    assert target.read_text() == "old complete content\n"
    assert leftovers(tmp_path) == []


def test_write_jsonl_failing_record_writes_nothing(tmp_path):
    def records():
        yield {"a": 1}
        yield {"a": 2}
        raise Boom("the source broke after two records")

    with pytest.raises(Boom):
        io.write_jsonl(tmp_path / "x.jsonl", records())
    assert not (tmp_path / "x.jsonl").exists() and leftovers(tmp_path) == []


KILL_MID_PREPARE = """
import os, runpy, signal, sys
sys.path.insert(0, {root!r})
import stages.data_preparation.squad as squad
real = squad.write_jsonl
def write_jsonl(path, records):
    if path.name != "squad_val.jsonl":
        return real(path, records)
    def dying():
        for i, rec in enumerate(records):
            if i == 3:
                os.kill(os.getpid(), signal.SIGKILL)   # three records of squad_val.jsonl are in the temporary file
            yield rec
    return real(path, dying())
squad.write_jsonl = write_jsonl
sys.argv = ["run.py", "--config", {config!r}]
runpy.run_path({entry!r}, run_name="__main__")
"""


def test_sigkill_during_data_preparation_leaves_no_partial_jsonl_and_no_marker(tmp_path):
    from omegaconf import OmegaConf

    from tests.support.data_preparation import make_cfg

    data = tmp_path / "data"
    out = data / "prompt_data" / "v1.1"
    cfg = make_cfg(tmp_path, output_dir=str(out), sha256={"train": None, "dev": None})
    config = tmp_path / "prep.yaml"
    OmegaConf.save(cfg, config)
    code = KILL_MID_PREPARE.format(root=str(ROOT), config=str(config), entry=str(ROOT / "stages/data_preparation/run.py"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (out / "squad_train.jsonl").is_file()              # written completely before the kill
    assert not (out / "squad_val.jsonl").exists()             # killed mid-write: nothing under the final name
    (partial,) = [p for p in out.iterdir() if p.name.startswith(".squad_val.jsonl.")]
    assert len(partial.read_text().splitlines()) < 5        # at most the 3 records written before the kill, of 5
    assert not (out / "_SUCCESS.json").exists()               # so a rerun is not a no-op

    # the next stage does not start on it: one line, nothing written
    results = tmp_path / "launch"
    proc = run_main(["stages=[prompt_learning]", f"base_results_dir={results}", f"data_dir={data}"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: prompt_learning.model.data.validation_ds: '{out / 'squad_val.jsonl'}' does not exist; "
        "run the data_preparation stage first or fix the path"]
    assert not results.exists()

    # the rerun completes and sweeps the leftover
    from stages.data_preparation.squad import prepare

    prepare(cfg)
    assert (out / "_SUCCESS.json").is_file() and leftovers(out) == []


def test_checkpoint_save_interrupted_keeps_the_previous_last_ckpt(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from stages.prompt_learning.fault.checkpoint_io import AtomicCheckpointIO

    io_ = AtomicCheckpointIO()
    last = tmp_path / "last.ckpt"
    io_.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, last)
    real = torch.save

    def half_then_fail(obj, f, *a, **kw):
        f.write(b"PK\x03\x04 half a zip")
        raise Boom("disk full")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(Boom):
        io_.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, last)
    monkeypatch.setattr(torch, "save", real)
    assert torch.load(last, weights_only=True)["global_step"] == 1
    assert leftovers(tmp_path) == []


def test_artifact_write_interrupted_keeps_the_previous_artifact(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from stages.engine.template import parse_templates
    from stages.engine import artifact
    from tests.support.templates import SQUAD_T

    templates = parse_templates([SQUAD_T])
    kw = dict(templates=templates, style="prompt-tuning", base={"resolved": "/m"}, add_eos=True, max_seq_length=64,
              training={})
    path = tmp_path / "prompt_artifact"
    artifact.save_artifact(path, tables={"squad": torch.ones(4, 8)}, **kw)

    def failing_export(folder, *a, **k):
        (folder / "npy").mkdir(parents=True)
        (folder / "npy" / "squad.npy").write_bytes(b"\x93NUMPY half")
        raise Boom("killed during the exports")

    monkeypatch.setattr(artifact, "write_exports", failing_export)
    with pytest.raises(Boom):
        artifact.save_artifact(path, tables={"squad": torch.zeros(4, 8)}, **kw)
    meta, _, tables = artifact.load_artifact(path)         # the earlier artifact, whole
    assert torch.equal(tables["squad"], torch.ones(4, 8))
    assert (path / "export" / "npy" / "squad.npy").stat().st_size > 100
    assert leftovers(tmp_path) == []


def test_evaluation_interrupted_before_metrics_leaves_no_metrics_json(tmp_path, monkeypatch):
    from stages.evaluation import evaluate as ev
    from tests.support.evaluation import SQUAD_RECORDS, FakeModel, make_artifact, make_cfg, write_jsonl
    from tests.support.templates import SQUAD_T

    monkeypatch.setattr(ev, "load_prompted_model", lambda s, precision="32": FakeModel([SQUAD_T], str(s.artifact_path)))
    test_ds = write_jsonl(tmp_path / "test.jsonl", SQUAD_RECORDS)
    cfg = make_cfg(tmp_path, test_ds, make_artifact(tmp_path))
    ev.evaluate(cfg)
    out = tmp_path / "results"
    assert (out / "metrics.json").is_file()

    real = ev.write_text

    def failing_summary(path, text, *a, **k):
        raise Boom("killed before metrics.json")

    monkeypatch.setattr(ev, "write_text", failing_summary)
    with pytest.raises(Boom):
        ev.evaluate(cfg)
    # new predictions may be there, but without metrics.json nothing claims the set is complete
    assert not (out / "metrics.json").exists() and leftovers(out) == []
    monkeypatch.setattr(ev, "write_text", real)


def test_rendered_script_interrupted_is_not_left_half_written(tmp_path, monkeypatch):
    from launcher import app

    calls = {"n": 0}
    real_atomic = io.atomic_path

    def flaky_atomic(path, suffix="", size=None):
        calls["n"] += 1
        if str(path).endswith("_local.sh"):
            raise Boom("killed while writing the script")
        return real_atomic(path, suffix, size)

    monkeypatch.setattr(io, "atomic_path", flaky_atomic)
    from tests.support.launcher import compose_cfg

    cfg = compose_cfg([f"base_results_dir={tmp_path}/r", f"data_dir={tmp_path}/d", "stages=[data_preparation]", "dry_run=true"])
    with pytest.raises(Boom):
        app.run(cfg, [])
    assert not list((tmp_path / "r").rglob("*.sh")) and not list((tmp_path / "r").rglob("*.tmp"))


def test_metrics_csv_is_rewritten_whole_and_keeps_rows_before_the_resumed_step(tmp_path):
    pytest.importorskip("pytorch_lightning")
    from stages.prompt_learning.fault.csv_logger import atomic_csv_logger

    first = atomic_csv_logger(str(tmp_path), lambda: 0)
    for step in range(5):
        first.log_metrics({"train_loss": float(step)}, step=step)
    first.save()
    csv = tmp_path / "csv" / "metrics.csv"
    assert len(csv.read_text().splitlines()) == 6
    # a resumed run (from step 3): keeps rows 0-2 of the interrupted run, then its own
    second = atomic_csv_logger(str(tmp_path), lambda: 3)
    second.log_metrics({"train_loss": 30.0, "val_loss": 1.0}, step=3)
    second.save()
    rows = csv.read_text().splitlines()
    assert rows[0] == "step,train_loss,val_loss" and [r.split(",")[0] for r in rows[1:]] == ["0", "1", "2", "3"]
    assert leftovers(csv.parent) == []


@pytest.mark.parametrize("code,what", [(errno.ENOSPC, "no space left on the device"), (errno.EDQUOT, "disk quota exceeded")])
def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_temporary_file(tmp_path, monkeypatch, code, what):
    def full(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", full)
    target = tmp_path / "out" / "config.yaml"
    with pytest.raises(UserError) as err:
        io.write_text(target, "abc\n")
    assert re.fullmatch(rf"{re.escape(str(target))}: {what} \(4 bytes to write, [\d,]+ bytes free there\); free some space "
                        rf"or write to another folder", str(err.value))
    assert os.listdir(tmp_path / "out") == []
