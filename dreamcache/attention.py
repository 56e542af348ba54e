"""Where the generated image looks in the reference (the paper's Fig. 5): the adapters' attention from the image
under generation to the reference's cached tokens, per adapter layer, over a range of sampling steps.

    maps = AttentionMaps(steps=range(10, 40), region=(0.25, 0.25, 0.75, 0.75))
    images = pipe("a dog in the snow", cache=cache, attention=maps).images
    maps.layers()                       # {layer: (images, K, h, w)}: each image's map, summing to 1 over h, w, K
    maps.save(folder, images, references)   # PNG overlays on each reference, beside the generated image

Each adapter hands its attention probabilities (averaged over its heads) for the rows that use the reference
(``CacheInputs.attention``); rows without a reference (the unconditional row of joint guidance) give none. A
layer's map for one image is the mean, over the chosen steps, the layer's transformer blocks and the chosen
query tokens (a region of the image, or all of it), of those probabilities: a distribution over the reference's
tokens, K references side by side.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreamcache.images import save_image


class AttentionMaps:
    """Accumulates, per layer and per image, the attention from the image to the reference's tokens.
    ``steps``: the sampling steps (0 first) to average over (default: all); ``region``: the query tokens, as
    fractions (x0, y0, x1, y1) of the image (default: every token)."""

    def __init__(self, steps: range | None = None, region: tuple[float, float, float, float] | None = None):
        if region is not None and not (0 <= region[0] < region[2] <= 1 and 0 <= region[1] < region[3] <= 1):
            raise ValueError(f"attention region {region}: x0 < x1 and y0 < y1, as fractions of the image in [0, 1]")
        self.steps, self.region = steps, region
        self.step = 0  # the sampling step under way (the pipeline's step callback advances it)
        self.sums: dict[str, dict[int, torch.Tensor]] = {}  # layer -> image -> (M,) sum of distributions
        self.counts: dict[str, dict[int, int]] = {}
        self.references = 1  # K: the cache's references, their tokens one after the other

    def recorder(self, image_of: Callable[[int], int | None]) -> Callable:
        """The ``CacheInputs.attention`` callback for one U-Net call whose row r is image ``image_of(r)`` (None:
        a row that is no image's, e.g. combined guidance's reference-only row)."""
        def record(layer: str, rows: torch.Tensor | None, probs: torch.Tensor) -> None:
            if self.steps is not None and self.step not in self.steps:
                return
            n, N, M = probs.shape
            picked = probs[:, self._queries(N, probs.device)].mean(1).float().cpu()  # (n, M)
            indices = range(n) if rows is None else range(rows.start, rows.start + n) if isinstance(rows, slice) \
                else rows.tolist()
            sums, counts = self.sums.setdefault(layer, {}), self.counts.setdefault(layer, {})
            for r, p in zip(indices, picked):
                image = image_of(r)
                if image is not None:
                    sums[image] = sums.get(image, 0) + p
                    counts[image] = counts.get(image, 0) + 1
        return record

    def _queries(self, tokens: int, device) -> torch.Tensor:
        """A boolean mask of the image tokens (a square grid, row by row) inside the region."""
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"{tokens} image tokens are not a square grid")
        if self.region is None:
            return torch.ones(tokens, dtype=torch.bool, device=device)
        x0, y0, x1, y1 = self.region
        lo_x, hi_x = min(int(x0 * side), side - 1), max(int(x0 * side) + 1, math.ceil(x1 * side))
        lo_y, hi_y = min(int(y0 * side), side - 1), max(int(y0 * side) + 1, math.ceil(y1 * side))
        grid = torch.zeros(side, side, dtype=torch.bool, device=device)
        grid[lo_y:hi_y, lo_x:hi_x] = True
        return grid.flatten()

    def advance(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """The pipeline's ``callback_on_step_end``: step ``step`` is done."""
        self.step = step + 1
        return callback_kwargs

    def layers(self) -> dict[str, torch.Tensor]:
        """{layer: (images, K, h, w)}: each image's mean attention over the reference tokens (sums to 1)."""
        out = {}
        for layer, sums in self.sums.items():
            images = sorted(sums)
            maps = torch.stack([sums[i] / self.counts[layer][i] for i in images])  # (images, M)
            per = maps.shape[1] // self.references
            side = math.isqrt(per)
            out[layer] = maps.reshape(len(images), self.references, side, side)
        return out

    def sheets(self, images: list[Image.Image], references: list[Image.Image]) -> dict[str, list[Image.Image]]:
        """{layer: one sheet per image}: the image's map over each reference as an overlay, then the image."""
        out = {}
        for layer, maps in self.layers().items():
            out[layer] = []
            for i, image in enumerate(images):
                size = image.size[1]
                tiles = [overlay(ref.convert("RGB").resize((size, size)), maps[i, k].numpy())
                         for k, ref in enumerate(references[:maps.shape[1]])]
                sheet = Image.new("RGB", (size * (len(tiles) + 1), size), "white")
                for k, tile in enumerate([*tiles, image.convert("RGB")]):
                    sheet.paste(tile, (k * size, 0))
                out[layer].append(sheet)
        return out

    def save(self, folder: str | Path, images: list[Image.Image], references: list[Image.Image],
             stem: str = "image") -> list[Path]:
        """For each image and layer, FOLDER/STEM-I-LAYER.png (``sheets``); returns the paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for layer, sheets in self.sheets(images, references).items():
            for i, sheet in enumerate(sheets):
                path = folder / f"{stem}-{i}-{layer.replace('.', '_')}.png"
                save_image(sheet, path)
                paths.append(path)
        return paths


def overlay(reference: Image.Image, attention: np.ndarray, alpha: float = 0.6) -> Image.Image:
    """``attention`` (h, w) as a heat map (dark blue -> red -> yellow, scaled to its own maximum) over the
    reference."""
    a = attention / max(float(attention.max()), 1e-12)
    heat = np.stack([np.clip(2 * a, 0, 1), np.clip(2 * a - 1, 0, 1), np.clip(1 - 2 * a, 0, 1) * 0.6], axis=-1)
    heat = Image.fromarray((heat * 255).astype(np.uint8)).resize(reference.size, Image.Resampling.NEAREST)
    return Image.blend(reference, heat, alpha)
