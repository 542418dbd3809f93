"""Reading what the trackers wrote, with the trackers' own formats: W&B offline runs (``run-<id>.wandb``: records of
wandb's protobuf ``wandb_internal_pb2.Record`` in W&B's LevelDB-style log framing) and MLflow runs through
``MlflowClient`` on a ``file:`` store. wandb 0.31 no longer ships a Python reader of the .wandb file (its Go core
reads it), so the framing is undone here: 32 KiB blocks of chunks with a 7-byte header (CRC-32C, length, type
FULL/FIRST/MIDDLE/LAST) after the 7-byte file header ``:W&B`` 0xBEE1 version 0; a wrong framing fails the parse."""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def offline_trackers(tmp_path: Path, monkeypatch: Any) -> Path:
    """W&B offline, with its config, cache and staging folders in the test's temporary folder (no network, no key);
    MLflow's ``file:`` stores readable by the test's own ``MlflowClient`` (the stages opt in themselves)."""
    home = tmp_path / "wandb_home"
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"),
                     ("WANDB_ARTIFACT_DIR", "artifacts")):
        (home / sub).mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(var, str(home / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return home


def wandb_records(path: Path) -> list[Any]:
    """Every record of one ``.wandb`` file, parsed with wandb's protobuf classes."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    records, chunk, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:   # the block's tail is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        pos += HEADER
        if kind == 0 and length == 0:   # zero padding at the end of a file still being written
            break
        chunk += data[pos:pos + length]
        pos += length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


@dataclass
class WandbRun:
    """What the records of one W&B run say (all its .wandb files: a resumed run has one per process)."""

    ids: set[str] = field(default_factory=set)
    files: list[Path] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    artifacts: list[Any] = field(default_factory=list)   # the ArtifactRecord protobufs


def _put(target: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value


def read_wandb_runs(folder: Path) -> WandbRun:
    """Every offline run under ``folder`` (``folder/wandb/offline-run-*/run-*.wandb``), merged in file order."""
    out = WandbRun()
    for path in sorted(Path(folder).glob("wandb/offline-run-*/run-*.wandb")):
        out.files.append(path)
        for rec in wandb_records(path):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                out.ids.add(rec.run.run_id)
                for item in rec.run.config.update:
                    out.config[item.key] = json.loads(item.value_json)
            elif kind == "history":
                row: dict[str, Any] = {}
                for item in rec.history.item:
                    _put(row, list(item.nested_key) or [item.key], json.loads(item.value_json))
                out.history.append(row)
            elif kind == "summary":
                for item in rec.summary.update:
                    _put(out.summary, list(item.nested_key) or [item.key], json.loads(item.value_json))
            elif kind == "artifact":
                out.artifacts.append(rec.artifact)
    return out


def artifact_files(artifact: Any) -> dict[str, str]:
    """``path -> digest`` (base64 MD5, as W&B records it) of an ArtifactRecord's manifest."""
    return {entry.path: entry.digest for entry in artifact.manifest.contents}


def md5_b64(path: Path) -> str:
    import base64
    import hashlib

    return base64.b64encode(hashlib.md5(Path(path).read_bytes()).digest()).decode()


def table_rows(run_dir_files: list[Path], key: str) -> tuple[list[str], list[list[Any]]]:
    """(columns, data) of the last ``wandb.Table`` logged under ``key``, from the table JSON W&B wrote."""
    tables = sorted(p for f in run_dir_files for p in f.parent.glob(f"files/media/table/{key}_*.table.json"))
    assert tables, f"no table {key!r} next to {run_dir_files}"
    table = json.loads(tables[-1].read_text())
    return table["columns"], table["data"]
