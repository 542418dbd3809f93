"""The ``.nemo`` container: a tar (uncompressed from NeMo 1.7, gzip before), members named ``./...``, or the same
files in a folder (``pack_nemo_file=False``, or a user's ``tar -x``).

Members are read in place (a seekable file object of the tar), never extracted, so a refused archive leaves
nothing on disk. Every problem is one :class:`UserError` line naming the config key and the file.
"""
from __future__ import annotations

import tarfile
import zlib
from pathlib import Path
from contextlib import contextmanager
from typing import IO, Iterator

from stages.common.errors import UserError

CONFIG = "model_config.yaml"


class NemoArchive:
    """The members of one ``.nemo`` by their name without ``./``; open with :meth:`open` (a context manager)."""

    def __init__(self, path: Path, key: str) -> None:
        self.path = path
        self.key = key
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        self.names: list[str] = []

    def where(self) -> str:
        return f"{self.key}={self.path}"

    @contextmanager
    def opened(self) -> Iterator["NemoArchive"]:
        if self.path.is_dir():
            self.names = sorted(str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_file())
            yield self
            return
        try:
            self._tar = tarfile.open(self.path, "r:*")
            members = self._tar.getmembers()
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            if self._tar is not None:
                self._tar.close()
                self._tar = None
            raise UserError(f"{self.where()}: not a readable .nemo archive (a tar, gzip or not): {exc}; copy the "
                            "file again, it may be truncated") from None
        size = self.path.stat().st_size
        compressed = _gzip(self.path)   # member offsets are positions in the decompressed stream then
        try:
            for m in members:
                if not m.isfile():
                    continue
                name = _clean(m.name)
                if name is None:
                    raise UserError(f"{self.where()}: member '{m.name}' leaves the archive (absolute or '..'); "
                                    "refusing to read it")
                if not compressed and m.offset_data + m.size > size:
                    raise UserError(f"{self.where()}: the archive is truncated (member '{m.name}' ends at byte "
                                    f"{m.offset_data + m.size}, the file has {size}); copy the file again")
                self._members[name] = m
            self.names = sorted(self._members)
            yield self
        finally:
            self._tar.close()
            self._tar = None

    def has(self, name: str) -> bool:
        return name in self.names

    def model_config(self) -> dict:
        """``model_config.yaml`` as a mapping; its absence or a YAML error is one line."""
        import yaml

        if not self.has(CONFIG):
            raise UserError(f"{self.where()}: holds no {CONFIG}, so it is not a NeMo model (members: "
                            f"{', '.join(self.names[:8]) or 'none'})")
        try:
            cfg = yaml.safe_load(self.read_bytes(CONFIG).decode("utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise UserError(f"{self.where()}: {CONFIG} is not readable YAML ({str(exc).splitlines()[0]}); the .nemo "
                            "is damaged") from None
        if not isinstance(cfg, dict):
            raise UserError(f"{self.where()}: {CONFIG} is not a mapping of keys; the .nemo is damaged")
        return cfg

    def read_bytes(self, name: str) -> bytes:
        with self.member(name) as fh:
            return fh.read()

    @contextmanager
    def member(self, name: str) -> Iterator[IO[bytes]]:
        """A readable (and, for an uncompressed tar or a folder, seekable) file object of one member."""
        if self._tar is None:
            with open(self.path / name, "rb") as fh:
                yield fh
            return
        fh = self._tar.extractfile(self._members[name])
        assert fh is not None
        try:
            yield fh
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise UserError(f"{self.where()}: member '{name}' cannot be read ({exc}); the archive is damaged or "
                            "truncated: copy the file again") from None
        finally:
            fh.close()

    def state_dict(self, name: str, where: str) -> dict:
        """A member saved with ``torch.save`` (weights only), unwrapped from Lightning's ``state_dict``; a damaged
        one is one line naming it."""
        import torch

        try:
            with self.member(name) as fh:
                state = torch.load(fh, map_location="cpu", weights_only=True)
        except UserError:
            raise
        except Exception as exc:  # a damaged pickle/zip, or objects a weights-only load refuses
            raise UserError(f"{where}: {name} cannot be read as a PyTorch state dict ({type(exc).__name__}: "
                            f"{str(exc)[:160]}); the .nemo is damaged or truncated: copy it again") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise UserError(f"{where}: {name} is not a state dict; the .nemo is damaged")
        return state

    def artifact(self, value: str, config_key: str) -> str:
        """The member a ``nemo:<uuid>_<name>`` config value names (also a bare basename or ``/artifacts/...``,
        which older files hold: matched by the ending, as NeMo's own exporter does)."""
        ref = value[len("nemo:"):] if value.startswith("nemo:") else value
        base = ref.rsplit("/", 1)[-1]
        if base in self.names:
            return base
        ends = [n for n in self.names if "/" not in n and n.endswith(base)]
        if not ends:
            raise UserError(f"{self.where()}: model_config.yaml {config_key}: {value} names a file the archive "
                            f"does not hold (members: {', '.join(self.names[:8])}); the .nemo is incomplete: "
                            "save or copy it again")
        if len(ends) > 1:
            raise UserError(f"{self.where()}: model_config.yaml {config_key}: {value} matches several members "
                            f"({', '.join(ends)}); keep one")
        return ends[0]


def peek_config(path: Path, key: str) -> dict | None:
    """``model_config.yaml`` of a ``.nemo`` folder or uncompressed tar, read before launch (seeks over the weights);
    None for a gzip ``.nemo`` (NeMo < 1.7), whose members are only reached by decompressing the weights: the job
    reads it then."""
    if path.is_file() and _gzip(path):
        return None
    with NemoArchive(path, key).opened() as archive:
        return archive.model_config()


def _clean(name: str) -> str | None:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts:
        return None
    return "/".join(parts)


def _gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"
