"""Stage 3: SDXL target images (guidance 3.5, 25 steps, 1024 px; paper supp. S1).

One ``torch.Generator`` per sample, seeded from the sample id, so a sample's initial noise does not depend on
which other samples share its batch (the pixels can still differ in the last bits between batch sizes, as
batched kernels round differently; the same command on the same hardware gives identical bytes). The image leaves the stage JPEG-encoded: segmentation then runs on exactly
the pixels the trainer will read, and the object store carries ~0.3 MB per sample instead of 3 MB.
"""

from __future__ import annotations

from typing import Any

from dreamcache.models import default_device, resolve
from pipeline.config import ShardConfig, TargetConfig
from pipeline.stage import DrawnTargets, ModelRef


def load_sdxl(cfg: TargetConfig, device: str):
    import torch
    from diffusers import StableDiffusionXLPipeline

    dtype = getattr(torch, cfg.dtype) if device == "cuda" else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype, "revision": cfg.revision}
    if cfg.variant and device == "cuda":
        kwargs["variant"] = cfg.variant
    path = resolve(cfg.model)
    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(path, **kwargs)
    except (OSError, ValueError):
        if "variant" not in kwargs:
            raise
        kwargs.pop("variant")  # a checkpoint without fp16 files: load the full ones and cast
        pipe = StableDiffusionXLPipeline.from_pretrained(path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)  # diffusers' attention processors use SDPA by default
    if cfg.compile and device == "cuda":
        compile_sdxl(pipe)
    return pipe


def compile_sdxl(pipe) -> None:
    """``torch.compile`` for the U-Net and the VAE decoder, with fused q/k/v projections and channels-last
    convolutions; one static graph per batch shape. On an H100 at batch 8: 1.255 images/s against 1.012 eager,
    for about 2 minutes of compiling when each actor starts (BENCHMARKS.md)."""
    import torch

    torch._dynamo.config.automatic_dynamic_shapes = False  # a new batch size compiles its own static graph
    torch._inductor.config.conv_1x1_as_mm = True
    pipe.fuse_qkv_projections()
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    pipe.unet = torch.compile(pipe.unet)
    pipe.vae.decode = torch.compile(pipe.vae.decode)


class TargetStage(DrawnTargets):
    """caption + seed -> ``target`` (JPEG bytes), by SDXL."""

    title = "SDXL"

    @classmethod
    def models(cls, cfg: TargetConfig) -> list[ModelRef]:
        return [ModelRef("targets", cfg.model, cfg.revision, "SDXL", "--set targets.model")]

    def __init__(self, cfg: TargetConfig, shards: ShardConfig = ShardConfig(), pipe=None):
        """``pipe``: an SDXL pipeline already built and placed (the benchmarks' random full-size one); default:
        load ``cfg.model``."""
        super().__init__(cfg, shards, pipe if pipe is not None else load_sdxl(cfg, default_device()))
