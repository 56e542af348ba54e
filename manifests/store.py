"""A dataset folder on any fsspec filesystem: local paths, ``file://``, ``s3://``, ``gs://``, ``memory://``.

All writes that other readers may see go through ``write_atomic`` (temporary name, flush, fsync where the
filesystem has one, rename), so a reader never sees half a file.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from contextlib import contextmanager
from typing import IO, Iterator

import fsspec


class Store:
    def __init__(self, uri: str):
        self.uri = str(uri)
        self.fs, root = fsspec.core.url_to_fs(self.uri)
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
        """Deletes leftovers of interrupted atomic writes in ``folder``; returns their names."""
        gone = [n for n in self.list(folder) if n.startswith(".") and ".tmp-" in n]
        for n in gone:
            self.remove(folder, n)
        return gone
