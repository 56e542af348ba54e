"""The run's one progress line while the sample stages run, and the final report."""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any, Callable

from manifests.show import reason_label
from dreamcache.errors import PipelineError
from pipeline.stage import OK


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


class Progress:
    """``[pipeline] written/size triplets | rate | ETA | drops`` every ``interval`` seconds.

    The rate is measured over the last ``window`` seconds from the first triplet of this run on, so model
    loading and warm-up do not enter it and the ETA settles as the run reaches its steady pace.
    """

    def __init__(self, size: int, already: int, interval: float, out: Callable[[str], Any] = print,
                 window: float = 600.0, clock: Callable[[], float] = time.monotonic):
        self.size, self.already, self.interval, self.out = size, already, interval, out
        self.window, self.clock = window, clock
        self.last = self.now = clock()
        self.written = already
        self.seen = 0
        self.drops: Counter = Counter()
        self.points: deque[tuple[float, int]] = deque()  # (time, written) since the first triplet, in the window

    def update(self, row: dict[str, Any], written: int) -> None:
        now = self.now = self.clock()
        self.seen += 1
        if row["status"] != OK:
            self.drops[str(row["status"])] += 1
        if written != self.written or not self.points:
            self.points.append((now, written))
            while len(self.points) > 2 and now - self.points[1][0] >= self.window:
                self.points.popleft()
        self.written = written
        if now - self.last >= self.interval:
            self.last = now
            self.out(self.line())

    def rate(self) -> float:
        """Triplets per second over the window up to the last update (0 until two triplets are written)."""
        if len(self.points) < 2:
            return 0.0
        (t0, w0), (_, w1) = self.points[0], self.points[-1]
        return (w1 - w0) / (self.now - t0) if self.now > t0 else 0.0

    def line(self) -> str:
        rate = self.rate()
        eta = _duration((self.size - self.written) / rate) if rate > 0 else "?"
        drops = ", ".join(f"{k}={v}" for k, v in self.drops.most_common(4)) or "none"
        return (f"[pipeline] {self.written}/{self.size} triplets ({100 * self.written / self.size:.1f}%) | "
                f"{rate:.2f}/s | ETA {eta} | candidates this run {self.seen}, drops {drops}")


class DropRateExceeded(PipelineError):
    """One drop reason took too large a share of the recent candidates: the run stops."""


class DropGuard:
    """Stops the run when one drop reason takes more than ``max_rate`` of the last ``window`` candidates: a
    broken stage, model or setting is then the likely cause, and every further GPU-hour would be spent on
    candidates that are thrown away. Committed shards are kept; the message says how to go on."""

    def __init__(self, window: int, max_rate: float):
        self.window, self.max_rate = window, max_rate
        self.recent: deque[str] = deque()
        self.counts: Counter = Counter()
        self.example: dict[str, str] = {}

    def update(self, status: str, error: str = "") -> None:
        if len(self.recent) == self.window:
            self.counts[self.recent.popleft()] -= 1
        self.recent.append(status)
        if status == OK:
            return
        self.counts[status] += 1
        self.example.setdefault(status, error)
        if len(self.recent) == self.window and self.counts[status] > self.max_rate * self.window:
            n = self.counts[status]
            raise DropRateExceeded(
                f"stopping: {status} dropped {n} of the last {self.window} candidates ({100 * n / self.window:.0f}%, "
                f"more than max_drop_rate {self.max_rate:g}); for example: {self.example[status][:200]!r}. Committed "
                "shards are kept. Fix the stage or its settings and run the same command to resume; if this rate is "
                "expected, raise --set max_drop_rate=...")


def final_report(index: dict[str, Any], size: int, uri: str, elapsed: float) -> str:
    t = index["totals"]
    lines = [
        f"{'done' if index['complete'] else 'INCOMPLETE'}: {t['samples']}/{size} triplets in {t['shards']} shards, "
        f"{t['bytes'] / 1e6:.1f} MB, {t['candidates_consumed']} candidates consumed, {_duration(elapsed)} this run",
        f"  out: {uri}",
    ]
    for stage, reasons in index["drops"].items():
        lines.append(f"  {stage:>9} drops: " + ", ".join(f"{reason_label(stage, r)}={n}" for r, n in reasons.items()))
    if not index["complete"]:
        lines.append(f"  why: {index['status']}")
    return "\n".join(lines)
