"""A dataset folder on any fsspec filesystem: local paths, ``file://``, ``s3://``, ``gs://``, ``memory://``.

All writes that other readers may see go through ``open_atomic`` / ``write_atomic``, so a reader never sees
half a file. On a filesystem (local disk, NFS, HDFS...) that is a temporary name beside the target, flushed,
fsynced where the filesystem has one, then renamed, and on a local disk the folder is fsynced after the rename
(POSIX makes a rename durable only once its directory is). On an object store, where a "rename" is a copy of
the whole object plus a delete, the object is written straight to its final key: it becomes visible only when
the upload completes (a single PUT, or the completion of a multipart upload), and an upload that fails or is
abandoned is never visible (an abandoned multipart upload is aborted, or expires under the bucket's lifecycle
rule).

Small files that several writers race for (the run lock) also have conditional writes where the store offers
them: an exclusive create, and on S3 a replacement conditional on the version read (``If-Match`` on the ETag).
An S3-compatible store that answers a conditional write with 501 Not Implemented is used without them from
then on (logged once): its callers fall back to what they do on stores that have none.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import re
import uuid
from contextlib import contextmanager
from typing import IO, Iterator

import fsspec

TEMPORARY = re.compile(r"^\..+\.tmp-[0-9a-f]{8}$")  # what open_atomic names its temporary files
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}  # protocol -> the pip extra that provides it
# Where an object appears whole when its upload completes, or not at all: written in place, never renamed.
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})
PART_BYTES = 16 << 20  # multipart upload part size: a 300 MB shard in 19 parts, 10 in flight at once (s3fs)
# Conditional PUTs: If-None-Match: * (create only if absent) and If-Match: ETAG (replace only that version).
CONDITIONAL = frozenset({"s3", "s3a"})
log = logging.getLogger(__name__)


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
        protocols = set(self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self.local = "file" in protocols
        self.object_store = bool(protocols & OBJECT_STORES)
        self.conditional = bool(protocols & CONDITIONAL)

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
        """A file that appears at ``parts`` whole, only if the ``with`` block succeeds: a hidden temporary file
        renamed into place on a filesystem, the final key itself on an object store."""
        final = self.path(*parts)
        folder, name = posixpath.split(final)
        if self.object_store:
            f = self.fs.open(final, "wb")
            try:
                yield f
            except BaseException:
                discard(f)
                raise
            f.close()  # the upload completes: the object appears
            return
        tmp = posixpath.join(folder, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
        self.fs.makedirs(folder, exist_ok=True)
        try:
            with self.fs.open(tmp, "wb") as f:
                yield f
                f.flush()
                if self.local:
                    os.fsync(f.fileno())
            self.fs.mv(tmp, final)
            if self.local:
                sync_folder(folder)
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
            raise

    def upload(self, local_path: str, *parts: str) -> None:
        """Object stores: publishes a finished local file at ``parts`` by a multipart upload, parts in parallel,
        straight to the final key (visible once complete)."""
        assert self.object_store, "upload() is for object stores; a filesystem stages beside the target"
        self.fs.put_file(local_path, self.path(*parts), chunksize=PART_BYTES)
        self.fs.invalidate_cache(self.path(*parts[:-1]))

    def create_exclusive(self, data: bytes, *parts: str) -> bool:
        """Writes ``data`` at ``parts`` only if nothing is there; False if something is. Local disk: a whole
        temporary file hard-linked into place, then the folder fsynced. S3: a conditional PUT (If-None-Match).
        Other stores have no exclusive create: raises NotImplementedError (the caller writes, then rereads)."""
        final = self.path(*parts)
        if self.local:
            folder, name = posixpath.split(final)
            tmp = posixpath.join(folder, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, final)
                return True
            except FileExistsError:
                return False
            finally:
                os.remove(tmp)
                sync_folder(folder)
        if not self.conditional:
            raise NotImplementedError(f"{self.uri}: no exclusive create on this store")
        try:
            self.fs.pipe_file(final, data, mode="create")  # If-None-Match: *
        except FileExistsError:
            return False
        except OSError as e:
            self._unless_unsupported(e)
        return True

    def _unless_unsupported(self, e: OSError) -> None:
        """Re-raises ``e``, unless it is the store's 501 Not Implemented to a conditional write: then this store
        has none from now on, and NotImplementedError sends the caller to its fallback."""
        if e.errno != errno.ENOSYS:  # s3fs's translation of 501 NotImplemented
            raise e
        self.conditional = False
        log.warning("%s does not support conditional writes (%s); without them, a run lock is written and then "
                    "read back, as on stores that have none", self.uri, e)
        raise NotImplementedError(f"{self.uri}: no conditional writes on this store") from e

    def read_versioned(self, *parts: str) -> tuple[bytes, str | None]:
        """The file's bytes and the version they are, for ``replace_if``: S3's ETag, from the same GET as the bytes;
        None on stores without conditional writes."""
        if not self.conditional:
            return self.read_bytes(*parts), None
        from fsspec.asyn import sync

        bucket, key, _ = self.fs.split_path(self.path(*parts))
        response = self.fs.call_s3("get_object", Bucket=bucket, Key=key)
        try:
            return sync(self.fs.loop, response["Body"].read), response["ETag"]
        finally:
            response["Body"].close()

    def replace_if(self, data: bytes, version: str, *parts: str) -> str | None:
        """S3: writes ``data`` (a small file: one PUT) at ``parts`` only if the object there is still ``version``
        (If-Match); returns the new version, or None if it was replaced or removed meanwhile (nothing is written).
        Raises NotImplementedError where the store has no conditional writes."""
        if not self.conditional:
            raise NotImplementedError(f"{self.uri}: no conditional replace on this store")
        try:
            out = self.fs.pipe_file(self.path(*parts), data, IfMatch=version)
        except FileNotFoundError:
            return None
        except OSError as e:  # s3fs turns 412 Precondition Failed into an OSError whose cause is botocore's error
            if getattr(e.__cause__, "response", {}).get("Error", {}).get("Code") == "PreconditionFailed":
                return None
            self._unless_unsupported(e)
        return out["ETag"]

    def write_atomic(self, data: bytes, *parts: str) -> None:
        with self.open_atomic(*parts) as f:
            f.write(data)

    def remove_temporaries(self, folder: str) -> list[str]:
        """Deletes leftovers of interrupted atomic writes in ``folder`` (only names ``open_atomic`` makes)."""
        gone = [n for n in self.list(folder) if TEMPORARY.match(n)]
        for n in gone:
            self.remove(folder, n)
        return gone


def discard(f: IO[bytes]) -> None:
    """Abandons an object-store file opened for writing: its multipart upload is aborted and closing it later
    (or garbage collection) uploads nothing."""
    f.discard()  # fsspec's buffered files (s3fs, gcsfs, adlfs)
    f.closed = True


def sync_folder(path: str | os.PathLike) -> None:
    """Makes the renames, links and removals in a local folder durable: POSIX fsyncs a directory's entries only
    when the directory itself is fsynced."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` (local or URL) through a temporary file and a rename: an existing file is
    replaced only once the new one is complete."""
    folder, name = posixpath.split(str(path))
    Store(folder or ".").write_atomic(data, name)


@contextmanager
def atomic_folder(path: str | os.PathLike, only_writer: bool = False) -> Iterator[str]:
    """A local folder that appears at ``path`` whole, only if the ``with`` block succeeds: the block fills a
    hidden temporary folder beside it (yielded), whose files and folders are fsynced before it is renamed over
    any previous folder of that name; the parent folder is fsynced after the rename. ``only_writer``: nobody
    else writes this folder, so leftovers of earlier, interrupted attempts are removed first; otherwise a folder
    another writer put in place meanwhile is kept (it is as complete as ours)."""
    import glob
    import shutil

    final = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(final)
    os.makedirs(folder, exist_ok=True)
    if only_writer:
        for old in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.tmp-*")):
            shutil.rmtree(old, ignore_errors=True)
    tmp = os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp)
    try:
        yield tmp
        for root, _, files in os.walk(tmp, topdown=False):  # a folder after what it holds
            for file in files:
                with open(os.path.join(root, file), "rb+") as f:
                    os.fsync(f.fileno())
            sync_folder(root)
        shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:  # another writer's folder landed in between
            if only_writer or not os.path.isdir(final):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        sync_folder(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
