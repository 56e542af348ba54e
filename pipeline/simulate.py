"""Stand-in sample stages that take the time of the real models without loading them.

For simulating the cluster: the real Ray graph, pools, writer and commit protocol, with stages that sleep
for a configured time per batch and emit real-format outputs. A model reference of the form
``simulate:SECONDS`` selects them through the config, like any other model:

    --set targets.model=simulate:7.8           SDXL: 7.8 s per batch of targets.batch_size (device time)
    --set segment.detector=simulate:0.5,1.45   segmentation per batch: 0.5 s on the device, 1.45 s on the host

The device part runs under the stage's device lock, as the real models' does, and the host part outside it,
so ``resources.segment_calls`` overlaps them as it does for the real stage. Outputs depend only on the
sample (its seed): a run is reproducible key for key, and one sample in ``DROP_EVERY`` is dropped as
``segment:no_box``. Nothing here imports torch: a simulated actor is a light process.

With ``DREAMCACHE_SIMULATE_TRACE=FOLDER`` set in the workers' environment, each actor appends its device
intervals (stage, start, end, rows; wall-clock seconds) to a file of its own in that folder: what
``benchmarks/cluster.py`` measures the GPUs' busy time from.
"""

from __future__ import annotations

import io
import os
import threading
import time
import uuid
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pipeline.config import SegmentConfig, ShardConfig, TargetConfig
from pipeline.segment import SegmentStage
from pipeline.stage import Drop, ModelRef, Stage

PREFIX = "simulate:"
DROP_EVERY = 20  # one simulated sample in 20 has no box
VARIANTS = 8  # distinct images per stage, chosen by seed


def is_simulated(ref: str | None) -> bool:
    return bool(ref) and str(ref).startswith(PREFIX)


def seconds(ref: str) -> tuple[float, float]:
    """'simulate:7.8' -> (7.8, 0.0); 'simulate:0.5,1.45' -> (0.5, 1.45): device and host seconds per batch."""
    try:
        parts = [float(v) for v in ref[len(PREFIX):].split(",")]
    except ValueError:
        parts = []
    if not 1 <= len(parts) <= 2 or min(parts) < 0:
        raise ValueError(f"{ref!r}: a simulated model is simulate:DEVICE_SECONDS[,HOST_SECONDS] per batch")
    return parts[0], parts[1] if len(parts) == 2 else 0.0


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class _Simulated(Stage):
    def __init__(self, ref: str, batch_size: int):
        self.device_s, self.host_s = seconds(ref)
        self.batch_size = batch_size
        self.device_lock = threading.Lock()
        trace = os.environ.get("DREAMCACHE_SIMULATE_TRACE")
        self.trace = os.path.join(trace, f"{self.name}-{uuid.uuid4().hex[:8]}.tsv") if trace else None

    def _spend(self, n: int) -> None:
        """The time of ``n`` rows' batches: host work in parallel with other calls, device work one at a time."""
        batches = -(-n // self.batch_size)
        time.sleep(self.host_s * batches)
        with self.device_lock:
            start = time.time()
            time.sleep(self.device_s * batches)
            if self.trace:
                with open(self.trace, "a") as f:
                    f.write(f"{self.name}\t{start:.4f}\t{time.time():.4f}\t{n}\n")


class SimulatedTargets(_Simulated):
    """Stands in for ``TargetStage``: ``target`` JPEGs of ``targets.resolution``."""

    name = "targets"
    columns = {"target": b""}

    @classmethod
    def stands_in(cls, cfg: TargetConfig) -> bool:
        return is_simulated(cfg.model)

    @classmethod
    def models(cls, cfg: TargetConfig) -> list[ModelRef]:
        return [ModelRef("targets", cfg.model, cfg.revision, "SDXL", "--set targets.model")]

    def __init__(self, cfg: TargetConfig, shards: ShardConfig = ShardConfig()):
        super().__init__(cfg.model, cfg.batch_size)
        rng = np.random.default_rng(0)
        size = cfg.resolution
        self.images = [_jpeg(Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize(
            (size, size), Image.Resampling.BICUBIC)) for _ in range(VARIANTS)]

    def process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any] | Drop]:
        self._spend(len(rows))
        return [{"target": self.images[int(r["seed"]) % VARIANTS]} for r in rows]


class SimulatedSegment(_Simulated):
    """Stands in for ``SegmentStage``: reference, mask and the detection record; drops one sample in
    ``DROP_EVERY`` as ``no_box``."""

    name = "segment"
    columns = SegmentStage.columns

    @classmethod
    def stands_in(cls, cfg: SegmentConfig) -> bool:
        return cfg.method != "key" and is_simulated(cfg.detector)

    @classmethod
    def models(cls, cfg: SegmentConfig) -> list[ModelRef]:  # the stand-in does both models' work
        return [ModelRef("detector", cfg.detector, cfg.detector_revision, "Grounding DINO", "--set segment.detector")]

    def __init__(self, cfg: SegmentConfig, shards: ShardConfig = ShardConfig()):
        super().__init__(cfg.detector, cfg.batch_size)
        size = cfg.reference_size
        mask = Image.new("L", (size, size), 0)
        ImageDraw.Draw(mask).ellipse((size // 4, size // 5, 3 * size // 4, 4 * size // 5), fill=255)
        reference = Image.composite(Image.new("RGB", mask.size, (150, 90, 40)), Image.new("RGB", mask.size, "white"), mask)
        self.outputs = {"reference": _png(reference) if cfg.reference_format == "png" else _jpeg(reference),
                        "mask": _png(mask), "det_score": 0.6, "sam_score": 0.95, "mask_area": 0.3,
                        "box": f"{size / 4:.1f},{size / 5:.1f},{3 * size / 4:.1f},{4 * size / 5:.1f}",
                        "crop": f"0,0,{size},{size}"}

    def process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any] | Drop]:
        self._spend(len(rows))
        return [Drop("no_box", "simulated") if int(r["seed"]) % DROP_EVERY == 0 else dict(self.outputs) for r in rows]
