"""Stage 4: Grounding DINO finds the caption's subject, SAM masks it, the reference is cut out on white.

Both models are the ``transformers`` implementations, which load the official checkpoints. Quality filters
drop a sample with a recorded reason: ``subject_too_long`` (the subject phrase needs more Grounding DINO
tokens than ``max_text_tokens``, the fixed length its text is padded to; it is never truncated, which could
find another subject), ``no_box`` (nothing above the box threshold), ``low_sam_score``
(SAM's predicted IoU), ``mask_area`` (too small or too large a fraction of the image), ``mask_border`` (the
subject is cut off by the image edge). With ``segment.method: key`` the backdrop's colour is keyed out instead
(``KeyedSegmentStage``: no model, for subjects on a flat backdrop) and the same filters apply. The reference is the masked subject on pure white, cropped around
the mask with a margin, padded to a square and resized; ``crop`` in the sample's json is that square in
target pixels, so the mask can be mapped onto the reference exactly.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from dreamcache.segmenter import GroundedModels, GroundedSegmenter, KeyedSegmenter, make_reference
from pipeline.config import SegmentConfig, ShardConfig
from pipeline.stage import Drop, ModelRef, Stage, encode_jpeg


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def touches_border(mask: np.ndarray, tolerance: int) -> bool:
    t = max(tolerance, 1)
    return bool(mask[:t].any() or mask[-t:].any() or mask[:, :t].any() or mask[:, -t:].any())


class SegmentStage(GroundedSegmenter, Stage):
    """target + subject -> reference, mask (single-channel PNG) and the detection/segmentation record."""

    name = "segment"
    columns = {"reference": b"", "mask": b"", "det_score": float("nan"), "sam_score": float("nan"),
               "mask_area": float("nan"), "box": "", "crop": ""}
    pool_name, title, funnel = "segment", "segmentation", "segmented triplets"
    record = ("det_score", "sam_score", "mask_area")

    @classmethod
    def models(cls, cfg: SegmentConfig) -> list[ModelRef]:
        if cfg.method == "key":
            return []
        return [ModelRef("detector", cfg.detector, cfg.detector_revision, "Grounding DINO", "--set segment.detector"),
                ModelRef("segmenter", cfg.segmenter, cfg.segmenter_revision, "SAM", "--set segment.segmenter")]

    @classmethod
    def variant(cls, cfg: SegmentConfig) -> type:
        return KeyedSegmentStage if cfg.method == "key" else cls

    @classmethod
    def sample_json(cls, row: dict[str, Any]) -> dict[str, Any]:
        """The scores, and the box (target pixels) and the reference's square crop of the target."""
        return {**super().sample_json(row), "box": [float(v) for v in str(row["box"]).split(",")],
                "crop": [int(v) for v in str(row["crop"]).split(",")]}

    def __init__(self, cfg: SegmentConfig, shards: ShardConfig = ShardConfig(), models: GroundedModels | None = None):
        """``models``: detector and segmenter already built and placed (see ``GroundedSegmenter``)."""
        super().__init__(cfg, models)
        self.shards = shards

    def process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any] | Drop]:
        out: list[dict[str, Any] | Drop] = []
        for start in range(0, len(rows), self.cfg.batch_size):
            out += self._process(rows[start:start + self.cfg.batch_size])
        return out

    def _process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any] | Drop]:
        bound = self.cfg.max_text_tokens
        subjects = [str(r["subject"]) for r in rows]
        tokens = self.text_tokens(subjects)
        fit = [i for i, n in enumerate(tokens) if n <= bound]
        images = {i: Image.open(io.BytesIO(rows[i]["target"])).convert("RGB") for i in fit}
        found = dict(zip(fit, self.find([images[i] for i in fit], [subjects[i] for i in fit])))
        results: list[dict[str, Any] | Drop] = []
        for i, n in enumerate(tokens):
            if n > bound:
                results.append(Drop("subject_too_long", f"{n} Grounding DINO tokens > segment.max_text_tokens={bound}"))
            elif found[i] is None:
                results.append(Drop("no_box", "nothing stands out from the backdrop" if self.cfg.method == "key"
                                    else f"no box above {self.cfg.box_threshold}"))
            else:
                results.append(self._finish(np.asarray(images[i]), *found[i]))
        return results

    def _finish(self, image: np.ndarray, mask: np.ndarray, sam_score: float, box: list[float],
                det_score: float) -> dict[str, Any] | Drop:
        cfg = self.cfg
        area = float(mask.mean())
        if sam_score < cfg.min_sam_score:
            return Drop("low_sam_score", f"{sam_score:.3f} < {cfg.min_sam_score}")
        if not mask.any() or not cfg.min_area <= area <= cfg.max_area:
            return Drop("mask_area", f"{area:.4f} outside [{cfg.min_area}, {cfg.max_area}]")
        if cfg.reject_border and touches_border(mask, cfg.border_tolerance):
            return Drop("mask_border", "mask touches the image border")
        reference, crop = make_reference(image, mask, cfg.margin, cfg.reference_size)
        ref_bytes = (encode_png(reference) if cfg.reference_format == "png"
                     else encode_jpeg(Image.fromarray(reference), self.shards))
        return {"reference": ref_bytes, "mask": encode_png(mask.astype(np.uint8) * 255), "det_score": det_score,
                "sam_score": sam_score, "mask_area": area,
                "box": ",".join(f"{v:.1f}" for v in box), "crop": ",".join(str(v) for v in crop)}


class KeyedSegmentStage(KeyedSegmenter, SegmentStage):
    """``SegmentStage`` with the backdrop keyed out (``segment.method: key``): the same filters and references."""

    def __init__(self, cfg: SegmentConfig, shards: ShardConfig = ShardConfig(), models=None):
        KeyedSegmenter.__init__(self, cfg)
        self.shards = shards
