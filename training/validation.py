"""Validation images during training: fixed references and prompts, sampled with the current adapters.

The references are the first ``n`` samples (in key order) of the first committed shard, so every checkpoint
of a run, and every run on the same data, renders the same inputs with the same seeds. Each row of the grid:
the reference as cached | its own caption | the subject re-contextualised ("<subject phrase> in the snow").
"""

from __future__ import annotations

import io
import json
import logging
import tarfile

import torch
from PIL import Image

from training.checkpoints import recipe_metadata

CONTEXT = "{} in the snow"  # the subject phrase: "a red cup in the snow"
log = logging.getLogger(__name__)


def validation_set(urls: list[str], n: int) -> list[dict]:
    """[{key, caption, subject, reference}] for the first ``n`` complete samples, in shard then key order.
    A shard that cannot be read is passed over (the loader skips and counts it the same way)."""
    import fsspec

    from manifests.schema import tar_members

    items: list[dict] = []
    for url in urls:
        try:
            with fsspec.open(url, "rb") as f:
                members = tar_members(f.read())
        except (OSError, EOFError, tarfile.TarError) as e:
            log.warning("validation set: cannot read %s (%s); trying the next shard", url, e)
            continue
        for key in sorted(members):
            m = members[key]
            ref = next((v for k, v in m.items() if k.startswith("reference.")), None)
            if ref is None or "txt" not in m or "json" not in m:
                continue
            items.append({"key": key, "caption": m["txt"].decode(), "subject": json.loads(m["json"]).get("subject", "object"),
                          "reference": Image.open(io.BytesIO(ref)).convert("RGB")})
            if len(items) == n:
                return items
    return items


def sampling_pipeline(pipe, label: str, recipe: dict[str, str]):
    """The trainer's pipeline (its own modules, a DDIM sampler: ``models.load_models``) set to sample with the
    adapters being trained; ``recipe`` is the caching metadata the adapter file will carry
    (``checkpoints.recipe_metadata``)."""
    pipe.set_progress_bar_config(disable=True)
    pipe.use_installed_adapters(label, recipe)
    return pipe


@torch.no_grad()
def render(pipe, items: list[dict], steps: int, seed: int, autocast: bool = False) -> Image.Image:
    """The validation grid: one row per reference (reference | own caption | new context)."""
    from dreamcache.generation import noun_phrase

    size = pipe.resolution
    grid = Image.new("RGB", (3 * size, len(items) * size), "white")
    with torch.autocast(pipe.device.type, torch.bfloat16, enabled=autocast):
        for row, item in enumerate(items):
            if "cache" not in item:  # the frozen U-Net makes the features, not the adapters: cache them once
                item["cache"] = pipe.cache_reference(item["reference"], seed=seed, subject=item["subject"],
                                                     caption=item["caption"])
            cache = item["cache"]
            prompts = [item["caption"], CONTEXT.format(noun_phrase(item["subject"]))]
            gens = [torch.Generator().manual_seed(seed + row) for _ in prompts]
            images = pipe(prompts, cache=cache, num_inference_steps=steps, generator=gens).images
            for col, image in enumerate([item["reference"].resize((size, size)), *images]):
                grid.paste(image.convert("RGB"), (col * size, row * size))
    return grid


def save(grid: Image.Image, out, step: int, writer=None) -> str:
    """Writes the grid to ``out`` (the run's ``Store``: a folder or an object store) as validation/step-N.jpg."""
    import numpy as np

    from dreamcache.images import save_image

    path = out.url("validation", f"step-{step:08d}.jpg")
    save_image(grid, path, quality=92)
    if writer is not None:
        writer.add_image("val/samples", np.asarray(grid), step, dataformats="HWC")
    return path


class Validation:
    """What rank 0 looks at in every checkpoint: whether the adapters use the reference (the loss of the step's
    last micro-batch with each sample's own reference against another's: ``Step.reference_gap``) and the
    validation grid."""

    def __init__(self, cfg, pipe, urls: list[str], out, trainer, device: torch.device):
        self.cfg, self.out, self.trainer = cfg, out, trainer
        self.autocast = device.type == "cuda" and cfg.bf16
        self.items = validation_set(urls, cfg.val_samples) if cfg.val_samples else []
        if cfg.val_samples and not self.items:
            print("validation: no readable sample in the shards; no validation images this run", flush=True)
        self.sampler = None
        if cfg.val_samples:
            self.sampler = sampling_pipeline(pipe, label=out.url(), recipe=recipe_metadata(cfg))

    def __call__(self, step: int, unet, batch: dict, metrics) -> None:
        if len(batch["key"]) > 1:  # does the model use the reference? own vs another sample's
            own, other = self.trainer.reference_gap(unet, batch, step)
            print(f"step {step} reference check: loss {own:.4f} with its own reference, {other:.4f} with another's",
                  flush=True)
            metrics.scalar("val/reference_gap", other - own, step)
        if self.items:
            grid = render(self.sampler, self.items, self.cfg.val_steps, self.cfg.seed, autocast=self.autocast)
            print(f"step {step} validation images: {save(grid, self.out, step, metrics.writer)}", flush=True)
