"""Training data: the pipeline's shards as an endless, seeded webdataset stream of (caption, target, reference).

Shards come from the committed manifests only (a tar without a manifest does not exist). Each rank and
DataLoader worker resamples shards with its own seed (webdataset's ``ResampledShards``: split by node and
worker without coordination), shuffles within a buffer, decodes and augments. A sample that fails to read
or decode is skipped and counted (``SKIPPED``, per process), never fatal. Given the seed, rank and worker,
the stream is deterministic, which is what lets a resumed run see the same data as an uninterrupted one.

Reference augmentations (paper sec. 4 "scale, shift, resize"; official code): the subject is shrunk
keeping at least ``min_area`` of its area and shifted on the white canvas, flipped horizontally, its
colours jittered lightly, and a small patch may be erased to white.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageEnhance

from manifests.schema import SHARDS, read_manifests
from manifests.store import Store

log = logging.getLogger(__name__)
SKIPPED: Counter = Counter()  # reason -> samples skipped in this process


@dataclass(frozen=True)
class DataConfig:
    resolution: int = 512  # target and reference side (paper: 512)
    shuffle_buffer: int = 1000
    min_area: float = 0.7  # the augmented subject keeps at least this fraction of its area
    flip_p: float = 0.5
    jitter: float = 0.1  # brightness/contrast/saturation factors drawn from [1 - j, 1 + j]
    erase_p: float = 0.25  # chance of erasing one patch (up to 1/4 of the side) to white

    def __post_init__(self):
        if not 0 < self.min_area <= 1:
            raise ValueError("min_area must be in (0, 1]")


def shard_urls(data: str) -> list[str]:
    """URLs of the committed shards of a dataset folder or fsspec URL."""
    store = Store(data)
    urls = [store.url(SHARDS, m.shard) for m in read_manifests(store)]
    if not urls:
        raise FileNotFoundError(f"{data}: no committed shards (no manifests/*.json); is this a dataset folder?")
    return urls


def _skip(reason: str):
    def handler(exn: Exception) -> bool:
        SKIPPED[reason] += 1
        log.warning("skipping a sample (%s): %s", reason, exn)
        return True  # continue with the next sample
    return handler


def augment_reference(ref: Image.Image, rng: random.Random, cfg: DataConfig) -> Image.Image:
    """Scale + shift on white, flip, colour jitter of the subject, random erasing; keeps the input size."""
    w, h = ref.size
    scale = rng.uniform(cfg.min_area ** 0.5, 1.0)  # side factor, so the area factor is >= min_area
    small = ref.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
    if cfg.jitter:
        foreground = (np.asarray(small) < 250).any(-1, keepdims=True)  # (h, w, 1): not white
        jittered = small
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            jittered = enhance(jittered).enhance(rng.uniform(1 - cfg.jitter, 1 + cfg.jitter))
        small = Image.fromarray(np.where(foreground, np.asarray(jittered), 255).astype(np.uint8))  # background stays white
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    canvas.paste(small, (rng.randint(0, w - small.width), rng.randint(0, h - small.height)))
    if rng.random() < cfg.flip_p:
        canvas = canvas.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < cfg.erase_p:
        side = rng.randint(1, max(1, w // 4))
        x, y = rng.randint(0, w - side), rng.randint(0, h - side)
        canvas.paste((255, 255, 255), (x, y, x + side, y + side))
    return canvas


def to_tensor(image: Image.Image, size: int):
    """(3, size, size) float32 in [-1, 1] (the VAE's range)."""
    import torch

    arr = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    return torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def decode_sample(sample: dict[str, Any], cfg: DataConfig, rng: random.Random) -> dict[str, Any]:
    ref_key = next(k for k in sample if k.startswith("reference."))
    meta = json.loads(sample["json"])
    target = Image.open(io.BytesIO(sample["target.jpg"])).convert("RGB")
    reference = Image.open(io.BytesIO(sample[ref_key])).convert("RGB")
    return {"key": sample["__key__"], "caption": sample["txt"].decode("utf-8"), "category": meta.get("category", ""),
            "target": to_tensor(target, cfg.resolution),
            "reference": to_tensor(augment_reference(reference, rng, cfg), cfg.resolution)}


def make_dataset(urls: list[str], cfg: DataConfig, seed: int):
    """An endless webdataset pipeline of decoded, augmented samples (an IterableDataset)."""
    import webdataset as wds

    rng = random.Random(seed)  # per process; workers reseed in _worker_rng

    def decode(source: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        local = _worker_rng(seed) or rng
        for sample in source:
            try:
                yield decode_sample(sample, cfg, local)
            except Exception as e:  # a corrupt member: skip the sample, count it, go on
                _skip("decode")(e)

    return wds.DataPipeline(
        wds.ResampledShards(urls, seed=seed, deterministic=True),  # seeded by rank and worker: a split per worker
        wds.tarfile_to_samples(handler=_skip("read")),
        wds.shuffle(cfg.shuffle_buffer, initial=min(100, cfg.shuffle_buffer), seed=seed),
        decode,
    )


def _worker_rng(seed: int) -> random.Random | None:
    import torch.utils.data

    from webdataset.utils import pytorch_worker_seed

    info = torch.utils.data.get_worker_info()
    return random.Random(f"{seed}/{pytorch_worker_seed()}") if info is not None else None


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    return {"key": [s["key"] for s in samples], "caption": [s["caption"] for s in samples],
            "target": torch.stack([s["target"] for s in samples]),  # (B, 3, R, R)
            "reference": torch.stack([s["reference"] for s in samples])}
