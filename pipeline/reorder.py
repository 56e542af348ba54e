"""Rows back in plan order from batches that arrive in any order, and the watchdog of the driver's wait.

Ray Data runs with ``preserve_order`` off: a late block (a slow actor, or one lost with its node and retried
when Ray has restarted the actor) holds up no other block, and every GPU keeps working. The writer still
needs plan order (a shard's manifest records the contiguous slice of the plan it consumed), so the driver
puts the rows back in order here. A row that can be written at once is; the rest of its batch is held, as one
object in Ray's object store (which spills to disk), never in the driver's memory. Only the writer waits for
a late block, and only until that block arrives; while it waits, ``Watchdog`` logs for which candidates and
how long, and stops the run when no row has reached the writer for ``resources.stall_s``: a block that
cannot come back (its actor can be restarted nowhere) ends in a resumable stop, not a job that hangs.

The watchdog needs no signal: ``watched`` iterates the batches on a background thread and hands them over
through a queue that the driver waits on with a timeout, checking the watchdog between waits. ``Stalled`` is
raised in the driver's own thread, whichever it is (the main thread of a script, a notebook's, a service's
worker thread), and Ctrl-C still interrupts the main thread's wait.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np

T = TypeVar("T")


class Reorder:
    """``push(batch)`` yields the rows that are now next in plan order, starting at candidate ``start``.

    ``put`` and ``get`` store a held batch and fetch it back (default: ``ray.put`` / ``ray.get``)."""

    def __init__(self, start: int, put: Callable[[Any], Any] | None = None, get: Callable[[Any], Any] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if put is None or get is None:
            import ray

            put, get = put or ray.put, get or ray.get
        self.next, self._put, self._get, self.clock = start, put, get, clock
        self._held: dict[int, tuple[int, int]] = {}  # candidate index -> (held batch id, row in that batch)
        self._batches: dict[int, list] = {}  # held batch id -> [object ref, rows still held]
        self._ids = 0
        self._cached: tuple[int, dict[str, np.ndarray]] | None = None  # the held batch fetched last
        self.since = clock()  # when the writer last got a row
        self.most_held = 0

    @property
    def held(self) -> int:
        """Rows that arrived ahead of the next one in plan order."""
        return len(self._held)

    def push(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, Any]]:
        new: dict[int, int] = {}  # candidate index -> row in this batch
        for pos, index in enumerate(int(i) for i in batch["index"]):
            if index < self.next or index in new or index in self._held:
                raise RuntimeError(f"candidate {index} arrived twice (the writer is at candidate {self.next})")
            new[index] = pos
        while True:
            if self.next in new:
                yield _row(batch, new.pop(self.next))
            elif self.next in self._held:
                yield self._release(*self._held.pop(self.next))
            else:
                break
            self.next += 1
            self.since = self.clock()
        if new:  # ahead of plan order: held in the object store until their turn
            self._ids += 1
            self._batches[self._ids] = [self._put(batch), len(new)]
            for index, pos in new.items():
                self._held[index] = (self._ids, pos)
            self.most_held = max(self.most_held, len(self._held))

    def _release(self, batch_id: int, pos: int) -> dict[str, Any]:
        if self._cached is None or self._cached[0] != batch_id:
            self._cached = (batch_id, self._get(self._batches[batch_id][0]))
        row = _row(self._cached[1], pos)
        entry = self._batches[batch_id]
        entry[1] -= 1
        if entry[1] == 0:  # its last held row: the object can go
            del self._batches[batch_id]
            self._cached = None
        return row

    def missing(self, limit: int = 3) -> str:
        """The first gaps before the held rows, as "a-b, c-d" (what the writer waits for). Safe from another
        thread: it reads a copy (``dict.copy`` is atomic) while the driver's thread pushes rows."""
        held, gaps, start = sorted(self._held.copy()), [], self.next
        for index in held:
            if index > start:
                gaps.append(f"{start}-{index - 1}" if index - 1 > start else str(start))
                if len(gaps) == limit:
                    break
            start = index + 1
        return ", ".join(gaps)


class Stalled(RuntimeError):
    """No row reached the writer for ``stall_s`` seconds."""


class Watchdog:
    """Called by the driver while the sample stages run: every ``every`` seconds without a row for the writer,
    a log line saying what it waits for; after ``limit`` seconds, ``check`` raises Stalled. ``poll``: how
    often the driver looks while it waits for a batch (``watched``)."""

    def __init__(self, reorder: Reorder, limit: float, every: float = 60.0, poll: float | None = None,
                 log: logging.Logger | None = None):
        self.reorder, self.limit, self.every = reorder, limit, every
        self.poll = poll if poll is not None else min(5.0, limit / 4)
        self.log = log or logging.getLogger("pipeline")
        self._warned = 0.0

    def what(self) -> str:
        r = self.reorder
        if r.held:
            return (f"candidates {r.missing()} (a block that is slow, or lost with its node and not yet retried); "
                    f"{r.held} later rows are held until then")
        return f"candidate {r.next} and after (no block has come back)"

    def check(self) -> None:
        """One look: logs as due; raises Stalled once no row has reached the writer for ``limit`` seconds."""
        waited = self.reorder.clock() - self.reorder.since
        if waited >= self.limit:
            raise Stalled(f"no row has reached the writer for {waited:.0f} s (resources.stall_s={self.limit:g}): it "
                          f"waits for {self.what()}. Check the cluster (ray status: are nodes or actors pending?). "
                          "Committed shards are kept: run the same command again to resume")
        if waited >= self.every and waited - self._warned >= self.every:
            self._warned = waited
            self.log.warning("the writer has waited %.0f s for %s", waited, self.what())
        elif waited < self.every:
            self._warned = 0.0


class _Stop(BaseException):
    """Raised inside the producer thread to end an iteration that nobody waits for any more."""


_DONE = object()


def watched(items: Iterable[T], watchdog: Watchdog) -> Iterator[T]:
    """The items of ``items``, produced on a background thread and yielded in the caller's thread, which waits
    for each at most ``watchdog.poll`` seconds at a time and checks the watchdog between waits and after each
    item has been handled: a stall raises Stalled here, in whatever thread iterates. An error of the producer
    is raised here too. Closing the generator (``contextlib.closing``) stops the producer."""
    handoff: queue.Queue = queue.Queue(maxsize=1)  # Ray Data prefetches; one batch in hand is enough here
    stop, waiting = threading.Event(), threading.Event()  # the driver has left; the producer waits for an item

    def hand(item: Any, error: BaseException | None = None) -> bool:
        """Puts one entry for the driver; False once the driver has left."""
        while not stop.is_set():
            try:
                handoff.put((item, error), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            iterator = iter(items)
            while True:
                waiting.set()
                try:
                    item = next(iterator, _DONE)
                finally:
                    waiting.clear()
                if not hand(item) or item is _DONE:
                    return
        except _Stop:
            pass
        except BaseException as e:  # raised in the driver's thread
            hand(_DONE, e)

    producer = threading.Thread(target=produce, name="sample-batches", daemon=True)
    producer.start()
    try:
        while True:
            try:
                item, error = handoff.get(timeout=watchdog.poll)
            except queue.Empty:
                watchdog.check()
                continue
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item
            watchdog.check()
    finally:
        stop.set()
        if waiting.is_set():  # still waiting inside the iteration (for a block that may never come): end it
            _interrupt(producer)


def _interrupt(thread: threading.Thread) -> None:
    """Raises _Stop inside ``thread`` at its next Python instruction. Ray Data's iterator waits in a Python
    polling loop and shuts its execution down on any exception (its actors and their GPUs are released), so an
    iteration left waiting for a block that will never come does not outlive the run that gave up on it."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(_Stop))


def _row(batch: dict[str, np.ndarray], pos: int) -> dict[str, Any]:
    return {k: v[pos] for k, v in batch.items()}
