"""A dataset folder on any fsspec filesystem: local paths, ``file://``, ``s3://``, ``gs://``, ``memory://``.

All writes that other readers may see go through ``write_atomic`` (temporary name, flush, fsync where the
filesystem has one, rename), so a reader never sees half a file.
"""

from __future__ import annotations

import os
import posixpath
import re
import uuid
from contextlib import contextmanager
from typing import IO, Iterator

import fsspec

TEMPORARY = re.compile(r"^\..+\.tmp-[0-9a-f]{8}$")  # what open_atomic names its temporary files
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}  # protocol -> the pip extra that provides it


class StoreError(ValueError):
    """A dataset location that cannot be used: unknown protocol, missing filesystem package, not a folder."""


class Store:
    def __init__(self, uri: str):
        self.uri = str(uri)
        protocol = self.uri.split("://", 1)[0] if "://" in self.uri else "file"
        try:
            self.fs, root = fsspec.core.url_to_fs(self.uri)
        except ImportError as e:
            extra = EXTRAS.get(protocol)
            hint = f"pip install 'dreamcache[{extra}]' (or pip install -e '.[{extra}]')" if extra else str(e)
            raise StoreError(f"{self.uri}: {protocol}:// needs a filesystem package that is not installed: {hint}") from None
        except (ValueError, OSError) as e:
            raise StoreError(f"{self.uri}: cannot open {protocol}:// ({str(e).splitlines()[0]}); use a local path or "
                             "an fsspec URL such as s3://bucket/prefix") from None
        self.root = root.rstrip("/") or "/"
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def url(self, *parts: str) -> str:
        """Full URL of a file, as a reader (webdataset, the trainer) should open it."""
        return self.fs.unstrip_protocol(self.path(*parts)) if not self.local else self.path(*parts)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.path(*parts))

    def list(self, folder: str, suffix: str = "") -> list[str]:
        """Names (not paths) in ``folder`` ending with ``suffix``, sorted; [] if the folder is missing."""
        try:
            names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.path(folder), detail=False)]
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.endswith(suffix))

    def sizes(self, folder: str) -> dict[str, int]:
        """{name: bytes} of the visible files in ``folder`` (not starting with "."), from one listing call."""
        try:
            entries = self.fs.ls(self.path(folder), detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for e in entries:
            name = posixpath.basename(e["name"].rstrip("/"))
            if e.get("type") != "directory" and not name.startswith("."):
                out[name] = int(e.get("size") or 0)
        return out

    def remove(self, *parts: str) -> None:
        if self.exists(*parts):
            self.fs.rm(self.path(*parts))

    def size(self, *parts: str) -> int:
        return int(self.fs.size(self.path(*parts)))

    @contextmanager
    def open_atomic(self, *parts: str) -> Iterator[IO[bytes]]:
        """Write to a hidden temporary file beside the target; rename it into place only on success."""
        final = self.path(*parts)
        folder, name = posixpath.split(final)
        tmp = posixpath.join(folder, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
        self.fs.makedirs(folder, exist_ok=True)
        try:
            with self.fs.open(tmp, "wb") as f:
                yield f
                f.flush()
                if self.local:
                    os.fsync(f.fileno())
            self.fs.mv(tmp, final)
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
            raise

    def write_atomic(self, data: bytes, *parts: str) -> None:
        with self.open_atomic(*parts) as f:
            f.write(data)

    def remove_temporaries(self, folder: str) -> list[str]:
        """Deletes leftovers of interrupted atomic writes in ``folder`` (only names ``open_atomic`` makes)."""
        gone = [n for n in self.list(folder) if TEMPORARY.match(n)]
        for n in gone:
            self.remove(folder, n)
        return gone


def write_file_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` (local or URL) through a temporary file and a rename: an existing file is
    replaced only once the new one is complete."""
    folder, name = posixpath.split(str(path))
    Store(folder or ".").write_atomic(data, name)
