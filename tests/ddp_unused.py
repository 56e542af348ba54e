"""DDP over the adapters when a micro-batch has no row with a reference (every reference dropped):

    torchrun --nproc-per-node 2 tests/ddp_unused.py OUT.json

Iteration 0: rank 0's rows all lack the reference, rank 1's have it; iteration 1: no row anywhere has it;
iteration 2: every row has it. For every fusion, rank 0 writes each iteration's adapter gradient norm.
"""

import json
import sys
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from dreamcache.adapter import DEFAULT_LAYERS, FUSIONS, cache_kwargs, capture_features, install_adapters, trainable_parameters
from dreamcache.tiny import ensure_tiny_models
from training.distributed import setup_distributed


def main(out: str) -> None:
    rank, world, device = setup_distributed()
    found = {fusion: norms(rank, fusion) for fusion in FUSIONS}
    if rank == 0:
        Path(out).write_text(json.dumps(found))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def norms(rank: int, fusion: str) -> list[float]:
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(ensure_tiny_models(names=("sd15",))["sd15"], subfolder="unet")
    install_adapters(unet, fusion=fusion)
    params = trainable_parameters(unet)
    model = torch.nn.parallel.DistributedDataParallel(unet)
    g = torch.Generator().manual_seed(rank)
    x, ref = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    text = torch.randn(2, 7, 32, generator=g)
    feats = capture_features(unet, DEFAULT_LAYERS, ref, torch.tensor([1, 1]), torch.zeros_like(text))
    norms = []
    for active in ([rank == 1] * 2, [False, False], [True, True]):
        model(x, torch.tensor([10, 500]), encoder_hidden_states=text,
              cross_attention_kwargs=cache_kwargs(feats, active)).sample.square().mean().backward()
        norms.append(sum(float(p.grad.norm()) for p in params))
        for p in params:
            p.grad = None
    return norms


if __name__ == "__main__":
    main(sys.argv[1])
