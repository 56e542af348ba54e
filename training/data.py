"""Training data: a seeded global order over every committed sample, read by position, decoded and augmented.

What a training step sees is a function of the seed, the step and the rank's share of the global batch only.
The order is a seeded permutation of every committed sample per epoch (``SampleIndex``: the manifests), so
global position ``p`` is sample ``order(p // N)[p % N]``; step ``s`` takes positions ``[s*G, (s+1)*G)`` of
the order (``G``: the global batch), and rank ``r`` of ``W`` its contiguous ``G/W`` of them
(``StepBatches``). The DataLoader is handed those exact positions as micro-batches and returns them in order,
so the loader's workers and the micro-batch only change who decodes what, never what a step sees.

``TrainingSet[p]`` reads the sample by byte range (``training/shards.py``), decodes it and augments its
reference with a generator seeded by (seed, position, key). A sample that cannot be read or decoded is
skipped: position ``p`` then takes a replacement drawn from (seed, p, attempt), so the micro-batch keeps its
size and every run draws the same replacement, and the sample carries ``skipped``, the failures before it,
which the trainer adds up over micro-batches and ranks. ``max_unreadable`` failed draws in a row for one
position (random samples of the whole dataset) mean a dataset that cannot be read: the loader stops with an
error naming the shards.

Reference augmentation: the official code's, see ``DataConfig``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
from dataclasses import dataclass
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance

from dreamcache.images import on_white, to_tensor
from dreamcache.seeds import derive_seed
from training.shards import SampleIndex, ShardReader, StoreUnavailable, shard_name

log = logging.getLogger(__name__)


class UnreadableData(RuntimeError):
    """Too many samples in a row could not be read."""


@dataclass(frozen=True)
class DataConfig:
    """Reference augmentation as in the official code (its GenDataset): the subject cropped tight, resized so its
    longer side is ``min_side``-1 of the canvas, pasted at a uniform position on white; flip; colour jitter with
    probability ``jitter_p``; random erasing to white with probability ``erase_p``."""

    resolution: int = 512  # target and reference side (paper: 512)
    min_side: float = 0.7  # the subject's longer side: uniform in [min_side, 1] x the canvas side
    flip_p: float = 0.5
    jitter_p: float = 0.1
    jitter: tuple[float, float, float, float] = (0.2, 0.2, 0.2, 0.05)  # brightness, contrast, saturation, hue
    erase_p: float = 0.4
    erase_area: tuple[float, float] = (0.02, 0.25)  # fraction of the image
    erase_aspect: tuple[float, float] = (0.3, 3.3)
    max_unreadable: int = 50  # failed draws in a row for one position before the loader stops with an error
    latents: str | None = None  # a target latent cache folder (training/encode.py): targets are not decoded
    views: int = 1  # augmented views of each sample's reference (K > 1: "reference" is (K, 3, R, R))
    # > 0: the latent cache holds this many pre-drawn augmentations of each reference (python -m training.encode
    # --reference-views): each view is one of them, drawn here ("reference_latent", (4, h, w) or (K, 4, h, w)),
    # and the reference image is neither read nor augmented
    reference_views: int = 0

    def __post_init__(self):
        if not 0 < self.min_side <= 1:
            raise ValueError("min_side must be in (0, 1]")
        if self.views < 1:
            raise ValueError("views must be >= 1")
        if self.max_unreadable < 1:
            raise ValueError("max_unreadable must be >= 1")


def shard_urls(data: str) -> list[str]:
    """URLs of the committed shards of a dataset folder or fsspec URL."""
    return list(SampleIndex.from_store(data).urls)


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
    meta = json.loads(sample["json"])
    out = {"key": sample["__key__"], "caption": sample["txt"].decode("utf-8"), "category": meta.get("category", ""),
           "subject": meta.get("subject", "")}
    if cfg.reference_views:  # pre-drawn and encoded: pick among them
        if "reference.latent" not in sample:
            raise KeyError(f"no cached reference views for {sample['__key__']} in {cfg.latents}")
        # distinct views, as fresh augmentations would be (with replacement only beyond the K cached)
        picks = rng.sample(range(cfg.reference_views), cfg.views) if cfg.views <= cfg.reference_views \
            else [rng.randrange(cfg.reference_views) for _ in range(cfg.views)]
        cached = sample["reference.latent"]
        out["reference_latent"] = cached[picks[0]] if cfg.views == 1 else cached[picks]
    else:
        ref_key = next(k for k in sample if k.startswith("reference."))
        reference = on_white(Image.open(io.BytesIO(sample[ref_key])))
        views = [to_tensor(augment_reference(reference, rng, cfg), cfg.resolution) for _ in range(cfg.views)]
        out["reference"] = views[0] if cfg.views == 1 else torch.stack(views)
    if cfg.latents:
        if "target.latent" not in sample:
            raise KeyError(f"no cached latent for {sample['__key__']} in {cfg.latents}")
        out["target_mean"], out["target_std"] = sample["target.latent"]
    else:
        out["target"] = to_tensor(decode_target(sample["target.jpg"], cfg.resolution), cfg.resolution)
    return out


def safetensors_metadata(f) -> dict[str, str]:
    """The metadata of an open safetensors file, reading its header only (8-byte length, then the JSON)."""
    header = int.from_bytes(f.read(8), "little")
    return json.loads(f.read(header)).get("__metadata__", {})


class TrainingSet(torch.utils.data.Dataset):
    """Map-style: item ``p`` is the sample at global position ``p`` of the seeded order, read, decoded and
    augmented (a replacement drawn from (seed, p, attempt) where it cannot be). A micro-batch's samples are
    read together (``__getitems__``: one round of concurrent range reads on an object store)."""

    def __init__(self, index: SampleIndex, cfg: DataConfig, seed: int):
        self.index, self.cfg, self.seed = index, cfg, seed
        self._reader: ShardReader | None = None  # made in the process that reads: a loader worker
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:  # positions are unbounded (epoch after epoch); this is one epoch
        return len(self.index)

    def sample_at(self, position: int) -> int:
        """The sample at a global position: epoch ``position // N``'s seeded permutation, at ``position % N``."""
        epoch, offset = divmod(position, len(self.index))
        if epoch not in self._orders:
            rng = np.random.Generator(np.random.PCG64(derive_seed(self.seed, "order", epoch)))
            self._orders = {epoch: rng.permutation(len(self.index))}  # one epoch at a time: N x 8 bytes
        return int(self._orders[epoch][offset])

    def _wanted(self, i: int) -> tuple[str, ...]:
        """The members decoding needs (no target image with a latent cache, no reference image with cached
        reference views; never the mask)."""
        layout = self.index.layouts[self.index.layout[i]]
        return tuple(s for s in layout if s in ("txt", "json") or (s.startswith("reference.")
                                                                  and not self.cfg.reference_views)
                     or (s == "target.jpg" and not self.cfg.latents))

    def __getitem__(self, position: int) -> dict[str, Any]:
        return self.__getitems__([position])[0]

    def __getitems__(self, positions: list[int]) -> list[dict[str, Any]]:
        if self._reader is None:
            self._reader = ShardReader(self.index, self.cfg.latents, references=self.cfg.reference_views > 0)
        chosen = [self.sample_at(p) for p in positions]
        raws = self._reader.read([(i, self._wanted(i)) for i in chosen])
        return [self._resolve(p, i, raw) for p, i, raw in zip(positions, chosen, raws)]

    def _resolve(self, position: int, i: int, raw: dict[str, Any] | Exception) -> dict[str, Any]:
        """The decoded sample for ``position``, starting from sample ``i``: on failure the next draw, in order."""
        failures: list[tuple[int, BaseException]] = []
        while True:
            try:
                if isinstance(raw, Exception):
                    raise raw
                key = raw["__key__"]
                out = decode_sample(raw, self.cfg, random.Random(derive_seed(self.seed, "augment", position, key)))
                return {**out, "position": position, "skipped": len(failures)}
            except Exception as e:  # noqa: BLE001 - a corrupt sample: skip it, count it, draw another
                failures.append((i, e))
                log.warning("skipping sample %s of %s (%s)", self.index.keys[i],
                            shard_name(self.index.urls[self.index.shard[i]]), _describe(e))
            if len(failures) >= self.cfg.max_unreadable:
                shards = sorted({shard_name(self.index.urls[self.index.shard[j]]) for j, _ in failures})
                raise UnreadableData(
                    f"{len(failures)} samples in a row could not be read, drawn from {len(shards)} shards "
                    f"({', '.join(shards[:5])}{' ...' if len(shards) > 5 else ''}; last error: "
                    f"{_describe(failures[-1][1])})")
            i = derive_seed(self.seed, "replace", position, len(failures)) % len(self.index)
            raw = self._reader.read([(i, self._wanted(i))])[0]


@dataclass(frozen=True)
class StepBatches:
    """The DataLoader's batch sampler: for each step from ``start`` (the global position of the first step's
    batch), this rank's contiguous share of the global batch, in micro-batches of ``micro_batch`` positions."""

    start: int  # global position of the first step's first sample (step x global batch in a run that never changed it)
    steps: int
    global_batch: int
    world: int
    rank: int
    micro_batch: int

    def __post_init__(self):
        if self.global_batch % (self.world * self.micro_batch):
            raise ValueError(f"global batch {self.global_batch} is not a multiple of {self.world} ranks x micro "
                             f"batch {self.micro_batch}")

    def __iter__(self) -> Iterator[list[int]]:
        share = self.global_batch // self.world
        for step in range(self.steps):
            first = self.start + step * self.global_batch + self.rank * share
            for m in range(0, share, self.micro_batch):
                yield list(range(first + m, first + m + self.micro_batch))

    def __len__(self) -> int:
        return self.steps * self.global_batch // (self.world * self.micro_batch)


def loader(index: SampleIndex, cfg: DataConfig, seed: int, batches: StepBatches, num_workers: int):
    """The DataLoader of a rank: ``batches``' micro-batches, in order, decoded by ``num_workers`` processes."""
    return torch.utils.data.DataLoader(TrainingSet(index, cfg, seed), batch_sampler=batches, num_workers=num_workers,
                                       collate_fn=collate, generator=torch.Generator().manual_seed(seed),
                                       pin_memory=torch.cuda.is_available())  # copied to the GPU asynchronously


class Stream:
    """A rank's micro-batches from the run's position on, and what a checkpoint records of them. The loader is
    built once and never reseeded: what a step reads depends only on its global position (``StepBatches``), so a
    resume, on any number of ranks and loader workers, reads what the uninterrupted run would have."""

    def __init__(self, index: SampleIndex, cfg: DataConfig, seed: int, batches: StepBatches, num_workers: int,
                 digest: int = 0):
        self.digest = digest  # keys_digest of every sample this rank has read, over the run's life
        self.skipped = 0  # corrupt samples this rank replaced in this process
        self._batches = iter(loader(index, cfg, seed, batches, num_workers))

    def next(self) -> dict[str, Any]:
        """The next micro-batch; DataFailure when the data cannot be read (the run cannot go on)."""
        try:
            batch = next(self._batches)
        except (UnreadableData, StoreUnavailable) as e:  # from a loader worker: its traceback is in the message
            raise DataFailure(_original_message(e)) from None
        self.skipped += batch["skipped"]
        self.digest = (self.digest + keys_digest(batch["position"], batch["key"])) % (1 << DIGEST_BITS)
        return batch


class DataFailure(RuntimeError):
    """The training data cannot be read (a store that does not answer, shards that are not what the manifests
    say): the run stops."""


def _original_message(e: Exception) -> str:
    """A DataLoader re-raises a worker's exception with the worker's traceback as its message: its last line."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    last = lines[-1] if lines else type(e).__name__
    names = ("training.data.UnreadableData", "UnreadableData", "training.shards.StoreUnavailable", "StoreUnavailable")
    return last.split(": ", 1)[1] if last.startswith(names) else last


def loader_workers(configured: int | None) -> int:
    """DataLoader workers per rank: as configured, or the cores this process may use divided among the node's
    ranks (torchrun's LOCAL_WORLD_SIZE), less one for the rank itself, at most 16."""
    if configured is not None:
        return configured
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_rank = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(0, min(per_rank - 1, 16))


DIGEST_BITS = 48


def keys_digest(positions: list[int], keys: list[str]) -> int:
    """A sum of per-sample hashes of (position, key), modulo 2^48: added up over micro-batches, ranks and resumes
    in any grouping, it is equal for two runs exactly when (but for a 2^-48 chance) every step saw the same keys."""
    return sum(derive_seed("data", p, k, bits=DIGEST_BITS) for p, k in zip(positions, keys)) % (1 << DIGEST_BITS)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    batch = {"key": [s["key"] for s in samples], "caption": [s["caption"] for s in samples],
             "subject": [s["subject"] for s in samples], "position": [s.get("position", -1) for s in samples],
             "skipped": sum(s.get("skipped", 0) for s in samples)}  # samples skipped on the way to these
    # The reference (B, 3, R, R) or (B, K, 3, R, R), or its cached views' latents (B, 4, h, w) or (B, K, 4, h, w);
    # the target image (B, 3, R, R), or its cached latent distribution (B, 4, h, w)
    for name in ("reference", "reference_latent", "target", "target_mean", "target_std"):
        if name in samples[0]:
            batch[name] = torch.stack([s[name] for s in samples])
    return batch
