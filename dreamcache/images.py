"""Images in and out: references with transparency go on white; outputs replace files only when complete."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dreamcache.store import write_file_atomic

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def on_white(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited on white: a cut-out PNG's clear background is white, as the
    pipeline's references are, not the black (or arbitrary) colour its transparent pixels happen to hold.
    An RGB image is returned as it is (callers that draw on the result must copy it first)."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # RGB already: the same image, not a copy


def to_tensor(image: Image.Image, size: int):
    """(3, size, size) float32 in [-1, 1] (the VAE's range)."""
    import torch

    image = on_white(image)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.array(image)).float().div_(127.5).sub_(1.0)  # (H, W, 3), one pass over the pixels
    return x.permute(2, 0, 1)  # channels first as a view: collate's stack writes the batch contiguously


def open_image(path: str | Path) -> Image.Image:
    """An image file as RGB on white, decoded now; a missing or non-image file is a clear error."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no image at {path}")
    try:
        with Image.open(path) as im:
            im.load()
            rgb = on_white(im)
            return rgb.copy() if rgb is im else rgb  # closing the file releases the image it was read into
    except (UnidentifiedImageError, OSError, SyntaxError) as e:  # PIL raises SyntaxError for some broken headers
        raise ValueError(f"{path} is not a readable image ({type(e).__name__}: {e})") from None


def save_image(image: Image.Image, path: str | Path, **params) -> None:
    """Saves through a temporary file and a rename; the format comes from the suffix (PNG if none)."""
    fmt = FORMATS.get(Path(path).suffix.lower(), "PNG")
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    write_file_atomic(path, buf.getvalue())
