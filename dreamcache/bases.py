"""Base models: which checkpoint a name means, its U-Net architecture, its image size."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parent / "configs"  # the released U-Nets' architecture configs
# SD 2.1-base (512 px, epsilon prediction): the model of the paper's SD 2.1 results and the official config.
BASES = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd21": "stabilityai/stable-diffusion-2-1-base"}


def build_unet(base: str, random_init: bool, device: str = "cpu"):
    """The base model's U-Net: from its architecture config with random weights (on the meta device: shapes
    only, nothing computed), or from the checkpoint."""
    from diffusers import UNet2DConditionModel

    if random_init:
        config = json.loads((CONFIGS / f"{base}_unet.json").read_text())
        with torch.device(device):
            return UNet2DConditionModel.from_config(config)
    return UNet2DConditionModel.from_pretrained(resolve_base(base), subfolder="unet").to(device)


def resolve_base(base: str) -> str:
    from dreamcache.models import resolve

    return resolve(BASES.get(base, base))


def native_resolution(sample_size: int, vae) -> int:
    """The base model's image size: its U-Net's sample size times the VAE's spatial reduction."""
    return sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
