"""Subject cut-outs with the data pipeline's own segmenter (Grounding DINO + SAM, same crop as training).

The reference a user gives is segmented exactly as the training references were made, so the adapters see
the same kind of input: the subject on pure white, cropped square around the mask with the same margin.
Evaluation's masked metrics use the same cut-out on both the generated and the real images.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from PIL import Image

from pipeline.config import SegmentConfig, build_config
from dreamcache.images import on_white
from pipeline.segment import SegmentStage, make_reference


class SubjectNotFound(ValueError):
    pass


def segment_config(profile: str = "paper") -> SegmentConfig:
    """The pipeline's segmenter, uncompiled: compiling (minutes) pays off over a dataset, not a few images."""
    return replace(build_config(profile).segment, compile=False)


class Segmenter:
    """``cutout(image, subject)`` -> (subject on white, square, ``size`` px; bool mask of the input image)."""

    def __init__(self, cfg: SegmentConfig | None = None):
        self.cfg = cfg or segment_config()
        self.stage = SegmentStage(self.cfg)

    def cutouts(self, images: list[Image.Image], subject: str, size: int) -> list[tuple[Image.Image, np.ndarray] | None]:
        """One entry per image; None where Grounding DINO finds no ``subject`` above its thresholds."""
        images = [on_white(im) for im in images]
        out: list[tuple[Image.Image, np.ndarray] | None] = []
        for start in range(0, len(images), self.cfg.batch_size):
            chunk = images[start:start + self.cfg.batch_size]
            for image, found in zip(chunk, self.stage.find(chunk, [subject] * len(chunk))):
                if found is None or not found[0].any():
                    out.append(None)
                    continue
                mask = found[0]
                ref, _ = make_reference(np.asarray(image), mask, self.cfg.margin, size)
                out.append((Image.fromarray(ref), mask))
        return out

    def cutout(self, image: Image.Image, subject: str, size: int) -> tuple[Image.Image, np.ndarray]:
        found = self.cutouts([image], subject, size)[0]
        if found is None:
            raise SubjectNotFound(
                f"could not find {subject!r} in the image (Grounding DINO box threshold "
                f"{self.cfg.box_threshold}): name the subject differently with --subject, or pass a reference "
                f"that is already on white with --no-segment")
        return found
