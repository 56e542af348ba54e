"""``dataset.json``: the dataset's index, an aggregate of its manifests plus what came before the shards.

``Index`` is built incrementally (one ``add`` per committed manifest) so that the writer can rewrite
``dataset.json`` after every shard without rereading 400 manifests each time. Its totals are by
construction the sums over the manifests; ``python -m manifests verify`` checks that they still are.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timezone
from typing import Any

from manifests.schema import FORMAT, Manifest


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Index:
    def __init__(self, header: dict[str, Any], upstream_drops: dict[str, int]):
        """``header``: config, versions, models, plan facts; ``upstream_drops``: {stage:reason: n} before shards."""
        self.header = header
        self.upstream = Counter(upstream_drops)
        self.shards: list[dict[str, Any]] = []
        self.drops: Counter = Counter()
        self.categories: Counter = Counter()
        self.samples = self.bytes = self.consumed = 0

    def add(self, m: Manifest) -> None:
        self.shards.append({"name": m.shard, "count": m.count, "bytes": m.bytes, "sha256": m.sha256,
                            "candidates": list(m.candidates)})
        self.samples += m.count
        self.bytes += m.bytes
        self.consumed = max(self.consumed, m.candidates[1])
        self.categories.update(s.category for s in m.samples)
        self.drops.update(f"{d.stage}:{d.reason}" for d in m.drops)

    def to_dict(self, complete: bool, status: str) -> dict[str, Any]:
        by_stage: dict[str, dict[str, int]] = {}
        for key, n in sorted((self.upstream + self.drops).items()):
            stage, _, reason = key.partition(":")
            by_stage.setdefault(stage, {})[reason] = n
        return {
            "format": FORMAT,
            "updated": now(),
            "complete": complete,
            "status": status,
            **self.header,
            "totals": {"samples": self.samples, "shards": len(self.shards), "bytes": self.bytes,
                       "candidates_consumed": self.consumed},
            "drops": by_stage,
            "categories": dict(self.categories.most_common()),
            "shards": self.shards,
        }

    def to_json(self, complete: bool, status: str) -> bytes:
        return json.dumps(self.to_dict(complete, status), indent=1).encode()
