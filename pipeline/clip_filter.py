"""Optional stage: caption-target agreement. The target's CLIP score against its own caption (the cosine of
the image and text embeddings, as DataComp scores its pool with ViT-L/14); a target under ``clip.threshold``
shows something else than its caption says and is dropped as ``clip:low_score``. Every kept sample carries
its score in its json and its manifest record, so the threshold can be studied after a run. Off by default:
``--set clip.enabled=true``.
"""

from __future__ import annotations

import io
from typing import Any

from PIL import Image

from pipeline.config import ClipFilterConfig, ShardConfig
from pipeline.stage import Drop, ModelRef, Stage


class ClipFilterStage(Stage):
    """target + caption -> ``clip_score``; drops ``low_score``."""

    name = "clip"
    columns = {"clip_score": float("nan")}
    pool_name, title, funnel = "clip", "CLIP filter", "caption-target agreement"
    record = ("clip_score",)

    @classmethod
    def enabled(cls, cfg: ClipFilterConfig) -> bool:
        return cfg.enabled

    @classmethod
    def models(cls, cfg: ClipFilterConfig) -> list[ModelRef]:
        return [ModelRef("clip", cfg.model, cfg.revision, "CLIP", "--set clip.model")]

    def __init__(self, cfg: ClipFilterConfig, shards: ShardConfig = ShardConfig(), clip=None):
        """``clip``: a ``dreamcache.metrics.Clip`` already built and placed; default: load ``cfg.model``."""
        import torch

        from dreamcache.metrics import Clip

        self.cfg = cfg
        self.clip = clip or Clip(cfg.model, batch_size=cfg.batch_size, revision=cfg.revision,
                                 dtype=getattr(torch, cfg.dtype))

    def process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any] | Drop]:
        images = [Image.open(io.BytesIO(r["target"])) for r in rows]
        scores = self.clip.score(images, [str(r["caption"]) for r in rows]).tolist()
        return [{"clip_score": s} if s >= self.cfg.threshold else Drop("low_score", f"{s:.4f} < {self.cfg.threshold}")
                for s in scores]
