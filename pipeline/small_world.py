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
from typing import Any

from pipeline.config import ShardConfig, TargetConfig
from pipeline.stage import Drop, DrawnTargets, ModelRef
from world.judge import read
from world.scene import held_out_subjects, training_subjects

PREFIX = "world:"


def is_world(ref: str | None) -> bool:
    return bool(ref) and str(ref).startswith(PREFIX)


def folder(ref: str) -> str:
    return ref[len(PREFIX):]


def model_digest(ref: str) -> str:
    """The sha256 of what the base's pipeline loads (model_index.json and the folders it names): what the
    dataset's fingerprint holds, so that a base trained again into the same folder is another configuration."""
    import hashlib
    import json
    from pathlib import Path

    root = Path(folder(ref))
    index = root / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"targets.model={ref}: {root} holds no model_index.json; train the small world's base "
                                f"with `python -m world.base {root}`, or give the folder of one")
    parts = sorted(k for k in json.loads(index.read_text()) if not k.startswith("_") and (root / k).is_dir())
    h = hashlib.sha256()
    for path in [index, *sorted(p for part in parts for p in (root / part).rglob("*") if p.is_file())]:
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


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


class WorldTargets(DrawnTargets):
    """caption + seed -> ``target``: the small world's base model on the caption with a drawn identity. Stands
    in for ``TargetStage`` (its section, pool, funnel step and column)."""

    title = "small-world base"

    @classmethod
    def models(cls, cfg: TargetConfig) -> list[ModelRef]:
        return [ModelRef("targets", folder(cfg.model), None, "the small world's base", "--set targets.model=world:")]

    @classmethod
    def stands_in(cls, cfg: TargetConfig) -> bool:
        return is_world(cfg.model)

    def __init__(self, cfg: TargetConfig, shards: ShardConfig = ShardConfig(), pipe=None):
        import torch
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        if pipe is None:
            pipe = StableDiffusionPipeline.from_pretrained(folder(cfg.model), dtype=torch.float32)
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # the toolkit's sampler (DDPM's is 1000 steps)
            pipe.set_progress_bar_config(disable=True)
        super().__init__(cfg, shards, pipe)
        self.held = {(s.shape, s.colour, s.pattern) for s in held_out_subjects()}

    def prompt(self, row: dict[str, Any]) -> str:
        return identity_prompt(str(row["caption"]), str(row["category"]), int(row["seed"]))

    def keep(self, image) -> dict[str, Any] | Drop:
        r = read(image)
        if (r.shape, r.colour, r.pattern) in self.held:
            return Drop("held_out_subject", f"the base drew {r.colour} {r.pattern} {r.shape}")
        return super().keep(image)
