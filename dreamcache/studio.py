"""Personalising and generating from Python, with the models loaded once: what ``dreamcache personalize`` and
``dreamcache generate`` run, and the web app (``dreamcache app``) over them.

    studio = Studio(load_pipeline("sd15", "adapters.safetensors"), make_segmenter(grounding_config()))
    subject = studio.personalize([Image.open("dog.jpg")], "dog")      # segmented and cached once
    results = studio.generate(subject, ["a dog in the snow", "a dog on the beach"], Sampling(n=4), base_too=True)
    results[0].images, results[0].base                                # personalised, and the base model's

A ``Studio`` serves one call at a time (a lock: one cached call per U-Net), and keeps the last few caches it made,
keyed by the references' pixels, subject, segmentation and seed, so asking again for the same subject reuses
its cache instead of running the segmenter and the caching pass again.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from dreamcache.attention import AttentionMaps
from dreamcache.commands import Compiled, Sampling
from dreamcache.generation import ReferenceCache, image_sha256, noun_phrase
from dreamcache.images import on_white
from dreamcache.segmenter import SubjectNotFound


def slug(text: str, limit: int = 48) -> str:
    """A file-name part from a prompt: lower-case words joined by dashes."""
    words = "".join(c if c.isalnum() else " " for c in text.lower()).split()
    return "-".join(words)[:limit].rstrip("-") or "prompt"


def open_pipeline(cfg, adapters: str):
    """The pipeline a command runs on (``cfg``: its ``CommandConfig``): the ``adapters`` on ``--base``, else on
    the base they were trained on, which is checked first (one clear error naming --base); its U-Net compiled
    for sampling with ``--compile``."""
    from dreamcache.bases import check_base
    from dreamcache.generation import adapter_metadata, load_pipeline

    base = cfg.base or adapter_metadata(adapters)["base"]
    check_base(base)
    pipe = load_pipeline(base, adapters, device=cfg.device, allow_other_base=cfg.allow_other_base)
    if isinstance(cfg, Compiled):
        cfg.compile_pipeline(pipe)
    return pipe


def cache_subject(pipe, segmenter, images: Sequence[Image.Image], subject: str | None, seed: int = 0,
                  caption: str | None = None, names: Sequence[str] | None = None
                  ) -> tuple[ReferenceCache, list[Image.Image], list[float | None]]:
    """(the cache, the cut-outs it holds, each mask's share of its image): every reference cut out by
    ``segmenter`` (None: they are the subject on white already), then cached in one cache. A reference where the
    segmenter finds no subject raises ``SubjectNotFound`` naming it."""
    cutouts, coverage = [on_white(im) for im in images], [None] * len(images)
    if segmenter is not None:
        for i, image in enumerate(cutouts):
            try:
                cutouts[i], mask = segmenter.cutout(image, subject, pipe.resolution)
            except SubjectNotFound as e:
                which = names[i] if names else f"reference {i + 1}"
                raise SubjectNotFound(f"{which}: {e}") from None
            coverage[i] = float(mask.mean())
    cache = pipe.cache_reference(cutouts, seed=seed, subject=noun_phrase(subject) if subject else None,
                                 caption=caption, names=list(names) if names else None)
    return cache, cutouts, coverage


def sample(pipe, prompt: str, cache: ReferenceCache | None, settings: Sampling, attention: AttentionMaps | None = None,
           on_step: Callable[[], None] | None = None) -> list[Image.Image]:
    """``settings.n`` images of ``prompt``, image k from seed ``settings.seed + k``; ``cache=None`` gives the
    base model's images for the same seeds (its classifier-free guidance at the text scale). ``on_step`` is
    called after every sampling step."""
    generators = [torch.Generator().manual_seed(settings.seed + k) for k in range(settings.n)]
    extra = {}
    if on_step is not None:
        def step_end(pipe, step, timestep, callback_kwargs):
            on_step()
            return callback_kwargs
        extra["callback_on_step_end"] = step_end
    return pipe(prompt, cache=cache, guidance=settings.guidance, guidance_scale=settings.text_scale,
                image_guidance_scale=settings.image_scale, num_inference_steps=settings.steps,
                num_images_per_prompt=settings.n, generator=generators, attention=attention, **extra).images


@dataclass
class Subject:
    """A personalised subject: its cache, the cut-outs cached, and each mask's share of its image."""

    key: str  # identifies the references, subject phrase, segmentation and seed
    name: str | None
    cache: ReferenceCache
    cutouts: list[Image.Image]
    coverage: list[float | None]


@dataclass
class Result:
    """One prompt's images: personalised, the base model's for the same seeds, and attention maps."""

    prompt: str
    seeds: list[int]
    images: list[Image.Image]
    base: list[Image.Image] = field(default_factory=list)
    attention: list[tuple[str, Image.Image]] = field(default_factory=list)  # (caption, reference maps + image)


class Studio:
    """A loaded pipeline (with adapters) and segmenter (None: references are used as they are), serving one call
    at a time. ``keep``: how many caches to keep for reuse."""

    def __init__(self, pipe, segmenter=None, keep: int = 8):
        self.pipe, self.segmenter, self.keep = pipe, segmenter, keep
        self.lock = threading.Lock()
        self.subjects: OrderedDict[str, Subject] = OrderedDict()
        self.cached = 0  # caching passes run (the rest were reused)

    def personalize(self, images: Sequence[Image.Image], subject: str | None, segment: bool = True, seed: int = 0,
                    names: Sequence[str] | None = None) -> Subject:
        """The subject's cache: made from ``images`` (cut out first when ``segment``), or the one made before for
        the same pixels, subject, segmentation and seed."""
        if not images:
            raise ValueError("add at least one reference image of the subject")
        subject = (subject or "").strip() or None
        segmenter = self.segmenter if segment else None
        if segmenter is not None and not subject and segmenter.reads_subject:
            raise ValueError("name the subject (e.g. dog) so the segmenter can find it, or use the references as "
                             "they are (no segmentation)")
        images = [on_white(im) for im in images]
        key = hashlib.sha256(json.dumps([[image_sha256(im) for im in images], subject, segmenter is not None,
                                         seed]).encode()).hexdigest()[:16]
        with self.lock:
            if key in self.subjects:
                self.subjects.move_to_end(key)
                return self.subjects[key]
            cache, cutouts, coverage = cache_subject(self.pipe, segmenter, images, subject, seed, names=names)
            self.cached += 1
            self.subjects[key] = Subject(key, subject, cache, cutouts, coverage)
            while len(self.subjects) > self.keep:
                self.subjects.popitem(last=False)
            return self.subjects[key]

    def generate(self, subject: Subject, prompts: Sequence[str], settings: Sampling, base_too: bool = False,
                 attention: bool = False, progress: Callable[[float, str], None] | None = None) -> list[Result]:
        """Every prompt's images with ``subject``'s cache; with ``base_too`` the base model's images for the same
        seeds; with ``attention`` where each image looks in the references (one sheet per adapter layer and
        image). ``progress(fraction, what)`` is called after every sampling step."""
        prompts = [p.strip() for p in prompts if p.strip()]
        if not prompts:
            raise ValueError("write a prompt (one per line)")
        steps = len(prompts) * settings.steps * (2 if base_too else 1)
        done = 0

        def tick(what: str) -> Callable[[], None]:
            def step() -> None:
                nonlocal done
                done += 1
                if progress is not None:
                    progress(done / steps, what)
            return step

        results = []
        with self.lock:
            for i, prompt in enumerate(prompts):
                what = f"prompt {i + 1}/{len(prompts)}: {prompt}"
                maps = AttentionMaps() if attention else None
                images = sample(self.pipe, prompt, subject.cache, settings, maps, tick(what))
                base = sample(self.pipe, prompt, None, settings, None, tick(what + " (base model)")) if base_too else []
                sheets = []
                if maps is not None:
                    for layer, by_image in maps.sheets(images, subject.cutouts).items():
                        sheets += [(f"{layer} · image {k + 1} · {prompt}", sheet) for k, sheet in enumerate(by_image)]
                results.append(Result(prompt, [settings.seed + k for k in range(settings.n)], images, base, sheets))
        return results


def archive(results: Sequence[Result]) -> bytes:
    """A zip of ``results``: images/ (NNN-SLUG-K.png with metadata.jsonl: file_name, prompt, seed, the
    ``datasets`` imagefolder layout), base/ the same for the base model's, attention/ the maps."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:  # PNGs are compressed already
        rows: dict[str, list[dict]] = {"images": [], "base": []}
        for i, r in enumerate(results):
            stem = f"{i:03d}-{slug(r.prompt)}"
            for folder, images in (("images", r.images), ("base", r.base)):
                for k, (image, seed) in enumerate(zip(images, r.seeds)):
                    name = f"{stem}-{k}.png"
                    z.writestr(f"{folder}/{name}", png(image))
                    rows[folder].append({"file_name": name, "prompt": r.prompt, "seed": seed})
            for j, (_, sheet) in enumerate(r.attention):
                z.writestr(f"attention/{stem}-{j:02d}.png", png(sheet))
        for folder, lines in rows.items():
            if lines:
                z.writestr(f"{folder}/metadata.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    return buf.getvalue()


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_cache(subject: Subject, folder: str | Path) -> Path:
    """The subject's cache as FOLDER/SLUG-KEY.cache.safetensors (what ``dreamcache generate --cache`` reads)."""
    path = Path(folder) / f"{slug(subject.name or 'subject')}-{subject.key}.cache.safetensors"
    if not path.exists():
        subject.cache.save(path)
    return path
