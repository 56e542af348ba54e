"""Rows back in plan order from batches that arrive in any order, held outside the driver's memory."""

import random

import numpy as np
import pytest

from pipeline.reorder import Reorder


def batch(indices):
    return {"index": np.asarray(indices), "key": np.asarray([f"k{i}" for i in indices], dtype=object)}


class Objects:
    """A stand-in object store that counts what it holds."""

    def __init__(self):
        self.objects, self.gets = {}, 0

    def put(self, value):
        ref = len(self.objects)
        self.objects[ref] = value
        return ref

    def get(self, ref):
        self.gets += 1
        return self.objects[ref]


@pytest.mark.parametrize("seed", range(5))
def test_any_arrival_order_gives_plan_order(seed):
    rng = random.Random(seed)
    blocks = [list(range(i, min(i + 8, 203))) for i in range(3, 203, 8)]
    rng.shuffle(blocks)
    for b in blocks:
        rng.shuffle(b)  # rows within a batch in any order too
    store = Objects()
    r = Reorder(3, store.put, store.get)
    out = [row["index"] for b in blocks for row in r.push(batch(b))]
    assert out == list(range(3, 203)) and r.held == 0 and r.next == 203
    assert [row["key"] for row in Reorder(3, store.put, store.get).push(batch(list(range(3, 6))))] == ["k3", "k4", "k5"]


def test_a_late_block_holds_only_the_writer_and_is_reported():
    now = [0.0]
    store = Objects()
    r = Reorder(0, store.put, store.get, clock=lambda: now[0])
    assert [row["index"] for row in r.push(batch([0, 1]))] == [0, 1]
    for start in range(4, 40, 4):  # candidates 2-3 are late; everything after them keeps arriving
        now[0] += 10
        assert list(r.push(batch(range(start, start + 4)))) == []
    assert r.held == 36 and len(store.objects) == 9  # one held object per batch, not one per row
    assert now[0] - r.since == 90.0 and r.missing() == "2-3"
    out = [row["index"] for row in r.push(batch([3, 2]))]
    assert out == list(range(2, 40)) and r.held == 0 and r.since == 90.0 and r.most_held == 36
    assert store.gets == 9  # each held batch fetched once


def test_a_row_twice_is_an_error_not_a_duplicate_sample():
    r = Reorder(0, Objects().put, Objects().get)
    list(r.push(batch([0, 1])))
    with pytest.raises(RuntimeError, match="twice"):
        list(r.push(batch([1, 2])))
    r = Reorder(0, (s := Objects()).put, s.get)
    list(r.push(batch([5])))
    with pytest.raises(RuntimeError, match="twice"):
        list(r.push(batch([5])))
    assert r.missing() == "0-4" and r.held == 1
    with pytest.raises(RuntimeError, match="candidate 7 arrived twice"):
        list(r.push(batch([6, 7, 7])))  # within one batch too


def test_the_watchdog_reports_a_wait_then_stops_a_run_that_gets_no_rows():

    from pipeline.reorder import Watchdog

    now, interrupted, lines = [0.0], [], []

    class Log:
        def warning(self, fmt, *args):
            lines.append(fmt % args)

    store = Objects()
    r = Reorder(0, store.put, store.get, clock=lambda: now[0])
    dog = Watchdog(r, limit=300, every=60, interrupt=lambda: interrupted.append(True), log=Log())
    list(r.push(batch([0, 1])))
    list(r.push(batch([4, 5])))  # 2-3 late
    for t in (30, 59, 61, 90, 125, 299):
        now[0] = t
        assert not dog.check()
    assert len(lines) == 3 and "waited 61 s for candidates 2-3" in lines[0] and "2 later rows are held" in lines[0]
    list(r.push(batch([2, 3])))  # it came: the clock restarts
    now[0] = 400
    assert not dog.check() and not interrupted
    now[0] = 299 + 400
    assert dog.check() and interrupted == [True]
    assert "no row has reached the writer for 400 s (resources.stall_s=300)" in dog.fired
    assert "candidate 6 and after" in dog.fired and "run the same command again" in dog.fired


@pytest.mark.slow
def test_a_run_whose_stages_return_nothing_stops_resumably(tmp_path):
    """SDXL stand-ins that take 600 s per batch and resources.stall_s=10: the run stops with exit 3 and says
    why, instead of hanging; the lock is released and the dataset can be resumed."""
    import subprocess

    from conftest import ROOT, pipeline_cmd

    out = tmp_path / "ds"
    proc = subprocess.run(pipeline_cmd(out, "--set", "targets.model=simulate:600", "--set", "resources.stall_s=10",
                                       "--set", "captions.backend=template"),
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 3, proc.stderr[-3000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: no row has reached the writer for") and "resources.stall_s=10" in error
    assert "candidate 0 and after" in error and "run the same command again to resume" in error
    assert (out / "plan" / "plan.json").exists() and not (out / "lock.json").exists()


def test_the_watchdogs_interrupt_ends_a_blocking_wait_in_the_main_thread():
    """The driver may be blocked in a lock or a socket when the watchdog fires: the interrupt must wake it,
    not just set a flag it reads on its next bytecode."""
    import threading

    import pytest

    import signal

    from pipeline.reorder import interrupt_main, interruptible

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a run started in a script's background
    try:
        threading.Timer(0.2, interrupt_main).start()
        with pytest.raises(KeyboardInterrupt), interruptible():
            threading.Event().wait()  # blocks in a lock acquire with no timeout
    finally:
        signal.signal(signal.SIGINT, before)
