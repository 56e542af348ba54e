"""Who may write a dataset folder: the ownership marker and the run lock.

    OUT/owner.json   written when a run first takes an empty (or new) folder: "this folder is a dataset of
                     pipeline/run.py". A run refuses a non-empty folder without it, so that it never deletes
                     or mixes with files it did not write.
    OUT/lock.json    present while a run writes: its id, host, pid, start and a heartbeat rewritten every minute.
                     A second run refuses to start while it is live; ``show`` reads it to tell "running" from
                     "interrupted". A lock whose heartbeat is older than ``STALE_S``, or whose process is gone
                     (same host), is stale: the run that left it is dead, and the next run takes it over.

The lock is created exclusively: on a local disk written whole to a temporary file and hard-linked into
place, on S3 a conditional PUT (If-None-Match), both of which fail if a lock exists. Of two runs racing for a
folder, one takes it and the other is refused, and no reader sees half a lock. Stores without an exclusive
create (GCS and Azure through fsspec) write the lock and reread it, and the loser stops.

The run's id is its fencing token. Before every write of a shard, a manifest or the index, the run reads
lock.json afresh (``check``) and stops if the lock names another run; each manifest records the id it was
committed under. On S3 the heartbeat, and the take-over of a stale lock, are PUTs conditional on the ETag of
the lock as read (If-Match): a run never overwrites a lock another run has taken. Elsewhere (a rename cannot be
conditional) the heartbeat rereads the lock and replaces it; a take-over between the two is seen by the fresh
read before the next write. A heartbeat that fails is logged and retried; once no heartbeat has been written for
``FAIL_FRACTION`` of ``STALE_S`` (150 s of 300), the run gives the lock up and stops before its next write,
well before another run may take a stale lock over.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

from dreamcache.store import Store, StoreError

log = logging.getLogger(__name__)
OWNER, LOCK = "owner.json", "lock.json"
FORMAT = "dreamcache-dataset/1"
HEARTBEAT_S = 60.0
STALE_S = 300.0
FAIL_FRACTION = 0.5  # a run whose heartbeat has failed for this share of STALE_S stops before its next write


TAKEN = "another run took the lock of the folder while this one was writing"


class FolderInUse(StoreError):
    """The folder is not ours, or another run is writing to it."""


class LockLost(FolderInUse):
    """This run no longer holds the lock (taken by another run, or its heartbeat failed too long): it stops,
    and its committed shards are kept."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def owned(store: Store) -> bool:
    """True if the folder was made by pipeline/run.py (its marker, or a plan or index from before markers)."""
    return any(store.exists(*p) for p in ((OWNER,), ("plan", "plan.json"), ("dataset.json",)))


def claim(store: Store) -> None:
    """Makes sure ``store`` is ours to write: a new or empty folder is claimed; a non-empty folder must be
    ours already. Raises FolderInUse or StoreError (a file, not writable) with what to do."""
    if store.local and store.fs.isfile(store.root):
        raise StoreError(f"--out {store.uri} is a file; give a folder (new, empty, or a dataset to resume)")
    if owned(store):
        if not store.exists(OWNER):
            _write_owner(store)
        return
    if store.fs.exists(store.root):
        others = [n for n in store.list("") if n != LOCK]
        if others:
            shown = ", ".join(others[:5]) + (" ..." if len(others) > 5 else "")
            raise FolderInUse(f"--out {store.uri} is not empty ({shown}) and is not a dataset written by "
                              f"pipeline/run.py (no {OWNER}); nothing was changed. Give a new or empty folder.")
    _write_owner(store)


def _write_owner(store: Store) -> None:
    record = {"format": FORMAT, "created": _now(), "host": socket.gethostname()}
    try:
        store.write_atomic(json.dumps(record, indent=1).encode(), OWNER)
    except (PermissionError, OSError) as e:
        raise StoreError(f"cannot write to --out {store.uri}: {type(e).__name__}: {e}") from None


@dataclass(frozen=True)
class LockState:
    state: str  # "none" | "live" | "stale"
    info: dict[str, Any]
    age_s: float  # seconds since the last heartbeat
    version: str | None = None  # the lock as read (S3: its ETag), for a take-over conditional on it

    def describe(self) -> str:
        i = self.info
        return (f"pid {i.get('pid')} on {i.get('host')}, started {i.get('started')}, last heartbeat "
                f"{self.age_s:.0f} s ago")


def lock_state(store: Store, stale_s: float = STALE_S) -> LockState:
    try:
        data, version = store.read_versioned(LOCK)
    except FileNotFoundError:
        return LockState("none", {}, 0.0)
    try:
        info = json.loads(data)
    except ValueError:  # half a lock from a store without atomic renames: nobody holds it
        return LockState("stale", {}, float("inf"), version)
    age = time.time() - float(info.get("heartbeat_unix", 0))
    alive = age < stale_s
    if alive and info.get("host") == socket.gethostname():
        alive = process_alive(int(info.get("pid", -1)))
    return LockState("live" if alive else "stale", info, age, version)


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return pid > 0


class RunLock:
    """``with RunLock(store):`` holds OUT/lock.json for the duration of a run, heartbeat in a thread.

    ``id`` is the run's fencing token; ``check()`` before each write raises LockLost once the lock names
    another run or the heartbeat has failed for ``fail_after_s``. ``clock``: monotonic seconds (tests)."""

    def __init__(self, store: Store, force: bool = False, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S,
                 clock: Callable[[], float] = time.monotonic):
        self.store, self.force, self.heartbeat_s, self.stale_s, self.clock = store, force, heartbeat_s, stale_s, clock
        self.fail_after_s = stale_s * FAIL_FRACTION
        if not 0 < heartbeat_s < self.fail_after_s:
            raise ValueError(f"the heartbeat ({heartbeat_s:g} s) must come more often than the lock is given up "
                             f"({self.fail_after_s:g} s without one)")
        self.id = uuid.uuid4().hex
        self.info = {"run": self.id, "host": socket.gethostname(), "pid": os.getpid(), "started": _now()}
        self.previous: LockState | None = None
        self.lost: str | None = None  # why this run no longer holds the lock, once it does not
        self._version: str | None = None  # S3: the ETag of our lock as last written
        self._written = clock()  # when the last heartbeat that reached the store was made
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "RunLock":
        found = lock_state(self.store, self.stale_s)
        if found.state == "live" and not self.force:
            raise FolderInUse(f"another run is writing to {self.store.uri} ({found.describe()}). Wait for it or "
                              f"stop it; if it is certainly gone, rerun with --break-lock")
        self.previous = found if found.state != "none" else None
        self._written = self.clock()
        record = json.dumps(self._record(), indent=1).encode()
        created = None
        if self.previous is not None and self.previous.version is not None:  # S3: replace that lock, or nothing
            try:
                created = self.store.replace_if(record, self.previous.version, LOCK) is not None
            except NotImplementedError:  # an S3-compatible store without conditional writes
                pass
        if created is None:
            if self.previous is not None:
                self.store.remove(LOCK)  # a stale (or forcibly broken) lock
            try:
                created = self.store.create_exclusive(record, LOCK)
            except NotImplementedError:
                self.store.write_atomic(record, LOCK)
                created = True
        if not created or not self._ours(note_version=True):
            raise FolderInUse(f"another run took {self.store.uri} at the same moment; let it finish")
        self._thread = threading.Thread(target=self._beat, name="dataset-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _record(self) -> dict[str, Any]:
        return {**self.info, "heartbeat": _now(), "heartbeat_unix": time.time()}

    def _ours(self, note_version: bool = False) -> bool:
        """A fresh read: whether lock.json names this run; ``note_version``: the version read is the one our
        heartbeats replace (S3; only while no heartbeat runs)."""
        try:
            data, version = self.store.read_versioned(LOCK)
            ours = json.loads(data).get("run") == self.id
        except (FileNotFoundError, ValueError):
            return False
        if ours and note_version:
            self._version = version
        return ours

    def check(self, fresh: bool = True) -> None:
        """Raises LockLost unless this run may still write: lock.json, read afresh (``fresh``; otherwise what the
        heartbeat last saw), names it, and a heartbeat reached the store less than ``fail_after_s`` ago."""
        self._give_up_if_silent()
        if self.lost is None and fresh and not self._ours():
            self.lost = TAKEN
        if self.lost is not None:
            raise LockLost(f"{self.store.uri}: this run stops: {self.lost}. Only one run writes a dataset; its "
                           "committed shards are kept. Run the same command again to resume once no other run "
                           "writes it.")

    def beat(self) -> None:
        """One heartbeat: rewrites lock.json while it names this run; on S3 only over the version it last wrote."""
        self._give_up_if_silent()
        if self.lost is not None:
            return
        made = self.clock()
        record = json.dumps(self._record(), indent=1).encode()
        if self._version is not None:
            try:
                version = self.store.replace_if(record, self._version, LOCK)
            except NotImplementedError:  # the store turned out to have no conditional writes: as below from now on
                self._version = None
            else:
                if version is None:
                    self.lost = TAKEN
                    return
                self._version = version
        if self._version is None:  # no conditional replace: reread, then replace
            if not self._ours():
                self.lost = TAKEN
                return
            self.store.write_atomic(record, LOCK)
        self._written = made

    def _give_up_if_silent(self) -> None:
        silent = self.clock() - self._written
        if self.lost is None and silent >= self.fail_after_s:
            self.lost = (f"its heartbeat has not reached {self.store.uri}/{LOCK} for {silent:.0f} s (the lock is "
                         f"given up after {self.fail_after_s:.0f} s; another run may take it over after "
                         f"{self.stale_s:.0f} s)")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s) and self.lost is None:
            try:
                self.beat()
            except Exception as e:  # the store is failing: retried at the next beat, until the bound
                log.warning("the heartbeat of %s/%s failed (%s: %s) %.0f s after the last one that reached it; "
                            "the run stops before its next write if none does within %.0f s", self.store.uri,
                            LOCK, type(e).__name__, e, self.clock() - self._written, self.fail_after_s)
            if self.lost is not None:
                log.error("%s: this run no longer holds the lock: %s", self.store.uri, self.lost)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if json.loads(self.store.read_bytes(LOCK)).get("run") == self.id:
                self.store.remove(LOCK)
        except (FileNotFoundError, ValueError):
            pass
