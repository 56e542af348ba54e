"""Training data: the pipeline's shards as an endless, seeded webdataset stream of (caption, target, reference).

Shards come from the committed manifests only (a tar without a manifest does not exist) and are opened
through fsspec, so a dataset on local disk, ``s3://`` or ``gs://`` reads the same way. Each rank and
DataLoader worker resamples shards with its own seed (webdataset's ``ResampledShards``: split by node and
worker without coordination), shuffles within a buffer, decodes and augments. A sample that fails to read
or decode is skipped, never fatal, and counted in the stream itself: each sample carries ``skipped``, the
samples its worker skipped since the one before it, so the trainer can add them up across workers and
ranks. ``max_unreadable`` shards in a row that give no sample at all stop the stream with an error naming
them (a dataset none of whose shards can be read would otherwise be resampled forever). Given the seed, rank
and worker, the stream is deterministic, which is what lets a resumed run see the same data as an
uninterrupted one.

Reference augmentation: the official code's, see ``DataConfig``.
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

from dreamcache.images import on_white, to_tensor
from manifests.schema import SHARDS, read_manifests
from dreamcache.store import Store

log = logging.getLogger(__name__)


class UnreadableData(RuntimeError):
    """Too many shards in a row could not be read."""


@dataclass(frozen=True)
class DataConfig:
    """Reference augmentation as in the official code (its GenDataset): the subject cropped tight, resized so its
    longer side is ``min_side``-1 of the canvas, pasted at a uniform position on white; flip; colour jitter with
    probability ``jitter_p``; random erasing to white with probability ``erase_p``."""

    resolution: int = 512  # target and reference side (paper: 512)
    shuffle_buffer: int = 1000
    min_side: float = 0.7  # the subject's longer side: uniform in [min_side, 1] x the canvas side
    flip_p: float = 0.5
    jitter_p: float = 0.1
    jitter: tuple[float, float, float, float] = (0.2, 0.2, 0.2, 0.05)  # brightness, contrast, saturation, hue
    erase_p: float = 0.4
    erase_area: tuple[float, float] = (0.02, 0.25)  # fraction of the image
    erase_aspect: tuple[float, float] = (0.3, 3.3)
    max_unreadable: int = 50  # shards in a row that give no sample before the stream stops with an error
    max_undecodable: int = 1000  # samples in a row that fail to decode before the stream stops with an error
    latents: str | None = None  # a target latent cache folder (training/encode.py): targets are not decoded
    views: int = 1  # augmented views of each sample's reference (K > 1: "reference" is (K, 3, R, R))

    def __post_init__(self):
        if not 0 < self.min_side <= 1:
            raise ValueError("min_side must be in (0, 1]")
        if self.views < 1:
            raise ValueError("views must be >= 1")


def shard_urls(data: str) -> list[str]:
    """URLs of the committed shards of a dataset folder or fsspec URL."""
    store = Store(data)
    urls = [store.url(SHARDS, m.shard) for m in read_manifests(store)]
    if not urls:
        raise FileNotFoundError(f"{data}: no committed shards (no manifests/*.json); is this a dataset folder?")
    return urls


def _describe(exn: BaseException) -> str:
    return f"{type(exn).__name__}: {exn}" if str(exn) else type(exn).__name__


_NOT_WHITE = ([255] * 250 + [0] * 6) * 3  # point() table, each band: a value under 250 -> 255, else 0


def augment_reference(ref: Image.Image, rng: random.Random, cfg: DataConfig) -> Image.Image:
    """The reference, augmented; keeps the input size."""
    return augment_with_record(ref, rng, cfg)[0]


def augment_with_record(ref: Image.Image, rng: random.Random, cfg: DataConfig) -> tuple[Image.Image, dict]:
    """(augmented reference, what was drawn): tight crop to the subject (whatever is not white), its longer
    side resized to uniform [min_side, 1] of the canvas, pasted at a uniform position on white, flipped with
    ``flip_p``, colour-jittered (whole image, in pixel space, random order) with ``jitter_p``, and a random
    rectangle erased to white with ``erase_p``."""
    w, h = ref.size
    record = {"side": None, "flip": False, "jitter": False, "erase": None}
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    ref = on_white(ref)
    box = ref.point(_NOT_WHITE).getbbox()  # the subject: every pixel with a channel under 250
    if box is not None:  # an all-white reference stays white
        subject = ref.crop(box)
        side = rng.uniform(cfg.min_side, 1.0)
        scale = side * min(w, h) / max(subject.size)
        subject = subject.resize((max(1, round(subject.width * scale)), max(1, round(subject.height * scale))),
                                 Image.Resampling.BICUBIC)
        canvas.paste(subject, (rng.randint(0, w - subject.width), rng.randint(0, h - subject.height)))
        record["side"] = side
    if rng.random() < cfg.flip_p:
        canvas, record["flip"] = canvas.transpose(Image.Transpose.FLIP_LEFT_RIGHT), True
    if rng.random() < cfg.jitter_p:
        canvas, record["jitter"] = _jitter(canvas, rng, *cfg.jitter), True
    if rng.random() < cfg.erase_p:
        record["erase"] = _erase(canvas, rng, cfg.erase_area, cfg.erase_aspect)
    return canvas, record


def _jitter(image: Image.Image, rng: random.Random, brightness: float, contrast: float, saturation: float,
            hue: float) -> Image.Image:
    """torchvision's ColorJitter in pixel space: each factor uniform in [1 - x, 1 + x], the hue shifted by a
    uniform fraction in [-hue, hue] of the colour wheel, in random order."""
    def shift_hue(im: Image.Image) -> Image.Image:
        hsv = np.asarray(im.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + round(rng.uniform(-hue, hue) * 255)) % 256
        return Image.fromarray(hsv, "HSV").convert("RGB")

    ops = [lambda im: ImageEnhance.Brightness(im).enhance(rng.uniform(1 - brightness, 1 + brightness)),
           lambda im: ImageEnhance.Contrast(im).enhance(rng.uniform(1 - contrast, 1 + contrast)),
           lambda im: ImageEnhance.Color(im).enhance(rng.uniform(1 - saturation, 1 + saturation)), shift_hue]
    rng.shuffle(ops)
    for op in ops:
        image = op(image)
    return image


def _erase(image: Image.Image, rng: random.Random, area: tuple[float, float],
           aspect: tuple[float, float]) -> tuple[int, int, int, int] | None:
    """torchvision's RandomErasing with a white fill: a rectangle of uniform area fraction and log-uniform aspect
    ratio, up to 10 tries to fit one; paints it in place and returns it (None when none fitted)."""
    import math

    w, h = image.size
    for _ in range(10):
        target = rng.uniform(*area) * w * h
        ratio = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))
        ew, eh = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < ew < w and 0 < eh < h:
            x, y = rng.randint(0, w - ew), rng.randint(0, h - eh)
            image.paste((255, 255, 255), (x, y, x + ew, y + eh))
            return x, y, x + ew, y + eh
    return None


def decode_target(data: bytes, size: int) -> Image.Image:
    """A target image decoded for ``size`` px: a JPEG is decoded by libjpeg directly at the smallest power-of-two
    reduction still at least ``size`` (1024 -> 512 px decodes at half scale, a fraction of the work), then
    resized as any other image."""
    image = Image.open(io.BytesIO(data))
    if image.format == "JPEG":
        image.draft("RGB", (size, size))
    return image.convert("RGB")


def decode_sample(sample: dict[str, Any], cfg: DataConfig, rng: random.Random) -> dict[str, Any]:
    """Caption, target (or, with a latent cache, the target's latent distribution: ``target_mean``,
    ``target_std``) and the augmented reference: (3, R, R), or ``cfg.views`` independent augmentations of it,
    (K, 3, R, R)."""
    ref_key = next(k for k in sample if k.startswith("reference."))
    meta = json.loads(sample["json"])
    reference = on_white(Image.open(io.BytesIO(sample[ref_key])))
    views = [to_tensor(augment_reference(reference, rng, cfg), cfg.resolution) for _ in range(cfg.views)]
    out = {"key": sample["__key__"], "caption": sample["txt"].decode("utf-8"), "category": meta.get("category", ""),
           "subject": meta.get("subject", ""), "reference": views[0] if cfg.views == 1 else _stack(views)}
    if cfg.latents:
        if "target.latent" not in sample:
            raise KeyError(f"no cached latent for {sample['__key__']} in {cfg.latents}")
        out["target_mean"], out["target_std"] = sample["target.latent"]
    else:
        out["target"] = to_tensor(decode_target(sample["target.jpg"], cfg.resolution), cfg.resolution)
    return out


def _stack(tensors: list):
    import torch

    return torch.stack(tensors)


def shard_name(url: str) -> str:
    """'s3://b/ds/shards/shard-000007.tar' -> 'shard-000007' (also the name of its latent cache file)."""
    return url.rsplit("/", 1)[-1].removesuffix(".tar")


def _shard_latents(cfg: DataConfig, url: str) -> dict[str, tuple]:
    """{key: (mean, std)} of a shard from the latent cache (training/encode.py)."""
    import fsspec
    from safetensors.torch import load

    with fsspec.open(f"{cfg.latents}/{shard_name(url)}.safetensors", "rb") as f:
        data = f.read()
    tensors, keys = load(data), json.loads(safetensors_metadata(io.BytesIO(data))["keys"])
    return {k: (tensors["mean"][i], tensors["std"][i]) for i, k in enumerate(keys)}


def safetensors_metadata(f) -> dict[str, str]:
    """The metadata of an open safetensors file, reading its header only (8-byte length, then the JSON)."""
    header = int.from_bytes(f.read(8), "little")
    return json.loads(f.read(header)).get("__metadata__", {})


def make_dataset(urls: list[str], cfg: DataConfig, seed: int):
    """An endless webdataset pipeline of decoded, augmented samples (an IterableDataset)."""
    import webdataset as wds

    rng = random.Random(seed)  # per process; workers reseed in _worker_rng
    skipped = Counter()  # reason -> samples skipped and not yet reported (per worker: each has its own copy)

    def read(source: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Shard URLs -> raw samples, each shard opened through fsspec; tracks shards that give nothing."""
        import fsspec

        from webdataset.tariterators import group_by_keys, tar_file_expander

        failed: list[str] = []
        for item in source:
            url, given, error = item["url"], 0, None

            def member_error(exn: Exception) -> bool:  # a bad member: skip it, keep reading the shard
                nonlocal error
                error = exn
                skipped["read"] += 1
                log.warning("skipping a sample of %s (read): %s", url, _describe(exn))
                return True

            try:
                latents = _shard_latents(cfg, url) if cfg.latents else {}
                with fsspec.open(url, "rb") as stream:
                    for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}],
                                                                  handler=member_error), handler=member_error):
                        if sample["__key__"] in latents:
                            sample["target.latent"] = latents[sample["__key__"]]
                        given += 1
                        yield sample
            except Exception as e:  # the shard cannot be opened or read at all
                error = e
                log.warning("cannot read shard %s: %s", url, _describe(e))
            if given:
                failed = []
                continue
            failed.append(url)
            if len(failed) >= cfg.max_unreadable:
                raise UnreadableData(f"{len(failed)} shards in a row could not be read (last error: "
                                     f"{_describe(error) if error else 'no samples'}): {', '.join(failed[:5])}"
                                     + (" ..." if len(failed) > 5 else ""))

    def decode(source: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        local = _worker_rng(seed) or rng
        failed = 0
        for sample in source:
            try:
                out = decode_sample(sample, cfg, local)
            except Exception as e:  # a corrupt member: skip the sample, count it, go on
                skipped["decode"] += 1
                failed += 1
                log.warning("skipping sample %s (decode): %s", sample.get("__key__"), _describe(e))
                if failed >= cfg.max_undecodable:
                    raise UnreadableData(f"{failed} samples in a row could not be decoded (last: "
                                         f"{sample.get('__key__')} in {sample.get('__url__')}: {_describe(e)})") from e
                continue
            failed = 0
            out["skipped"] = sum(skipped.values())
            skipped.clear()
            yield out

    return wds.DataPipeline(
        wds.ResampledShards(urls, seed=seed, deterministic=True),  # seeded by rank and worker: a split per worker
        read,
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

    batch = {"key": [s["key"] for s in samples], "caption": [s["caption"] for s in samples],
             "subject": [s["subject"] for s in samples],
             "reference": torch.stack([s["reference"] for s in samples]),  # (B, 3, R, R) or (B, K, 3, R, R)
             "skipped": sum(s.get("skipped", 0) for s in samples)}  # samples skipped on the way to these
    for name in ("target", "target_mean", "target_std"):  # the image (B, 3, R, R), or its cached latent (B, 4, h, w)
        if name in samples[0]:
            batch[name] = torch.stack([s[name] for s in samples])
    return batch
