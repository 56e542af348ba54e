"""The small world's target stage: its trained base model draws the targets, as SDXL does for the real world.

``targets.model=world:FOLDER`` selects it (world/pipeline.yaml): FOLDER is the small world's base, a Stable
Diffusion 1.x pipeline (world/base.py). A caption names its subject by class only ("a circle on the left, on a
white background"); the stage gives each sample an identity of that class drawn from its seed among the
training subjects (never a held-out one) and asks the base for it by name ("a red striped circle on the left,
..."). The caption written with the sample stays the class-only one, so what the adapters learn from a
triplet is that the identity is in the reference, as the real data's specific subjects are in theirs.

The base can draw another identity than the one asked for. A target the judge (world/judge.py) reads as a
held-out subject is dropped (``targets:held_out_subject``), so no held-out subject reaches the training data.
"""

from __future__ import annotations

import random
import threading
from typing import Any

from pipeline.config import TargetConfig
from pipeline.stage import Drop, ModelRef, Stage, encode_jpeg
from world.judge import read
from world.scene import held_out_subjects, training_subjects

PREFIX = "world:"


def is_world(ref: str | None) -> bool:
    return bool(ref) and str(ref).startswith(PREFIX)


def folder(ref: str) -> str:
    return ref[len(PREFIX):]


def identity_prompt(caption: str, shape: str, seed: int) -> str:
    """The caption with the subject's identity, drawn from ``seed`` among the training subjects of ``shape``,
    before its class noun."""
    choices = [s for s in training_subjects() if s.shape == shape]
    if not choices:
        raise ValueError(f"{shape!r} is not a shape of the small world")
    subject = random.Random(seed).choice(choices)
    head, sep, tail = caption.partition(f" {shape}")
    if not sep:
        raise ValueError(f"caption {caption!r} does not name its subject {shape!r}")
    return f"{head} {subject.identity} {shape}{tail}"


class WorldTargets(Stage):
    """caption + seed -> ``target``: the small world's base model on the caption with a drawn identity. Stands
    in for ``TargetStage`` (its section, pool, funnel step and column)."""

    name = "targets"
    columns = {"target": b""}
    pool, title, funnel = "target", "small-world base", "SDXL targets"

    @classmethod
    def models(cls, cfg: TargetConfig) -> list[ModelRef]:
        return [ModelRef("targets", folder(cfg.model), None, "the small world's base", "--set targets.model=world:")]

    @classmethod
    def implementation(cls, cfg: TargetConfig) -> type:
        return cls

    def __init__(self, cfg: TargetConfig, jpeg_quality: int = 95, pipe=None):
        import torch
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        self.cfg, self.quality = cfg, jpeg_quality
        if pipe is None:
            pipe = StableDiffusionPipeline.from_pretrained(folder(cfg.model), dtype=torch.float32)
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # the toolkit's sampler (DDPM's is 1000 steps)
            pipe.set_progress_bar_config(disable=True)
        self.pipe, self.device = pipe, pipe.device.type
        self.device_lock = threading.Lock()

    def process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any] | Drop]:
        import torch

        out: list[dict[str, Any] | Drop] = []
        for start in range(0, len(rows), self.cfg.batch_size):
            chunk = rows[start:start + self.cfg.batch_size]
            prompts = [identity_prompt(str(r["caption"]), str(r["category"]), int(r["seed"])) for r in chunk]
            generators = [torch.Generator(self.device).manual_seed(int(r["seed"])) for r in chunk]
            with self.device_lock:
                images = self.pipe(prompt=prompts, guidance_scale=self.cfg.guidance_scale,
                                   num_inference_steps=self.cfg.steps, height=self.cfg.resolution,
                                   width=self.cfg.resolution, generator=generators).images
            held = {(s.shape, s.colour, s.pattern) for s in held_out_subjects()}
            for im in images:
                r = read(im)
                out.append(Drop("held_out_subject", f"the base drew {r.colour} {r.pattern} {r.shape}")
                           if (r.shape, r.colour, r.pattern) in held else {"target": encode_jpeg(im, self.quality)})
        return out
