"""One optimizer step on a fixed batch of 4 samples, split over however many ranks torchrun starts.

    python tests/ddp_step.py DATA OUT.safetensors            # 1 rank x 4 samples
    torchrun --nproc-per-node 2 tests/ddp_step.py DATA OUT    # 2 ranks x 2 samples

Rank 0 writes the updated adapter weights; the two must agree (DDP averages the ranks' gradients).
"""

import random
import sys

import torch

from dreamcache.adapter import adapter_state_dict, install_adapters, save_adapters, trainable_parameters
from dreamcache.store import Store
from manifests.schema import SHARDS, read_manifests, tar_members
from training.data import DataConfig, collate, decode_sample
from training.config import TINY, TrainConfig
from training.distributed import setup_distributed
from training.models import load_models
from training.step import Step


def main(data: str, out: str) -> None:
    rank, world, device = setup_distributed()
    cfg = TrainConfig(**{**TINY, "drop_text": 0.0, "drop_image": 0.0, "drop_both": 0.0})
    pipe, scheduler = load_models(cfg, device)
    unet = pipe.unet
    install_adapters(unet)
    params = trainable_parameters(unet)
    torch.manual_seed(0)
    for p in params:  # the same "trained" adapters on every rank
        p.data.normal_(0, 0.02)
    model = torch.nn.parallel.DistributedDataParallel(unet) if world > 1 else unet
    # The same 4 samples on every rank (the training stream itself differs per rank by design).
    store = Store(data)
    members = tar_members(store.read_bytes(SHARDS, read_manifests(store)[0].shard))
    samples = [decode_sample({"__key__": k, **members[k]}, DataConfig(resolution=32), random.Random(k))
               for k in sorted(members)[:4]]
    per_rank = 4 // world
    batch = collate(samples[rank * per_rank:(rank + 1) * per_rank])
    if rank == 0:
        save_adapters(unet, out + ".before", {})
    opt = torch.optim.SGD(params, lr=1.0)  # plain SGD: the update is the averaged gradient itself
    Step(cfg, pipe, scheduler, device).loss(model, batch, step=0).backward()
    opt.step()
    if rank == 0:
        save_adapters(unet, out, {"world": str(world)})
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    assert adapter_state_dict(unet)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
