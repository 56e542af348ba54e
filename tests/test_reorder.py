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
    from pipeline.reorder import Stalled, Watchdog

    now, lines = [0.0], []

    class Log:
        def warning(self, fmt, *args):
            lines.append(fmt % args)

    store = Objects()
    r = Reorder(0, store.put, store.get, clock=lambda: now[0])
    dog = Watchdog(r, limit=300, every=60, log=Log())
    list(r.push(batch([0, 1])))
    list(r.push(batch([4, 5])))  # 2-3 late
    for t in (30, 59, 61, 90, 125, 299):
        now[0] = t
        dog.check()
    assert len(lines) == 3 and "waited 61 s for candidates 2-3" in lines[0] and "2 later rows are held" in lines[0]
    list(r.push(batch([2, 3])))  # it came: the clock restarts
    now[0] = 400
    dog.check()
    now[0] = 299 + 400
    with pytest.raises(Stalled) as stalled:
        dog.check()
    assert "no row has reached the writer for 400 s (resources.stall_s=300)" in str(stalled.value)
    assert "candidate 6 and after" in str(stalled.value) and "run the same command again" in str(stalled.value)


STALLED = ("--set", "targets.model=simulate:600", "--set", "resources.stall_s=10", "--set", "captions.backend=template")


# The command's main() in a thread, as a notebook or a service would call the pipeline.
THREADED_MAIN = """
import sys, threading
from pipeline.run import main

returned = []
t = threading.Thread(target=lambda: returned.append(main(sys.argv[1:])))
t.start()
t.join()
print("returned:", returned[0] if returned else None, flush=True)
"""


@pytest.mark.slow
def test_a_run_whose_stages_return_nothing_stops_resumably_in_whatever_thread_runs_it(tmp_path):
    """SDXL stand-ins that take 600 s per batch and resources.stall_s=10, the pipeline run from a thread other than
    the main one: it stops with Stalled (exit status 3) and says why, instead of hanging or dying of a signal; the
    lock is released and the dataset can be resumed. (The unit tests drive the feed loop in both kinds of thread.)"""
    import subprocess
    import sys

    from conftest import ROOT, pipeline_cmd

    out = tmp_path / "ds"
    proc = subprocess.run([sys.executable, "-c", THREADED_MAIN, *pipeline_cmd(out, *STALLED)[2:]],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and "returned: 3" in proc.stdout, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")][-1]
    assert error.startswith("error: no row has reached the writer for") and "resources.stall_s=10" in error
    assert "candidate 0 and after" in error and "run the same command again to resume" in error
    assert (out / "plan" / "plan.json").exists() and not (out / "lock.json").exists()


def feed(tmp_path, monkeypatch, stages, stall_s=0.05):
    """Runs the driver's feed loop (pipeline.driver._feed: batches -> Reorder -> writer, under the watchdog) over a
    plan of 4 candidates, with ``stages(pending)`` standing in for the Ray graph; returns what it raised and the
    next candidate the writer expects."""
    import pipeline.driver
    from dreamcache.store import Store
    from manifests.index import Index
    from pipeline.config import build_config
    from pipeline.progress import DropGuard, Progress
    from pipeline.writer import ShardWriter

    class Plan:
        def rows(self, start):
            yield [{"index": i} for i in range(start, 4)]

    class Lock:
        def check(self, fresh=True):
            pass

    cfg = build_config("tiny", {"size": 4, "resources.stall_s": stall_s})
    monkeypatch.setattr(pipeline.driver, "samples_on_ray", lambda pending, cfg: stages(pending))
    writer = ShardWriter(Store(str(tmp_path / "ds")), Index({}, {}), 4, 2, "png", {}, next_shard=0, next_candidate=0)
    store = Objects()
    try:
        pipeline.driver._feed(Plan(), 0, cfg, Reorder(0, store.put, store.get), writer, Progress(4, 0, 60, out=print),
                              DropGuard(10, 1.0), Lock())
    except BaseException as e:
        return e, writer.end
    finally:
        writer.abort()


def never_returns(release):
    """Sample stages whose first block never comes back (until the test releases the thread waiting for it)."""
    def stages(pending):
        release.wait()
        yield from ()
    return stages


@pytest.mark.parametrize("where", ["main thread", "another thread"])
def test_a_stall_stops_the_run_in_whatever_thread_runs_it(tmp_path, monkeypatch, where):
    """pipeline.driver.run() may be called from a notebook or a service, not only from a script's main thread: the
    watchdog raises Stalled in the thread that feeds the writer, with no signal (before, a run outside the main
    thread was killed by the watchdog's SIGUSR1, exit 138). Nothing ever arrives, so the stall is certain
    whatever the machine's speed."""
    import threading

    from pipeline.reorder import Stalled

    release, raised = threading.Event(), []
    try:
        if where == "main thread":
            raised.append(feed(tmp_path, monkeypatch, never_returns(release))[0])
        else:
            t = threading.Thread(target=lambda: raised.append(feed(tmp_path, monkeypatch, never_returns(release))[0]))
            t.start()
            t.join()
    finally:
        release.set()
    assert isinstance(raised[0], Stalled), raised
    assert "no row has reached the writer" in str(raised[0]) and "candidate 0 and after" in str(raised[0])


def test_ctrl_c_still_interrupts_the_wait_for_a_block(tmp_path, monkeypatch):
    """SIGINT arrives while the driver waits for batches: KeyboardInterrupt in the main thread (exit 130 in the
    CLI), not a stall, and the stages' thread is told to stop."""
    import os
    import signal
    import threading

    release = threading.Event()

    def stages(pending):
        os.kill(os.getpid(), signal.SIGINT)  # handled in the main thread, which waits in the feed loop
        release.wait()
        yield from ()

    # Python's own handler, whatever the suite was started under (a shell's background job ignores SIGINT)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        raised, _ = feed(tmp_path, monkeypatch, stages, stall_s=3600)
    finally:
        release.set()
        signal.signal(signal.SIGINT, previous)
    assert isinstance(raised, KeyboardInterrupt)


def test_the_rows_reach_the_writer_and_a_stage_error_reaches_the_driver(tmp_path, monkeypatch):
    """Batches produced on the background thread arrive in the driver's thread; an exception of the Ray graph
    is raised there, as it was when the driver iterated the graph itself."""
    def rows(indices):
        return {"index": np.asarray(indices), "key": np.asarray([f"s0-{i:08d}" for i in indices], dtype=object),
                "status": np.asarray(["segment:no_box"] * len(indices), dtype=object),
                "error": np.asarray([""] * len(indices), dtype=object)}

    def stages(pending):
        yield rows([1, 0])
        raise RuntimeError("the SDXL actor died three times")

    raised, written_to = feed(tmp_path, monkeypatch, stages, stall_s=3600)
    assert isinstance(raised, RuntimeError) and "died three times" in str(raised)
    assert written_to == 2  # candidates 0 and 1 reached the writer, in plan order
