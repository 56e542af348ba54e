"""Trains the DreamCache conditioning adapters on a frozen SD 1.5 / 2.1 U-Net.

    python training/train.py --base sd15 --random-init --dry-run   # build, inject, count, exit

This version builds the full-size U-Net from the architecture configs in training/configs/ (no weights
needed), installs the adapters on the paper's layers and reports what would train. The training loop
itself (data, DDP, checkpoints) is not in this version: without --dry-run the script says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python training/train.py` puts training/ first on sys.path, not the project
    sys.path.insert(0, str(ROOT))

from training.adapter import DEFAULT_LAYERS, adapter_modules, install_adapters, trainable_parameters  # noqa: E402

CONFIGS = ROOT / "training" / "configs"
BASES = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd21": "stabilityai/stable-diffusion-2-1"}


def build_unet(base: str, random_init: bool, device: str = "cpu"):
    """The base model's U-Net: from its architecture config with random weights, or from the checkpoint."""
    from diffusers import UNet2DConditionModel

    if random_init:
        config = json.loads((CONFIGS / f"{base}_unet.json").read_text())
        return UNet2DConditionModel.from_config(config).to(device)
    return UNet2DConditionModel.from_pretrained(BASES.get(base, base), subfolder="unet").to(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="training/train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="sd15", choices=sorted(BASES), help="base model architecture")
    p.add_argument("--random-init", action="store_true", help="random weights from the architecture config")
    p.add_argument("--layers", nargs="+", default=list(DEFAULT_LAYERS), help="transformers that get adapters")
    p.add_argument("--resolution", type=int, default=512, help="image size (the paper trains at 512)")
    p.add_argument("--dry-run", action="store_true", help="build, inject and count the adapters, then exit")
    args = p.parse_args(argv)
    if not args.dry_run:
        print("error: the training loop is not in this version; use --dry-run to build and count the adapters",
              file=sys.stderr)
        return 2
    unet = build_unet(args.base, args.random_init)
    install_adapters(unet, tuple(args.layers))
    trainable = trainable_parameters(unet)
    frozen = sum(p.numel() for p in unet.parameters() if not p.requires_grad)
    per_layer: dict[str, int] = {}
    for proc in adapter_modules(unet).values():
        per_layer[proc.layer] = per_layer.get(proc.layer, 0) + sum(p.numel() for p in proc.parameters())
    print(f"base: {args.base} ({'random init' if args.random_init else BASES[args.base]})")
    print(f"frozen U-Net parameters: {frozen:,}")
    for layer, n in per_layer.items():
        print(f"  {layer}: {n:,}")
    print(f"adapter parameters: {sum(p.numel() for p in trainable):,}")
    values = cache_values(unet.config, tuple(args.layers), args.resolution)
    print(f"feature cache per reference at {args.resolution} px: {values:,} values ({2 * values / 1e6:.1f} MB in fp16)")
    return 0


def cache_values(config, layers: tuple[str, ...], resolution: int) -> int:
    """Values in one reference's feature cache, from a pass of the architecture on the meta device."""
    import torch
    from diffusers import UNet2DConditionModel

    from training.adapter import capture_features

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        latent = torch.empty(1, unet.config.in_channels, resolution // 8, resolution // 8)
        text = torch.empty(1, 77, unet.config.cross_attention_dim)
        features = capture_features(unet, layers, latent, torch.tensor([1]), text)
    return sum(v.numel() for v in features.values())


if __name__ == "__main__":
    sys.exit(main())
