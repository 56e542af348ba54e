"""The stage contract: a callable class, batch in -> batch out, a bad row is data.

A batch is Ray Data's numpy format, ``{column: np.ndarray}``. Every row carries ``status`` ("ok" or the
reason it was dropped, as ``stage:reason``) and ``error`` (detail for humans). A stage works on the rows
that are still ok and passes the others through untouched, so that the shard writer sees every candidate
and can record each drop in the manifest. If processing a batch raises, the stage retries each row on its
own; a row that still raises is dropped as ``<stage>:error`` with the exception text. Nothing a single
sample does can stop the run.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
OK = "ok"


@dataclass(frozen=True)
class Drop:
    """A row that leaves the pipeline, and why."""

    reason: str  # short, stable, countable: "no_box", "mask_area", ...
    detail: str = ""  # free text for humans


class Stage:
    """Subclasses set ``name`` and ``columns`` ({new column: value for dropped rows}) and implement
    ``process(rows) -> list[dict | Drop]`` on the rows that are still ok, one result per row, in order."""

    name: str = "stage"
    columns: dict[str, Any] = {}

    def process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any] | Drop]:
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["status"])
        status = np.asarray(batch["status"], dtype=object).copy()
        error = np.asarray(batch.get("error", np.full(n, "", dtype=object)), dtype=object).copy()
        live = [i for i in range(n) if status[i] == OK]
        rows = [{k: v[i] for k, v in batch.items()} for i in live]
        new = {c: [d] * n for c, d in self.columns.items()}
        for i, result in zip(live, self._process_safely(rows)):
            if isinstance(result, Drop):
                status[i], error[i] = f"{self.name}:{result.reason}", result.detail[:500]
                continue
            for c in self.columns:
                new[c][i] = result[c]
        out = {**batch, "status": status, "error": error}
        for c, values in new.items():
            out[c] = _column(values)
        return out

    def _process_safely(self, rows: list[dict[str, Any]]) -> list[dict[str, Any] | Drop]:
        if not rows:
            return []
        try:
            results = self.process(rows)
            if len(results) != len(rows):
                raise RuntimeError(f"{self.name}.process returned {len(results)} results for {len(rows)} rows")
            return results
        except Exception as e:
            if len(rows) == 1:
                log.warning("%s dropped %s: %s", self.name, rows[0].get("key"), e)
                return [Drop("error", "".join(traceback.format_exception_only(e)).strip())]
            log.warning("%s failed on a batch of %d (%s); retrying row by row", self.name, len(rows), e)
            return [r for row in rows for r in self._process_safely([row])]


def _column(values: list[Any]) -> np.ndarray:
    """A numpy column that keeps bytes, strings and arrays as Python objects (no silent fixed-width dtypes)."""
    if values and all(isinstance(v, (float, int, np.floating, np.integer)) and not isinstance(v, bool) for v in values):
        return np.asarray(values, dtype=np.float64 if any(isinstance(v, (float, np.floating)) for v in values) else np.int64)
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out
