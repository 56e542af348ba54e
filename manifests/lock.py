"""Who may write a dataset folder: the ownership marker and the run lock.

    OUT/owner.json   written when a run first takes an empty (or new) folder: "this folder is a dataset of
                     pipeline/run.py". A run refuses a non-empty folder without it, so that it never deletes
                     or mixes with files it did not write.
    OUT/lock.json    present while a run writes: host, pid, start and a heartbeat rewritten every minute. A
                     second run refuses to start while it is live; ``show`` reads it to tell "running" from
                     "interrupted". A lock whose heartbeat is older than ``STALE_S``, or whose process is gone
                     (same host), is stale: the run that left it is dead, and the next run takes it over.

The lock is created exclusively: on a local disk written whole to a temporary file and hard-linked into
place, on S3 a conditional PUT (If-None-Match), both of which fail if a lock exists. Of two runs racing for a
folder, one takes it and the other is refused, and no reader sees half a lock. Stores without an exclusive
create (GCS and Azure through fsspec) write the lock and reread it, and the loser stops. Every heartbeat first checks that the lock is still this run's; a run whose
lock was taken (``--break-lock`` elsewhere, or two runs taking over one stale lock at the same instant) sees
``lost`` and stops before its next commit.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from dreamcache.store import Store, StoreError

OWNER, LOCK = "owner.json", "lock.json"
FORMAT = "dreamcache-dataset/1"
HEARTBEAT_S = 60.0
STALE_S = 300.0


class FolderInUse(StoreError):
    """The folder is not ours, or another run is writing to it."""


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

    def describe(self) -> str:
        i = self.info
        return (f"pid {i.get('pid')} on {i.get('host')}, started {i.get('started')}, last heartbeat "
                f"{self.age_s:.0f} s ago")


def lock_state(store: Store, stale_s: float = STALE_S) -> LockState:
    try:
        info = json.loads(store.read_bytes(LOCK))
    except FileNotFoundError:
        return LockState("none", {}, 0.0)
    except ValueError:  # half a lock from a store without atomic renames: nobody holds it
        return LockState("stale", {}, float("inf"))
    age = time.time() - float(info.get("heartbeat_unix", 0))
    alive = age < stale_s
    if alive and info.get("host") == socket.gethostname():
        alive = process_alive(int(info.get("pid", -1)))
    return LockState("live" if alive else "stale", info, age)


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
    """``with RunLock(store):`` holds OUT/lock.json for the duration of a run, heartbeat in a thread."""

    def __init__(self, store: Store, force: bool = False, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
        self.store, self.force, self.heartbeat_s, self.stale_s = store, force, heartbeat_s, stale_s
        self.id = uuid.uuid4().hex
        self.info = {"run": self.id, "host": socket.gethostname(), "pid": os.getpid(), "started": _now()}
        self.previous: LockState | None = None
        self.lost = False  # set by the heartbeat when lock.json names another run
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "RunLock":
        found = lock_state(self.store, self.stale_s)
        if found.state == "live" and not self.force:
            raise FolderInUse(f"another run is writing to {self.store.uri} ({found.describe()}). Wait for it or "
                              f"stop it; if it is certainly gone, rerun with --break-lock")
        self.previous = found if found.state != "none" else None
        if self.previous is not None:
            self.store.remove(LOCK)  # a stale (or forcibly broken) lock
        try:
            created = self.store.create_exclusive(json.dumps(self._record(), indent=1).encode(), LOCK)
        except NotImplementedError:
            self._write()
            created = True
        if not created or not self._ours():
            raise FolderInUse(f"another run took {self.store.uri} at the same moment; let it finish")
        self._thread = threading.Thread(target=self._beat, name="dataset-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _record(self) -> dict[str, Any]:
        return {**self.info, "heartbeat": _now(), "heartbeat_unix": time.time()}

    def _write(self) -> None:
        self.store.write_atomic(json.dumps(self._record(), indent=1).encode(), LOCK)

    def _ours(self) -> bool:
        try:
            return json.loads(self.store.read_bytes(LOCK)).get("run") == self.id
        except (FileNotFoundError, ValueError):
            return False

    def check(self) -> None:
        """Raises FolderInUse once another run has taken the lock (called before each commit)."""
        if self.lost:
            raise FolderInUse(f"another run took the lock of {self.store.uri} while this one was writing; this run "
                              "stops so that only one writes. Committed shards are kept.")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self._ours():
                    self.lost = True
                    return
                self._write()
            except Exception:  # a failed heartbeat is retried; the run's own writes report real store errors
                pass

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if json.loads(self.store.read_bytes(LOCK)).get("run") == self.id:
                self.store.remove(LOCK)
        except (FileNotFoundError, ValueError):
            pass
