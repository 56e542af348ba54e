"""One-line progress summaries while the sample stages run, and the final report."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from pipeline.stage import OK


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


class Progress:
    def __init__(self, size: int, already: int, interval: float, out=print):
        self.size, self.already, self.interval, self.out = size, already, interval, out
        self.start = self.last = time.monotonic()
        self.written = already
        self.seen = 0
        self.drops: Counter = Counter()

    def update(self, row: dict[str, Any], written: int) -> None:
        self.seen += 1
        self.written = written
        if row["status"] != OK:
            self.drops[str(row["status"])] += 1
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self.out(self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = (self.written - self.already) / elapsed
        eta = (self.size - self.written) / rate if rate > 0 else float("inf")
        drops = ", ".join(f"{k}={v}" for k, v in self.drops.most_common(4)) or "none"
        return (f"[pipeline] {self.written}/{self.size} triplets ({100 * self.written / self.size:.1f}%) | "
                f"{rate:.2f}/s | ETA {_duration(eta) if eta != float('inf') else '?'} | "
                f"candidates this run {self.seen}, drops {drops}")


def final_report(index: dict[str, Any], size: int, uri: str, elapsed: float) -> str:
    t = index["totals"]
    lines = [
        f"{'done' if index['complete'] else 'INCOMPLETE'}: {t['samples']}/{size} triplets in {t['shards']} shards, "
        f"{t['bytes'] / 1e6:.1f} MB, {t['candidates_consumed']} candidates consumed, {_duration(elapsed)} this run",
        f"  out: {uri}",
    ]
    for stage, reasons in index["drops"].items():
        lines.append(f"  {stage:>9} drops: " + ", ".join(f"{r}={n}" for r, n in reasons.items()))
    if not index["complete"]:
        lines.append(f"  why: {index['status']}")
    return "\n".join(lines)
