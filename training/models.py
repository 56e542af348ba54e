"""The frozen models a training run loads: the base's DreamCache pipeline and the scheduler it trains with."""

from __future__ import annotations

import torch

from dreamcache.bases import base_spec
from training.config import TrainConfig


def load_models(cfg: TrainConfig, device: torch.device):
    """(pipeline, training noise scheduler): the base's DreamCache pipeline with every module frozen (bf16 on
    GPU), whose U-Net, VAE and prompt encoding the loss uses and whose DDIM sampler renders the validation
    grids; and the checkpoint's scheduler as DDPM, for noising (epsilon or v_prediction). ``cfg.channels_last``:
    the U-Net and VAE in channels-last memory."""
    from diffusers import DDPMScheduler

    from dreamcache.generation import load_pipeline

    dtype = torch.bfloat16 if device.type == "cuda" and cfg.bf16 else torch.float32
    pipe = load_pipeline(cfg.base, device=str(device), dtype=dtype)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    if cfg.channels_last:
        for module in (pipe.unet, pipe.vae):
            module.to(memory_format=torch.channels_last)
    scheduler = DDPMScheduler.from_pretrained(base_spec(cfg.base).path(), subfolder="scheduler")
    return pipe, scheduler


def compile_training(model, backend: str):
    """``model`` (the adapted U-Net, or its DDP) compiled for the training pass at fixed shapes: a new shape
    compiles a new graph rather than a dynamic one. The caching pass stays eager: it ends at the last adapter
    layer's input (an exception, which a graph cannot hold)."""
    return torch.compile(model, backend=backend, dynamic=False)


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
