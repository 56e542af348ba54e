"""Rows back in plan order from batches that arrive in any order.

Ray Data runs with ``preserve_order`` off: a late block (a slow actor, or one lost with its node and retried
when Ray has restarted the actor) holds up no other block, and every GPU keeps working. The writer still
needs plan order (a shard's manifest records the contiguous slice of the plan it consumed), so the driver
puts the rows back in order here. A row that can be written at once is; the rest of its batch is held, as one
object in Ray's object store (which spills to disk), never in the driver's memory. Only the writer waits for
a late block, and only until that block arrives; while it waits, ``Watchdog`` logs for which candidates and
how long, and stops the run when no row has reached the writer for ``resources.stall_s``: a block that
cannot come back (its actor can be restarted nowhere) ends in a resumable stop, not a job that hangs.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any, Callable, Iterator

import numpy as np


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


# The watchdog's own signal. Not SIGINT: a run started in the background of a shell script inherits SIGINT
# ignored, and an ignored SIGINT would never stop it.
WAKE = signal.SIGUSR1


def interrupt_main() -> None:
    """Interrupts the main thread as Ctrl-C would, where ``interruptible`` is in force: a signal sent to that
    thread, which also ends a blocking wait it is in (``_thread.interrupt_main`` only sets a flag, which a thread
    blocked in a lock or a socket never reads)."""
    signal.pthread_kill(threading.main_thread().ident, WAKE)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


class interruptible:
    """Within the block (entered in the main thread), ``interrupt_main`` raises KeyboardInterrupt there."""

    def __enter__(self) -> "interruptible":
        self._previous = signal.signal(WAKE, _raise_interrupt)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(WAKE, self._previous)


class Watchdog:
    """While the sample stages run: every ``every`` seconds without a row for the writer, a log line saying
    what it waits for; after ``limit`` seconds, ``fired`` is set and the main thread is interrupted (the run
    turns that into ``Stalled``). Use as a context manager around the loop that feeds the writer."""

    def __init__(self, reorder: Reorder, limit: float, every: float = 60.0, poll: float = 5.0,
                 interrupt: Callable[[], None] = interrupt_main, log: logging.Logger | None = None):
        self.reorder, self.limit, self.every, self.poll = reorder, limit, every, poll
        self.interrupt, self.log = interrupt, log or logging.getLogger("pipeline")
        self.fired: str | None = None  # the reason, once fired
        self._warned = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="writer-watchdog", daemon=True)

    def __enter__(self) -> "Watchdog":
        in_main = threading.current_thread() is threading.main_thread()  # where signal handlers can be set
        self._handler = interruptible().__enter__() if self.interrupt is interrupt_main and in_main else None
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self._handler is not None:
            self._handler.__exit__(*exc)

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            if self.check():
                break
        # Fired, and the main thread still runs (something swallowed the interrupt): another, every poll.
        while not self._stop.wait(self.poll):
            self.interrupt()

    def what(self) -> str:
        r = self.reorder
        if r.held:
            return (f"candidates {r.missing()} (a block that is slow, or lost with its node and not yet retried); "
                    f"{r.held} later rows are held until then")
        return f"candidate {r.next} and after (no block has come back)"

    def check(self) -> bool:
        """One look: logs or fires as due; True once fired."""
        waited = self.reorder.clock() - self.reorder.since
        if waited >= self.limit:
            self.fired = (f"no row has reached the writer for {waited:.0f} s (resources.stall_s={self.limit:g}): it "
                          f"waits for {self.what()}. Check the cluster (ray status: are nodes or actors pending?). "
                          "Committed shards are kept: run the same command again to resume")
            self.interrupt()
            return True
        if waited >= self.every and waited - self._warned >= self.every:
            self._warned = waited
            self.log.warning("the writer has waited %.0f s for %s", waited, self.what())
        elif waited < self.every:
            self._warned = 0.0
        return False


def _row(batch: dict[str, np.ndarray], pos: int) -> dict[str, Any]:
    return {k: v[pos] for k, v in batch.items()}
