"""Stage 5: the shard writer and the commit protocol.

Rows arrive in plan order. Each shard is streamed into a staging file, published as
``shards/shard-NNNNNN.tar`` and only then is ``manifests/shard-NNNNNN.json`` written: the manifest is the
commit marker, and a tar without one does not exist. The manifest records the slice of the plan the shard
consumed, so resuming starts right after the last committed slice: committed samples are never redone,
uncommitted ones always are, and keys cannot repeat.

Staging and publishing depend on the store. A filesystem stages a hidden temporary tar beside the target,
then fsyncs and renames it. An object store stages the tar on local disk and uploads it to its final key
(a multipart upload, parts in parallel): no copy, no delete, and the object exists only once complete.
Publishing (fsync or upload, then the manifest and dataset.json) runs on a background thread, in shard order,
while the next shard is being filled; at most ``pending`` shards wait, so a slow store slows the run down
instead of filling the disk. A failed publication stops the run at its next row. A sealed shard's staging file
belongs to the publisher from the moment it is handed over: it is renamed or uploaded, or, when the run stops
before its turn, deleted by the publisher; the writer's ``abort`` deletes only the shard still being filled.

Before each of its writes (the tar, the manifest, dataset.json) the publisher calls ``check``, which reads the
run lock afresh and raises once another run holds it; each manifest records the run's id (``run``).

Tars are deterministic (fixed mtime, owner and member order): the same samples give the same sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import queue
import re
import shutil
import tarfile
import tempfile
import threading
import uuid
from pathlib import Path
from typing import IO, Any, Callable, Sequence

from manifests.index import Index, now
from manifests.lock import process_alive
from manifests.schema import (MANIFESTS, SHARDS, DamagedManifest, DropRecord, Manifest, SampleRecord, manifest_name,
                              read_manifests, shard_index, shard_name)
from dreamcache.store import Store
from dreamcache.errors import PipelineError
from pipeline.stage import OK, Stage

log = logging.getLogger(__name__)
_SHARD = re.compile(r"^shard-\d{6}\.tar$")  # what shard_name() makes


class _Hashing:
    """File wrapper that hashes and counts what passes through it (tar streams write only forward)."""

    def __init__(self, f: IO[bytes]):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        self.n += len(b)
        return self.f.write(b)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "dreamcache", "dreamcache"
    tar.addfile(info, io.BytesIO(data))


def recover(store: Store) -> list[Manifest]:
    """Cleans a dataset folder for resuming and returns its committed manifests (shards 0..k-1).

    Removes only what an interrupted run of this pipeline leaves: temporary files of its atomic writes and
    tars named like the next shards (``shard-NNNNNN.tar`` at or after the first uncommitted index: renamed,
    never committed). Refuses to go on, changing nothing, when a manifest does not parse, the committed
    shards are not a contiguous prefix, a committed tar is missing or not the size its manifest records, or
    shards/ holds a file this pipeline would not have written.
    """
    try:
        manifests = read_manifests(store)
    except DamagedManifest as e:
        raise PipelineError(str(e)) from None
    for i, m in enumerate(manifests):
        if shard_index(m.shard) != i:
            raise PipelineError(f"{store.uri}: committed shards are not contiguous (expected {shard_name(i)}, found "
                               f"{m.shard}); was a manifest deleted? Check with: python -m manifests verify {store.uri}")
    tars = store.sizes(SHARDS)
    for m in manifests:
        if tars.get(m.shard) != m.bytes:
            found = "missing" if m.shard not in tars else f"{tars[m.shard]} bytes"
            raise PipelineError(f"{store.uri}: committed {m.shard} is {found}, its manifest says {m.bytes} bytes: it "
                               "was changed after the run wrote it, so the dataset cannot be resumed as is. Check "
                               f"with: python -m manifests verify {store.uri} --checksums")
    strays = sorted(n for n in tars if not _SHARD.match(n))
    if strays:
        raise PipelineError(f"{store.uri}: shards/ holds files this pipeline did not write ({', '.join(strays[:5])}); "
                           "nothing was changed. Move them out of the dataset folder and run again.")
    for folder in (SHARDS, MANIFESTS):
        for name in store.remove_temporaries(folder):
            log.info("removed unfinished write %s/%s", folder, name)
    for name in sorted(tars):
        if shard_index(name) >= len(manifests):
            log.info("discarding %s: renamed into place but never committed (no manifest); it is redone", name)
            store.remove(SHARDS, name)
    return manifests


SPOOL = Path(tempfile.gettempdir()) / "dreamcache-spool"  # object stores: tars staged here before upload


def spool_folder() -> Path:
    """This process's staging folder for object-store uploads; removes the folders of dead processes first
    (a SIGKILLed run leaves its half-written tar there)."""
    SPOOL.mkdir(parents=True, exist_ok=True)
    for old in SPOOL.iterdir():
        pid = old.name.split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    folder = SPOOL / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    return folder


class Publisher:
    """Runs publications one at a time, in submission order, on a background thread. ``submit`` blocks while
    ``pending`` publications wait; the first failure is raised by the next ``submit`` or by ``flush``."""

    def __init__(self, pending: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, pending))
        self._error: BaseException | None = None
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shard-publisher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                publish, discard = job
                if self._error is not None or self._cancel.is_set():
                    discard()
                    continue
                try:
                    publish()
                except BaseException as e:  # raised in the writer's thread
                    self._error = e
                    discard()
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            self._cancel.set()  # what is queued behind a failure is not published
            raise error

    def submit(self, publish: Callable[[], None], discard: Callable[[], None]) -> None:
        self._raise()
        self._queue.put((publish, discard))

    def flush(self) -> None:
        """Waits until everything submitted is published; raises the first failure."""
        self._queue.join()
        self._raise()

    def close(self, cancel: bool = False) -> None:
        """Ends the thread; ``cancel``: publications not yet started are discarded (their samples are redone
        on resume), the one under way completes."""
        if cancel:
            self._cancel.set()
        self._queue.put(None)
        self._thread.join()


class ShardWriter:
    """Consumes result rows in plan order; commits a shard every ``shard_size`` samples.

    Call ``commit(final=True)`` at the end (it waits for every publication) and ``abort()`` on failure."""

    def __init__(self, store: Store, index: Index, size: int, shard_size: int, reference_ext: str,
                 sample_meta: dict[str, Any], next_shard: int, next_candidate: int,
                 on_commit: Callable[[Manifest], None] | None = None, check: Callable[[], None] | None = None,
                 run: str | None = None, pending: int = 2, stages: Sequence[type[Stage]] | None = None):
        """``check``: called before each write to the store (tar, manifest, dataset.json); raises to stop a run
        that may no longer write (its lock was taken). ``run``: the run's id, its lock's fencing token, recorded
        in each manifest. ``pending``: shards that may wait for publication while the next one fills.
        ``stages``: the sample stages that made the rows (default: SDXL and segmentation), whose records go
        into each sample's json and manifest entry."""
        if stages is None:
            from pipeline.segment import SegmentStage
            from pipeline.targets import TargetStage

            stages = (TargetStage, SegmentStage)
        self.stages = tuple(stages)
        self.store, self.index, self.size, self.shard_size = store, index, size, shard_size
        self.reference_ext, self.sample_meta, self.on_commit = reference_ext, sample_meta, on_commit
        self.check, self.run = check or (lambda: None), run
        self.shard, self.start = next_shard, next_candidate
        self.written = index.samples
        self._ctx = self._file = self._tar = None
        self._spool: Path | None = None
        self._publisher = Publisher(pending)
        self.samples: list[SampleRecord] = []
        self.drops: list[DropRecord] = []
        self.end = next_candidate

    @property
    def done(self) -> bool:
        return self.written >= self.size

    def add(self, row: dict[str, Any]) -> None:
        """One result row (plan columns + stage outputs); ignored once ``size`` samples are written."""
        if self.done:
            return
        index = int(row["index"])
        assert index == self.end, f"rows must arrive in plan order: expected {self.end}, got {index}"
        self.end = index + 1
        if row["status"] != OK:
            stage, _, reason = str(row["status"]).partition(":")
            self.drops.append(DropRecord(str(row["key"]), index, stage, reason, str(row.get("error", ""))))
            return
        if self._tar is None:
            self._open()
        members = self._members(row)
        for suffix, data in members.items():
            _add_member(self._tar, f"{row['key']}.{suffix}", data)
        self.samples.append(SampleRecord(
            key=str(row["key"]), index=index, caption=str(row["caption"]), subject=str(row["subject"]),
            category=str(row["category"]), seed=int(row["seed"]), members={k: len(v) for k, v in members.items()},
            record={k: float(row[k]) for s in self.stages for k in s.record}))
        self.written += 1
        if len(self.samples) == self.shard_size or self.done:
            self.commit(final=self.done)

    def _members(self, row: dict[str, Any]) -> dict[str, bytes]:
        record = {"key": str(row["key"]), "caption": str(row["caption"]), "subject": str(row["subject"]),
                  "category": str(row["category"]), "seed": int(row["seed"]), "plan_index": int(row["index"])}
        for stage in self.stages:
            record.update(stage.sample_json(row))
        record.update(self.sample_meta)
        return {"txt": str(row["caption"]).encode(), "json": json.dumps(record, sort_keys=True).encode(),
                "target.jpg": bytes(row["target"]), f"reference.{self.reference_ext}": bytes(row["reference"]),
                "mask.png": bytes(row["mask"])}

    def _open(self) -> None:
        if self.store.object_store:  # staged on local disk, uploaded when complete
            if self._spool is None:
                self._spool = spool_folder()
            path = self._spool / shard_name(self.shard)
            self._ctx, raw = None, open(path, "wb")
        else:  # a hidden temporary file beside the target, renamed when complete
            self._ctx = self.store.open_atomic(SHARDS, shard_name(self.shard))
            raw = self._ctx.__enter__()
        self._file = _Hashing(raw)
        self._tar = tarfile.open(fileobj=self._file, mode="w|", format=tarfile.USTAR_FORMAT)

    def commit(self, final: bool = False) -> Manifest | None:
        """Closes the open shard and hands it to the publisher: tar into place, then its manifest and the index.

        ``final``: the run is over; commit pending drops even without samples (an empty tar), so that the
        index counts every candidate the run consumed, and wait until every shard is published.
        """
        manifest = None
        if self._tar is not None or (final and self.drops):
            if self._tar is None:
                self._open()
            manifest = self._seal()
        if final:
            self._publisher.flush()
        return manifest

    def _seal(self) -> Manifest:
        self._tar.close()  # writes the end-of-archive blocks through the hashing wrapper
        manifest = Manifest(shard=shard_name(self.shard), sha256=self._file.sha.hexdigest(), bytes=self._file.n,
                            count=len(self.samples), candidates=(self.start, self.end), samples=self.samples,
                            drops=self.drops, created=now(), run=self.run)
        put_tar, drop_tar = self._staged()
        complete, number, check = self.done, self.shard, self.check

        def publish() -> None:
            check()  # a run that lost its lock places no tar over the new owner's ...
            put_tar()
            check()  # ... and no manifest
            self.store.write_atomic(manifest.to_json(), MANIFESTS, manifest_name(number))
            self.index.add(manifest)
            check()
            self.store.write_atomic(self.index.to_json(complete=complete, status="running"), "dataset.json")
            log.info("committed %s: %d samples, %d drops, %.1f MB", manifest.shard, manifest.count,
                     len(manifest.drops), manifest.bytes / 1e6)
            if self.on_commit:
                self.on_commit(manifest)

        # The hand-over: the writer forgets the staging file before the publisher gets it. An interrupt in
        # between leaves a file nobody publishes (a temporary name that recover() removes, or a spool file that
        # abort() removes), never one that abort() deletes while the publisher renames it.
        self.shard, self.start = self.shard + 1, self.end
        self._ctx = self._file = self._tar = None
        self.samples, self.drops = [], []
        self._publisher.submit(publish, drop_tar)
        return manifest

    def _staged(self) -> tuple[Callable[[], None], Callable[[], None]]:
        """(put into place, delete) for the open shard's staging file, once its tar is closed."""
        ctx, raw, name = self._ctx, self._file.f, shard_name(self.shard)
        if ctx is None:  # object store: staged on local disk, uploaded to the final key
            raw.close()
            staged = Path(raw.name)

            def upload() -> None:
                self.store.upload(str(staged), SHARDS, name)
                staged.unlink()

            return upload, lambda: staged.unlink(missing_ok=True)
        # filesystem: closing the open_atomic context flushes, fsyncs, renames and fsyncs the folder
        return lambda: ctx.__exit__(None, None, None), lambda: _abandon(ctx)

    def flush(self) -> None:
        """Waits until every sealed shard is published (committed); raises a failed publication."""
        self._publisher.flush()

    def abort(self) -> None:
        """Drops the open shard's staging file; the publisher deletes the sealed shards not yet published (their
        samples are redone on resume), and a publication under way completes."""
        if self._tar is not None:
            self._tar.fileobj.closed = self._tar.closed = True  # no end-of-archive blocks into a file we delete
            if self._ctx is None:
                self._file.f.close()
                Path(self._file.f.name).unlink(missing_ok=True)
            else:
                _abandon(self._ctx)
            self._ctx = self._file = self._tar = None
        self._publisher.close(cancel=True)
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)

    def close(self) -> None:
        """Waits for every publication and ends the publisher (after ``commit(final=True)``)."""
        try:
            self._publisher.flush()
        finally:
            self._publisher.close()
            if self._spool is not None:
                shutil.rmtree(self._spool, ignore_errors=True)


def _abandon(ctx) -> None:
    """Ends an ``open_atomic`` context with an error: its temporary file is removed, nothing is renamed."""
    try:
        ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
    except RuntimeError:
        pass
