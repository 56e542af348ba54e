"""Reads a small-world image back: the subject's shape, colour and pattern, where it stands and on what.

Rule-based, from the pixels alone: the background is the colour of the image's border; the subject is the pixels
nearer a subject colour than the background's (its largest connected part); its colour is the palette colour most of its pixels are
nearest to (each colour in its plain and its dark stripe shade); it is striped when enough of its pixels
are nearest a dark shade; its position is where its centre of mass falls; its shape is how much of its
bounding box it fills. ``check`` measures the judge on rendered scenes (tests hold it to at least 95%).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from world.scene import (ALL_SUBJECTS, BACKGROUNDS, COLOURS, POSITIONS, SIZE, STRIPE_SHADE, draw_scene, render)

STRIPED_FRACTION = 0.25  # of the subject's pixels nearest a dark shade: striped
_PALETTE = np.array([c for c in COLOURS.values()] + [tuple(v * STRIPE_SHADE for v in c) for c in COLOURS.values()],
                    dtype=np.float32)  # (12, 3): plain shades, then dark shades


@dataclass(frozen=True)
class Reading:
    shape: str | None  # None: no subject found
    colour: str | None
    pattern: str | None
    position: str | None
    background: str

    @property
    def identity(self) -> str | None:
        return f"{self.colour} {self.pattern}" if self.colour else None


def background_of(pixels: np.ndarray) -> tuple[str, np.ndarray]:
    """The named background nearest the median colour of the image's outer two-pixel ring, and that colour."""
    ring = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3), pixels[:, :2].reshape(-1, 3),
                           pixels[:, -2:].reshape(-1, 3)])
    median = np.median(ring, axis=0)
    name = min(BACKGROUNDS, key=lambda b: float(np.linalg.norm(np.array(BACKGROUNDS[b]) - median)))
    return name, median


def subject_pixels(pixels: np.ndarray, background: np.ndarray) -> np.ndarray:
    """The subject's mask, by the judge's own rule (not the keying segmenter's, which cuts the references it
    would then judge): the pixels nearer a subject colour (any palette colour, plain or dark shade) than the
    background's colour, their largest 4-connected part (specks of noise elsewhere are not the subject)."""
    from scipy import ndimage

    candidates = np.concatenate([background[None].astype(np.float32), _PALETTE])  # (13, 3): background first
    nearest = np.argmin(np.linalg.norm(pixels[..., None, :] - candidates, axis=-1), axis=-1)  # (H, W)
    labels, n = ndimage.label(nearest > 0)
    if n <= 1:
        return labels > 0
    return labels == 1 + int(np.argmax(ndimage.sum(labels > 0, labels, range(1, n + 1))))


def read(image: Image.Image) -> Reading:
    """What ``image`` shows (resized to the world's size first)."""
    if image.size != (SIZE, SIZE):
        image = image.resize((SIZE, SIZE), Image.Resampling.BOX)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    background, colour = background_of(pixels)
    mask = subject_pixels(pixels, colour)
    if mask.sum() < 4:
        return Reading(None, None, None, None, background)
    nearest = np.argmin(np.linalg.norm(pixels[mask][:, None] - _PALETTE[None], axis=-1), axis=1)  # (n,)
    names = list(COLOURS)
    votes = np.bincount(nearest % len(names), minlength=len(names))
    striped = float((nearest >= len(names)).mean()) >= STRIPED_FRACTION
    ys, xs = np.nonzero(mask)
    cx = xs.mean() + 0.5
    position = min(POSITIONS, key=lambda p: abs(POSITIONS[p] - cx))
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = "square" if fill > 0.86 else "circle" if fill > 0.64 else "triangle"
    return Reading(shape, names[int(np.argmax(votes))], "striped" if striped else "plain", position, background)


def check(n: int = 1000, seed: int = 0) -> dict[str, float]:
    """The judge's accuracy per attribute on ``n`` rendered scenes of every subject."""
    rng = random.Random(seed)
    right = {k: 0 for k in ("shape", "colour", "pattern", "position", "background")}
    for _ in range(n):
        scene = draw_scene(rng, ALL_SUBJECTS)
        r = read(render(scene))
        truth = {"shape": scene.subject.shape, "colour": scene.subject.colour, "pattern": scene.subject.pattern,
                 "position": scene.position, "background": scene.background}
        for k in right:
            right[k] += getattr(r, k) == truth[k]
    return {k: v / n for k, v in right.items()}
