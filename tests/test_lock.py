"""The run lock's heartbeat: a failing one ends the run in time, and on S3 it never overwrites a lock taken over."""

import json
import logging
import threading

import pytest

from dreamcache.store import Store
from manifests.lock import LOCK, LockLost, RunLock, lock_state


class Clock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return Store(str(tmp_path))
    return Store(request.getfixturevalue("s3_bucket")[0] + "/ds")


def without_heartbeat_thread(lock):
    """The test beats by hand: the lock's own heartbeat thread is stopped before its first beat."""
    lock._stop.set()
    lock._thread.join()


def failing_writes(store, monkeypatch):
    """Every write of lock.json fails from now on, as with a store that refuses requests; reads still work."""

    def refuse(*args, **kwargs):
        raise OSError("503 Slow Down")

    for name in ("write_atomic", "replace_if"):
        monkeypatch.setattr(store, name, refuse)


@pytest.mark.parametrize("silent_s", [150.0, 400.0])
def test_a_heartbeat_that_keeps_failing_ends_the_run_before_the_lock_goes_stale(store, monkeypatch, silent_s):
    """Heartbeats fail from t=0. Up to half the stale bound (150 s of 300) the run may still write; from then on
    every check refuses, even once the store answers again, and the heartbeat no longer rewrites the lock."""
    clock = Clock()
    with RunLock(store, clock=clock) as lock:
        without_heartbeat_thread(lock)
        failing_writes(store, monkeypatch)
        for t in (60.0, 120.0, 149.0):
            clock.now = 1000.0 + t
            with pytest.raises(OSError, match="Slow Down"):
                lock.beat()
            lock.check()  # still within the bound: the run may write
        assert not lock.lost
        clock.now = 1000.0 + silent_s
        with pytest.raises(LockLost, match=r"heartbeat has not reached .* for \d+ s"):
            lock.check()
        monkeypatch.undo()  # the store answers again: too late, the lock was given up
        before = store.read_bytes(LOCK)
        lock.beat()
        assert store.read_bytes(LOCK) == before  # no heartbeat after giving up
        with pytest.raises(LockLost):
            lock.check(fresh=False)
    assert not store.exists(LOCK)  # released all the same: it still named this run


def test_the_heartbeat_thread_logs_its_failures(tmp_path, monkeypatch, caplog):
    """The thread does not swallow a failed heartbeat: it logs it, with how long until the run gives up."""
    store = Store(str(tmp_path))
    failed = []
    with RunLock(store, heartbeat_s=0.01) as lock:
        def refuse(*args, **kwargs):
            failed.append(True)
            raise OSError("disk quota exceeded")

        with caplog.at_level(logging.WARNING, logger="manifests.lock"):
            monkeypatch.setattr(store, "write_atomic", refuse)
            while len(failed) < 2:  # synchronised on the failures themselves, not on time
                lock._stop.wait(0.01)
            lock._stop.set()
            lock._thread.join()
    warnings = [r.getMessage() for r in caplog.records if r.name == "manifests.lock"]
    assert warnings and "disk quota exceeded" in warnings[0] and "stops before its next write" in warnings[0]


def test_on_s3_a_heartbeat_never_overwrites_a_lock_another_run_took(s3_bucket, monkeypatch):
    """Another run takes the lock over (--break-lock) while this run's heartbeat is about to write: the heartbeat
    is a PUT conditional on the ETag of this run's own lock, so it fails, and the new owner's lock stays."""
    store = Store(s3_bucket[0] + "/ds")
    second = RunLock(store, force=True)
    taken = threading.Event()
    with RunLock(store, heartbeat_s=0.01) as first:
        record = first._record

        def taken_meanwhile():  # the heartbeat thread builds its record, then writes it
            if not taken.is_set():
                second.__enter__()
                taken.set()
            return record()

        monkeypatch.setattr(first, "_record", taken_meanwhile)
        taken.wait()
        first._stop.set()
        first._thread.join()  # the heartbeat that was under way has finished
        assert json.loads(store.read_bytes(LOCK))["run"] == second.id
        assert first.lost
        with pytest.raises(LockLost, match="took the lock"):
            first.check()
    assert json.loads(store.read_bytes(LOCK))["run"] == second.id  # the first run's exit leaves it alone
    second.__exit__(None, None, None)
    assert not store.exists(LOCK)


def test_on_s3_two_runs_taking_over_one_stale_lock_cannot_both_win(s3_bucket):
    """Both found the same stale lock; the take-over is a PUT conditional on that lock's ETag, so the second
    is refused instead of replacing the first one's fresh lock."""
    store = Store(s3_bucket[0] + "/ds")
    stale = {"run": "gone", "host": "another-machine", "pid": 1, "heartbeat_unix": 0.0}
    store.write_atomic(json.dumps(stale).encode(), LOCK)
    found = lock_state(store)
    assert found.state == "stale" and found.version
    a, b = RunLock(store), RunLock(store)
    import manifests.lock as lock_module

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lock_module, "lock_state", lambda store, stale_s=0: found)  # both looked before either wrote
        a.__enter__()
        with pytest.raises(lock_module.FolderInUse, match="at the same moment"):
            b.__enter__()
    assert json.loads(store.read_bytes(LOCK))["run"] == a.id
    a.__exit__(None, None, None)


def test_an_s3_compatible_store_without_conditional_writes_still_locks(s3_bucket, monkeypatch, caplog):
    """A store that answers If-None-Match / If-Match with 501 Not Implemented: said once, then the lock is
    written and read back as on stores without conditional writes; a second run is still refused, a stale lock
    still taken over, and a heartbeat still sees a take-over."""
    import errno

    import manifests.lock as lock_module

    store = Store(s3_bucket[0] + "/ds")
    pipe_file = store.fs.pipe_file

    def unconditional_only(path, data, **kwargs):
        if kwargs.get("mode") == "create" or "IfMatch" in kwargs:
            raise OSError(errno.ENOSYS, "A header you provided implies functionality that is not implemented")
        return pipe_file(path, data, **kwargs)

    monkeypatch.setattr(store.fs, "pipe_file", unconditional_only)
    stale = {"run": "gone", "host": "another-machine", "pid": 1, "heartbeat_unix": 0.0}
    store.write_atomic(json.dumps(stale).encode(), LOCK)
    with caplog.at_level(logging.WARNING, logger="dreamcache.store"):
        with RunLock(store) as first:
            without_heartbeat_thread(first)
            assert json.loads(store.read_bytes(LOCK))["run"] == first.id and not store.conditional
            with pytest.raises(lock_module.FolderInUse, match="another run is writing"):
                RunLock(store).__enter__()
            first.beat()
            first.check()
            taken = RunLock(store, force=True).__enter__()
            without_heartbeat_thread(taken)
            first.beat()
            with pytest.raises(LockLost, match="took the lock"):
                first.check()
        assert json.loads(store.read_bytes(LOCK))["run"] == taken.id
    said = [r.getMessage() for r in caplog.records if "does not support conditional writes" in r.getMessage()]
    assert len(said) == 1
