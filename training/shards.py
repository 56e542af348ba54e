"""The committed samples of a dataset, and their bytes read by byte range.

A dataset's manifests list every committed sample with its key and the size of each of its tar members, in
the order the writer wrote them. The writer's tars are USTAR (``pipeline/writer.py``): each member is one
512-byte header, then its data padded to a multiple of 512 bytes, members in the manifest's order, samples
in the manifest's order. So where any member lies in its shard follows from the manifests alone, and the
trainer reads exactly the members it needs, from local disk or an object store, without opening a shard
whole, scanning it or listing the store. A micro-batch's ranges are read in one ``cat_ranges`` call
(concurrent requests on an object store).

Every range is read with its header, which must name the member and its size: a shard that does not match
its manifest (repacked by another tool, or changed after it was committed) is indexed from its own headers
once, and a sample that is still not found, or cannot be read, raises ``SampleError`` for the loader to skip
and count. The target latent cache (``training/encode.py``) is read the same way: a shard's safetensors
header once, then the sample's rows of ``mean`` and ``std``.

A read that fails (an object store's 503 or throttling, a reset connection, a timeout) is not the data's fault:
it is retried with backoff (``RETRY_DELAYS``), and if the store still fails, ``StoreUnavailable`` stops the
run, which then resumes from its last checkpoint. Skipping such samples would train on other data than the
run's seed says, and at scale drop real samples silently. Only a file that is gone, a header that does not
match or bytes that do not decode make a sample unreadable.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import tarfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from dreamcache.store import Store
from manifests.schema import SHARDS, read_manifests

log = logging.getLogger(__name__)
BLOCK = 512  # a tar header; member data is padded to a multiple of it


RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0)  # seconds before each retry of a failed read: 31 s in all


class SampleError(RuntimeError):
    """A sample whose members cannot be read (the loader skips it and counts it)."""


class StoreUnavailable(RuntimeError):
    """Reads that kept failing after every retry: the store, not the data (the run stops; resume it)."""


def _datas(e: BaseException) -> bool:
    """Whether a read's error is the data's (retrying cannot help): a file that is gone, a range that is not in
    it (an object store's 416; s3fs gives other 400s the same errno, and those are not the data's), bytes that
    do not parse."""
    if isinstance(e, (FileNotFoundError, IsADirectoryError, SampleError, ValueError, KeyError, EOFError,
                      tarfile.TarError)):
        return True
    code = getattr(e.__cause__, "response", {}).get("Error", {}).get("Code")
    return isinstance(e, OSError) and e.errno == errno.EINVAL and code in ("InvalidRange", "416", None)


# Client libraries whose own errors (not OSErrors) are a store's failures: connection, timeout, payload.
CLIENT_LIBRARIES = frozenset({"botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "google", "azure"})


def _stores(e: BaseException) -> bool:
    """Whether a read's error is the store's, worth retrying: an OSError that is not the data's, or an error of
    an object store's client library. Anything else (a bug) is raised at once."""
    if _datas(e):
        return False
    return isinstance(e, OSError) or any(c.__module__.split(".")[0] in CLIENT_LIBRARIES for c in type(e).__mro__)


def retrying(read, what: str):
    """``read()``, retried after each of ``RETRY_DELAYS`` while it fails for the store's reasons (``_stores``: a
    503, a reset connection, a client library's own connection error)."""
    for delay in (*RETRY_DELAYS, None):
        try:
            return read()
        except Exception as e:
            if not _stores(e):
                raise
            if delay is None:
                raise StoreUnavailable(f"{what}: still failing after {len(RETRY_DELAYS)} retries over "
                                       f"{sum(RETRY_DELAYS):.0f} s ({type(e).__name__}: {e}); the store, not the data: "
                                       "resume the run (--resume) once it answers") from e
            log.warning("%s failed (%s: %s); retrying in %.0f s", what, type(e).__name__, e, delay)
            time.sleep(delay)


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def shard_name(url: str) -> str:
    """'s3://b/ds/shards/shard-000007.tar' -> 'shard-000007' (also the name of its latent cache file)."""
    return url.rsplit("/", 1)[-1].removesuffix(".tar")


@dataclass(frozen=True, eq=False)
class SampleIndex:
    """Every committed sample in shard then manifest order, as flat arrays (N samples, a few bytes each:
    400k samples fit in tens of MB, shared copy-on-write by the loader's workers)."""

    data: str  # the dataset's folder or URL
    urls: tuple[str, ...]  # shard URLs, in shard order
    keys: np.ndarray  # (N,) sample keys
    shard: np.ndarray  # (N,) int32: index into urls
    start: np.ndarray  # (N,) int64: the byte offset of the sample's first member header in its shard
    layout: np.ndarray  # (N,) int32: index into layouts
    layouts: tuple[tuple[str, ...], ...]  # member suffixes in tar order ("txt", "json", "target.jpg", ...)
    sizes: np.ndarray  # (N, M) int64: member sizes in layout order (0 past a layout's end)
    identity: dict[str, Any]  # what makes this dataset this dataset (``dataset_identity``)

    @classmethod
    def from_store(cls, data: str) -> SampleIndex:
        store = Store(data)
        manifests = read_manifests(store)
        if not manifests:
            raise FileNotFoundError(f"{data}: no committed shards (no manifests/*.json); is this a dataset folder?")
        keys, shard, start, layout, sizes = [], [], [], [], []
        layouts: dict[tuple[str, ...], int] = {}
        for s, m in enumerate(manifests):
            offset = 0
            for sample in m.samples:
                names = tuple(sample.members)
                keys.append(sample.key)
                shard.append(s)
                start.append(offset)
                layout.append(layouts.setdefault(names, len(layouts)))
                sizes.append(list(sample.members.values()))
                offset += sum(BLOCK + _padded(n) for n in sample.members.values())
        width = max(map(len, sizes), default=0)
        padded = np.array([row + [0] * (width - len(row)) for row in sizes], np.int64).reshape(len(keys), width)
        return cls(data=data, urls=tuple(store.url(SHARDS, m.shard) for m in manifests),
                   keys=np.array(keys, dtype=str), shard=np.array(shard, np.int32), start=np.array(start, np.int64),
                   layout=np.array(layout, np.int32), layouts=tuple(layouts), sizes=padded,
                   identity=dataset_identity(manifests))

    def __len__(self) -> int:
        return len(self.keys)

    def members(self, i: int) -> dict[str, tuple[int, int]]:
        """{suffix: (header offset, data size)} of sample ``i``'s members, as the manifest places them."""
        out, offset = {}, int(self.start[i])
        for suffix, size in zip(self.layouts[self.layout[i]], self.sizes[i].tolist()):
            out[suffix] = (offset, size)
            offset += BLOCK + _padded(size)
        return out


def dataset_identity(manifests) -> dict[str, Any]:
    """The committed shards' count, samples and a digest of (shard, tar sha256, samples): equal for a copy of
    the dataset anywhere, different as soon as a shard is added, removed or rewritten."""
    digest = hashlib.sha256("".join(f"{m.shard} {m.sha256} {m.count}\n" for m in manifests).encode())
    return {"shards": len(manifests), "samples": sum(m.count for m in manifests), "sha256": digest.hexdigest()[:16]}


def _header(block: bytes) -> tuple[str, int] | None:
    """(name, size) of a USTAR header block, or None if it is not one."""
    if len(block) < BLOCK or block[257:262] != b"ustar":
        return None
    name = block[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    prefix = block[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
    try:
        size = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return None
    return (f"{prefix}/{name}" if prefix else name), size


class ShardReader:
    """Reads samples' members by byte range. One per loader process: its caches (shards indexed from their own
    headers, latent cache headers) are that process's."""

    def __init__(self, index: SampleIndex, latents: str | None = None, references: bool = False):
        """``latents``: the latent cache's folder; ``references``: also read each sample's pre-drawn reference
        views from it (``reference.latent``)."""
        import fsspec

        self.index, self.latents, self.references = index, latents, references
        self.fs = fsspec.core.url_to_fs(index.urls[0])[0]
        self._scanned: dict[int, dict[str, dict[str, tuple[int, int]]]] = {}  # shard -> key -> suffix -> (data, size)
        self._latent_rows: dict[int, tuple[dict[str, int], dict[str, tuple[int, int, tuple[int, ...]]]]] = {}

    def _path(self, url: str) -> str:
        return self.fs._strip_protocol(url)

    def read(self, items: list[tuple[int, tuple[str, ...]]]) -> list[dict[str, Any] | Exception]:
        """For each (sample, suffixes wanted), its raw sample ({"__key__", suffix: bytes, and with a latent cache
        "target.latent": (mean, std)}) or the error that stops it. The ranges of all samples are read together."""
        paths, starts, ends, plans = [], [], [], []
        for i, wanted in items:
            url = self.index.urls[self.index.shard[i]]
            members = self.index.members(i)
            missing = [s for s in wanted if s not in members]
            if missing or int(self.index.shard[i]) in self._scanned:
                plans.append(None)  # not where the manifest says: read through the shard's own headers
                continue
            # Consecutive wanted members are one range: [first header, last data end).
            runs: list[list[str]] = []
            order = list(members)
            for s in sorted(wanted, key=order.index):
                if runs and order.index(s) == order.index(runs[-1][-1]) + 1:
                    runs[-1].append(s)
                else:
                    runs.append([s])
            first = len(paths)
            for run in runs:
                begin, (last, size) = members[run[0]][0], members[run[-1]]
                paths.append(self._path(url))
                starts.append(begin)
                ends.append(last + BLOCK + size)
            plans.append((first, runs, members))
        got = self._ranges(paths, starts, ends) if paths else []
        out: list[dict[str, Any] | Exception] = []
        for (i, wanted), plan in zip(items, plans):
            try:
                sample = self._checked(i, plan, got) if plan is not None else None
                if sample is None:
                    sample = self._from_headers(i, wanted)
                if self.latents:
                    self._add_latent(i, sample)
                out.append(sample)
            except StoreUnavailable:
                raise
            except Exception as e:  # noqa: BLE001 - a sample that cannot be read is data: the loader skips it
                out.append(e)
        return out

    def _ranges(self, paths: list[str], starts: list[int], ends: list[int]) -> list[bytes | Exception]:
        """Each range's bytes, or the data's own error for it (``_datas``: a file that is gone, a range not in
        it); the ranges the store failed are read again (``retrying``), the others kept."""
        got: list[bytes | Exception | None] = [None] * len(paths)

        def read_failed():
            todo = [j for j, g in enumerate(got) if g is None]
            for j, data in zip(todo, self.fs.cat_ranges([paths[j] for j in todo], [starts[j] for j in todo],
                                                        [ends[j] for j in todo], on_error="return")):
                if isinstance(data, Exception) and not _datas(data):
                    if not _stores(data):
                        raise data  # a bug, not a read
                    failed = data
                else:
                    got[j] = data
            if any(g is None for g in got):
                raise failed

        retrying(read_failed, f"reading {len(paths)} ranges of {paths[0]}{' ...' if len(set(paths)) > 1 else ''}")
        return got

    def _checked(self, i: int, plan, got: list) -> dict[str, Any] | None:
        """The sample from ranges placed by the manifest, or None when a header does not match it."""
        first, runs, members = plan
        key, sample = str(self.index.keys[i]), {"__key__": str(self.index.keys[i])}
        for n, run in enumerate(runs):
            data = got[first + n]
            if isinstance(data, Exception):
                raise SampleError(f"{key}: cannot read {self.index.urls[self.index.shard[i]]}: {data}") from data
            base = members[run[0]][0]
            for suffix in run:
                offset, size = members[suffix]
                at = offset - base
                if _header(data[at:at + BLOCK]) != (f"{key}.{suffix}", size) or len(data) < at + BLOCK + size:
                    return None
                sample[suffix] = data[at + BLOCK:at + BLOCK + size]
        return sample

    def _from_headers(self, i: int, wanted: tuple[str, ...]) -> dict[str, Any]:
        s, key = int(self.index.shard[i]), str(self.index.keys[i])
        url = self.index.urls[s]
        if s not in self._scanned:
            log.warning("%s does not match its manifest; reading its own tar headers", url)
            self._scanned[s] = self._scan(url)
        found = self._scanned[s].get(key, {})
        missing = [w for w in wanted if w not in found]
        if missing:
            raise SampleError(f"{key}: no {', '.join(missing)} in {url}")
        path = self._path(url)
        got = self._ranges([path] * len(wanted), [found[w][0] for w in wanted],
                           [found[w][0] + found[w][1] for w in wanted])
        for data in got:
            if isinstance(data, Exception):
                raise SampleError(f"{key}: cannot read {url}: {data}") from data
        return {"__key__": key, **dict(zip(wanted, got))}

    def _scan(self, url: str) -> dict[str, dict[str, tuple[int, int]]]:
        """{key: {suffix: (data offset, size)}} from the shard's headers, up to the first that cannot be read."""
        def scan() -> dict[str, dict[str, tuple[int, int]]]:
            out: dict[str, dict[str, tuple[int, int]]] = {}
            try:
                with self.fs.open(self._path(url), "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                    for info in tar:
                        key, _, suffix = info.name.partition(".")
                        out.setdefault(key, {})[suffix] = (info.offset_data, info.size)
            except (FileNotFoundError, EOFError, tarfile.TarError) as e:  # the data's: what is there is what is read
                log.warning("%s: tar headers readable up to %d samples (%s)", url, len(out), e)
            return out

        return retrying(scan, f"reading the tar headers of {url}")

    def _add_latent(self, i: int, sample: dict[str, Any]) -> None:
        """The sample's cached latent distribution, (mean, std), each (4, h, w) fp16, and with ``references`` its
        reference views (K, 4, h, w): rows read by range."""
        import torch

        s, key = int(self.index.shard[i]), sample["__key__"]
        url = f"{self.latents}/{shard_name(self.index.urls[s])}.safetensors"
        if s not in self._latent_rows:
            try:
                self._latent_rows[s] = retrying(lambda: _safetensors_layout(self.fs, self._path(url)),
                                                f"reading the header of {url}")
            except FileNotFoundError as e:
                raise SampleError(f"{key}: no latent cache {url}") from e
        rows, tensors = self._latent_rows[s]
        if key not in rows:
            raise SampleError(f"{key}: no cached latent in {url}")
        names = ("mean", "std", "references") if self.references else ("mean", "std")
        if any(name not in tensors for name in names):
            raise SampleError(f"{key}: {url} holds no reference views")
        starts = [tensors[name][0] + rows[key] * tensors[name][1] for name in names]
        got = self._ranges([self._path(url)] * len(names), starts,
                           [p + tensors[name][1] for p, name in zip(starts, names)])
        bad = next((g for g in got if isinstance(g, Exception)), None)
        if bad is not None:
            raise SampleError(f"{key}: no latent cache {url}") from bad
        rows_of = {name: torch.frombuffer(bytearray(b), dtype=torch.float16).reshape(tensors[name][2])
                   for name, b in zip(names, got)}
        sample["target.latent"] = (rows_of["mean"], rows_of["std"])
        if self.references:
            sample["reference.latent"] = rows_of["references"]


def _safetensors_layout(fs, path: str) -> tuple[dict[str, int], dict[str, tuple[int, int, tuple[int, ...]]]]:
    """({key: row}, {tensor: (byte offset of row 0, bytes per row, row shape)}) of a latent cache file, from its
    header (8-byte length, then JSON); the data follows the header."""
    length = int.from_bytes(fs.cat_file(path, 0, 8), "little")
    header = json.loads(fs.cat_file(path, 8, 8 + length))
    keys = json.loads(header.get("__metadata__", {}).get("keys", "[]"))
    tensors = {}
    for name in ("mean", "std", "references"):
        if name not in header:  # references: only in a cache written with --reference-views
            continue
        info = header[name]
        if info["dtype"] != "F16":
            raise SampleError(f"{path}: {name} is {info['dtype']}, expected F16")
        shape = tuple(info["shape"][1:])
        tensors[name] = (8 + length + info["data_offsets"][0], 2 * int(np.prod(shape)), shape)
    return {k: row for row, k in enumerate(keys)}, tensors
