"""The frozen models a training run loads: the base's DreamCache pipeline and the scheduler it trains with."""

from __future__ import annotations

import torch

from dreamcache.bases import base_spec
from training.config import TrainConfig


def load_models(cfg: TrainConfig, device: torch.device):
    """(pipeline, training noise scheduler): the base's DreamCache pipeline with every module frozen (bf16 on
    GPU), whose U-Net, VAE and prompt encoding the loss uses and whose DDIM sampler renders the validation
    grids; and the checkpoint's scheduler as DDPM, for noising (epsilon or v_prediction)."""
    from diffusers import DDPMScheduler

    from dreamcache.generation import load_pipeline

    dtype = torch.bfloat16 if device.type == "cuda" and cfg.bf16 else torch.float32
    pipe = load_pipeline(cfg.base, device=str(device), dtype=dtype)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    scheduler = DDPMScheduler.from_pretrained(base_spec(cfg.base).path(), subfolder="scheduler")
    return pipe, scheduler
