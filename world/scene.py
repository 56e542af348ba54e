"""What the small world holds, how a scene is drawn and rendered, and what its captions say.

A scene is one subject (shape, colour, pattern) in a context (position, background) at 32x32 pixels. The
shape is the subject's class: the only part of it a class-only caption names. Its identity (colour and
pattern) is what a personalised model must take from the reference. Every draw is seeded, so a scene and its
pixels are a function of the seed alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32  # pixels per side
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (235, 215, 35), "green": (40, 165, 60),
           "blue": (40, 90, 230), "purple": (150, 60, 200)}
PATTERNS = ("plain", "striped")
STRIPE_SHADE = 0.45  # a striped subject's dark rows: its colour times this
BACKGROUNDS = {"white": (240, 240, 240), "gray": (128, 128, 128), "black": (20, 20, 20)}
POSITIONS = {"left": 10.5, "center": 16.0, "right": 21.5}  # the subject's centre, x in pixels
WHERE = {"left": "on the left", "center": "in the center", "right": "on the right"}
RADIUS = 6.0  # half the subject's width, pixels (jittered by +-0.5)
JITTER = 1.0  # the subject's centre moves by up to this many pixels, x and y
SUPERSAMPLE = 4  # rendered at 4x and reduced: smooth edges


@dataclass(frozen=True)
class Subject:
    shape: str
    colour: str
    pattern: str

    @property
    def identity(self) -> str:
        """What only the reference shows: 'red striped'."""
        return f"{self.colour} {self.pattern}"

    @property
    def name(self) -> str:
        return f"{self.colour}-{self.pattern}-{self.shape}"


@dataclass(frozen=True)
class Scene:
    subject: Subject
    position: str
    background: str
    dx: float = 0.0  # jitter of the centre, pixels
    dy: float = 0.0
    radius: float = RADIUS

    def caption(self, identity: bool = False) -> str:
        """'a circle on the left, on a white background'; with ``identity``, 'a red striped circle ...'."""
        s = self.subject
        noun = f"{s.identity} {s.shape}" if identity else s.shape
        return f"a {noun} {WHERE[self.position]}, on a {self.background} background"


ALL_SUBJECTS = tuple(Subject(s, c, p) for s in SHAPES for c in COLOURS for p in PATTERNS)


def held_out_subjects() -> tuple[Subject, ...]:
    """Six subjects that no training data holds: each colour once, each shape twice (once plain, once
    striped); every colour, shape and pattern is still seen in training, in other subjects."""
    colours = list(COLOURS)
    return tuple(Subject(SHAPES[i % 3], colours[i], PATTERNS[i % 2]) for i in range(len(colours)))


def training_subjects() -> tuple[Subject, ...]:
    held = set(held_out_subjects())
    return tuple(s for s in ALL_SUBJECTS if s not in held)


def contexts() -> list[tuple[str, str]]:
    """Every (position, background)."""
    return [(p, b) for b in BACKGROUNDS for p in POSITIONS]


def draw_scene(rng: random.Random, subjects: tuple[Subject, ...], position: str | None = None,
               background: str | None = None) -> Scene:
    """A scene of one of ``subjects``, in a drawn (or the given) context, with jitter."""
    return Scene(rng.choice(subjects), position or rng.choice(list(POSITIONS)),
                 background or rng.choice(list(BACKGROUNDS)), rng.uniform(-JITTER, JITTER),
                 rng.uniform(-JITTER, JITTER), RADIUS + rng.uniform(-0.5, 0.5))


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | tuple[float, ...]:
    if shape == "circle":
        return (cx - r, cy - r, cx + r, cy + r)
    if shape == "square":
        r *= 0.9  # the same area as the circle, about
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        r *= 1.15
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    raise ValueError(f"unknown shape {shape!r}; shapes: {', '.join(SHAPES)}")


def subject_mask(scene: Scene, size: int = SIZE) -> np.ndarray:
    """The subject's coverage of each pixel, in [0, 1], (size, size)."""
    k = SUPERSAMPLE * size / SIZE
    big = Image.new("L", (round(SIZE * k),) * 2, 0)
    cx, cy = (POSITIONS[scene.position] + scene.dx) * k, (SIZE / 2 + scene.dy) * k
    outline = _outline(scene.subject.shape, cx, cy, scene.radius * k)
    draw = ImageDraw.Draw(big)
    (draw.ellipse if scene.subject.shape == "circle" else draw.polygon)(outline, fill=255)
    return np.asarray(big.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0


def render(scene: Scene, size: int = SIZE) -> Image.Image:
    """The scene as an RGB image: flat background, the subject in its colour, striped subjects with dark rows
    (two of every four, fixed to the image's grid)."""
    colour = np.array(COLOURS[scene.subject.colour], dtype=np.float32)
    fill = np.broadcast_to(colour, (size, size, 3)).copy()
    if scene.subject.pattern == "striped":
        rows = (np.arange(size) * SIZE / size // 2) % 2 == 1
        fill[rows] *= STRIPE_SHADE
    alpha = subject_mask(scene, size)[..., None]
    background = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    return Image.fromarray(np.round(alpha * fill + (1 - alpha) * background).astype(np.uint8))


def reference_scene(subject: Subject) -> Scene:
    """How a held-out subject is shown to a personalised model: centred on white, no jitter."""
    return Scene(subject, "center", "white")


def with_context(scene: Scene, position: str, background: str) -> Scene:
    return replace(scene, position=position, background=background)
