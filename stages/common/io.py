"""Atomic file output: a reader never sees a half-written file.

Everything the launcher and the stages write goes through here: write to a temporary file in the
same folder, fsync, then rename over the target (rename is atomic on POSIX filesystems) and fsync the
folder, so the rename itself survives a crash. A process killed mid-write leaves at most a hidden
``.<name>.<random>.tmp`` next to the target, never a partial file under the target's name; readers
only ever open the final name. ``remove_stale_tmp`` sweeps such leftovers where a single writer owns
the folder (e.g. the checkpoint folder when a run resumes).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from stages.common.errors import UserError


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make a rename or unlink in ``folder`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_tmp(folder: str | os.PathLike[str], names: Iterable[str] | None = None) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files and folders (and ``.<name>.old``) an interrupted atomic write left in
    ``folder``; only for the given target ``names`` if any. Call it only where a single writer owns those
    targets (a concurrent writer's temporary file would vanish under it).
    """
    removed: list[Path] = []
    root = Path(folder)
    if not root.is_dir():
        return removed
    wanted = None if names is None else {str(n) for n in names}
    for p in root.iterdir():
        n = p.name
        if not (n.startswith(".") and (n.endswith(".tmp") or n.endswith(".old"))):
            continue
        if wanted is not None and not any(n == f".{w}.old" or n.startswith(f".{w}.") for w in wanted):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


_FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded"}


@contextlib.contextmanager
def no_space_as_error(target: Path, size: int | None = None) -> Iterator[None]:
    """A full disk or quota while writing ``target`` becomes the one line that names it, the bytes to write (when
    known) and the bytes free there, instead of a chain of tracebacks."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _FULL:
            raise
        folder = target.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        need = f"{size:,} bytes to write, " if size is not None else ""
        raise UserError(f"{target}: {_FULL[exc.errno]} ({need}{shutil.disk_usage(folder).free:,} bytes free there); "
                        f"free some space or write to another folder") from None


def _umask() -> int:
    """The process umask (only readable by setting it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = "", size: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``, else delete it. A full disk is
    a UserError naming ``path`` (and ``size``, the bytes to write, when the caller knows them)."""
    target = Path(path)
    with no_space_as_error(target, size):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; shared data/results folders need the usual mode
        try:
            yield tmp_path
            if tmp_path.is_file():
                with open(tmp_path, "rb") as fh:
                    os.fsync(fh.fileno())
            os.replace(tmp_path, target)
            fsync_dir(target.parent)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp_path.unlink()
            raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` as a whole.

    Replacing an existing folder takes two renames (old aside, new in): a kill between them leaves no
    folder at ``path`` (the previous one is in ``.<name>.old``), never a mix of old and new files.
    """
    target = Path(path)
    with no_space_as_error(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        os.chmod(tmp, 0o777 & ~_umask())
        try:
            yield tmp
            for f in sorted(tmp.rglob("*")):  # contents first, so the renamed folder is complete after a power loss too
                if f.is_file() and not f.is_symlink():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
                elif f.is_dir():
                    fsync_dir(f)
            fsync_dir(tmp)
            if target.exists():
                old = target.with_name(f".{target.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
            fsync_dir(target.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def write_text(path: str | os.PathLike[str], text: str, mode: int | None = None) -> Path:
    """Atomically write ``text`` to ``path`` (optionally chmod), return the path."""
    with atomic_path(path, size=len(text.encode("utf-8"))) as tmp:
        tmp.write_text(text, encoding="utf-8")
        if mode is not None:
            os.chmod(tmp, mode)
    return Path(path)


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Atomically write ``obj`` as indented, key-sorted JSON."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: str | os.PathLike[str], records: Iterable[dict[str, Any]]) -> int:
    """Atomically write one JSON object per line; return the number of records."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


def text_lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 text file; a line that is not UTF-8 is a UserError naming ``file:line``."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not UTF-8 text (byte {exc.start} of the line: {exc.reason}); "
                                f"re-save the file as UTF-8") from None
