"""Trains the DreamCache conditioning adapters on a frozen SD 1.5 / 2.1 / SDXL U-Net (paper sec. 3.3).

    torchrun --nproc-per-node 8 training/train.py --data s3://bucket/dreamcache-400k --out runs/sd15
    torchrun --standalone --nproc-per-node 2 training/train.py --profile tiny --data DIR --max-steps 6 --out RUN
    python training/train.py --base sd15 --random-init --dry-run      # build, inject, count, exit
    python training/train.py --base sdxl --random-init --dry-run      # the same on SDXL at 1024 px

Reads top to bottom: config -> distributed setup -> models -> adapters -> optimizer -> data -> loop.
Every random draw of a sample (noise, timestep, conditioning dropout, VAE sample) comes from a generator
seeded by (seed, step, key), and the data stream is reseeded at every checkpoint boundary, so a run
resumed from a checkpoint computes exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

from dreamcache.adapter import adapter_modules, capture_features, install_adapters, load_adapter_state, trainable_parameters
from dreamcache.bases import base_spec, checkpoint, native_resolution
from dreamcache.conditioning import placeholder
from dreamcache.config import to_yaml
from dreamcache.errors import PipelineError
from dreamcache.store import write_file_atomic
from dreamcache.usage import INTERRUPTED, fail
from training.checkpoints import newest_checkpoint, recipe_metadata, save_checkpoint
from training.config import TrainConfig, parse_args
from training.step import Step, load_models, loader_workers, setup_distributed

# ----------------------------------------------------------------------------------------------- main

def dry_run(cfg: TrainConfig, random_init: bool) -> int:
    spec = base_spec(cfg.base)
    layers = cfg.layers or spec.layers
    unet = spec.build_unet(random_init, device="meta" if random_init else "cpu")
    install_adapters(unet, layers, cfg.fusion)
    trainable = trainable_parameters(unet)
    frozen = sum(p.numel() for p in unet.parameters() if not p.requires_grad)
    print(f"base: {cfg.base} ({'random init' if random_init else checkpoint(cfg.base)})")
    print(f"frozen U-Net parameters: {frozen:,}")
    prompt = repr(cfg.cache_prompt) if cfg.cache_prompt else "empty (the paper's)"
    print(f"fusion: {cfg.fusion}; caching pass: prompt {prompt}, timestep {cfg.cache_timestep}")
    per_layer: dict[str, int] = {}
    for proc in adapter_modules(unet).values():
        per_layer[proc.layer] = per_layer.get(proc.layer, 0) + sum(p.numel() for p in proc.parameters())
    for layer, n in per_layer.items():
        print(f"  {layer}: {n:,}")
    print(f"adapter parameters: {sum(p.numel() for p in trainable):,}")
    resolution = cfg.resolution or spec.resolution
    values = cache_values(unet.config, layers, unet.config.sample_size * resolution // spec.resolution)
    print(f"feature cache per reference at {resolution} px: {values:,} values ({2 * values / 1e6:.1f} MB in fp16)")
    return 0


def cache_values(config, layers: tuple[str, ...], latent_side: int) -> int:
    """Values in one reference's feature cache, from a pass of the architecture on the meta device."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        latent = torch.empty(1, unet.config.in_channels, latent_side, latent_side)
        features = capture_features(unet, layers, latent, torch.tensor([1]), placeholder(unet.config, 1, device="meta"))
    return sum(v.numel() for v in features.values())


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, args = parse_args(argv)
    except ValueError as e:
        return fail(e)
    from dreamcache.models import quiet_model_loading

    if args.print_config:
        print(to_yaml(cfg))
        return 0
    quiet_model_loading()
    if args.dry_run:
        return dry_run(cfg, args.random_init)
    try:
        urls = check(cfg, args)
    except (ValueError, FileNotFoundError, PipelineError) as e:  # StoreError and RunFolderError are ValueErrors
        return fail(e)
    try:
        return train(cfg, args, urls)
    except KeyboardInterrupt:
        found = newest_checkpoint(Path(cfg.out))
        print(f"interrupted; {'the newest checkpoint is ' + str(found) if found else 'no checkpoint was written'}; "
              "continue with the same command and --resume", file=sys.stderr, flush=True)
        return INTERRUPTED


def check(cfg: TrainConfig, args: argparse.Namespace) -> list[str]:
    """Everything that can be checked before a model loads; returns the dataset's shard URLs."""
    from dreamcache.models import check_available
    from training.data import shard_urls
    from training.runs import check_resume, prepare

    if not cfg.data:
        raise ValueError("--data DATASET is required (a folder or URL written by pipeline/run.py)")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.global_batch % (world * cfg.micro_batch):
        raise ValueError(f"global batch {cfg.global_batch} is not a multiple of {world} ranks x micro batch "
                         f"{cfg.micro_batch}")
    if args.allow_change and not args.resume:
        raise ValueError("--allow-change only applies with --resume")
    urls = shard_urls(cfg.data)
    check_available(checkpoint(cfg.base), None, f"base model ({cfg.base})", "--base")
    base_spec(cfg.base)  # a checkpoint of a family this toolkit knows
    out = Path(cfg.out)
    prepare(out, args.resume, args.overwrite, delete=int(os.environ.get("RANK", 0)) == 0)
    found = newest_checkpoint(out) if args.resume else None
    if found:
        check_resume(found, dataclasses.asdict(cfg), set(args.allow_change))
    return urls


def train(cfg: TrainConfig, args: argparse.Namespace, urls: list[str]) -> int:
    rank, world, device = setup_distributed()
    accum = cfg.global_batch // (world * cfg.micro_batch)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    out = Path(cfg.out)

    pipe, scheduler = load_models(cfg, device)
    unet = pipe.unet
    native = native_resolution(unet.config.sample_size, pipe.vae)
    if cfg.resolution not in (None, native):
        print(f"error: --resolution {cfg.resolution} differs from {cfg.base}'s own {native} px (its U-Net sample size "
              f"x VAE factor); adapters are trained, cached and used at the base model's resolution. Leave "
              f"--resolution out, or pick a base made for {cfg.resolution} px", file=sys.stderr)
        return 2
    cfg = dataclasses.replace(cfg, resolution=native, layers=cfg.layers or base_spec(cfg.base).layers,
                              num_workers=loader_workers(cfg.num_workers))
    torch.manual_seed(cfg.seed)  # adapter initialisation: the same on every rank and in every run
    install_adapters(unet, cfg.layers, cfg.fusion)
    params = trainable_parameters(unet)
    for p in params:  # adapters train in fp32 whatever the frozen weights' dtype
        p.data = p.data.float()
    if cfg.grad_checkpointing:
        unet.enable_gradient_checkpointing()
    model = unet
    if world > 1:  # frozen weights have requires_grad False: DDP synchronises the adapters only
        model = torch.nn.parallel.DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = 0
    found = newest_checkpoint(out) if args.resume else None
    if args.resume and not found and rank == 0:
        print(f"--resume: no complete checkpoint in {out / 'checkpoints'}; starting from step 0", flush=True)
    if found:
        from safetensors.torch import load_file

        load_adapter_state(unet, load_file(str(found / "adapters.safetensors")))
        state = torch.load(found / "trainer.pt", map_location=device, weights_only=True)
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_file_atomic(out / "config.json", json.dumps(dataclasses.asdict(cfg), indent=1).encode())
        print(f"{'resuming at step ' + str(step) if found else 'starting'}: {world} rank(s) x {cfg.micro_batch} x "
              f"{accum} accumulation = global batch {cfg.global_batch}; "
              f"{sum(p.numel() for p in params):,} adapter parameters; {cfg.num_workers} loader workers per rank",
              flush=True)
    writer = _tensorboard(out) if rank == 0 else None

    from training.data import DataConfig, UnreadableData, collate, make_dataset

    latents = None
    if cfg.latents:
        from training.encode import find_cache

        latents, message = find_cache(cfg.data, cfg.base, cfg.resolution, pipe.vae, urls)
        if rank == 0:
            print(f"latent cache: {message}", flush=True)
    data_cfg = DataConfig(resolution=cfg.resolution, shuffle_buffer=cfg.shuffle_buffer, latents=latents,
                          views=cfg.references)
    trainer = Step(cfg, pipe, scheduler, device)
    if rank == 0 and cfg.val_samples:
        from training import validation

        val_items = validation.validation_set(urls, cfg.val_samples)
        if not val_items:
            print("validation: no readable sample in the shards; no validation images this run", flush=True)
        sampler = validation.sampling_pipeline(pipe, label=str(out), recipe=recipe_metadata(cfg))
    batches = None
    started, seen, skipped, skipped_all = time.monotonic(), 0, 0, 0
    while step < cfg.max_steps:
        if batches is None or step % cfg.checkpoint_every == 0:  # reseed at every boundary: exact resume
            loader = torch.utils.data.DataLoader(make_dataset(urls, data_cfg, seed=cfg.seed * 1_000_003 + step),
                                                 batch_size=cfg.micro_batch, num_workers=cfg.num_workers,
                                                 collate_fn=collate)
            batches = iter(loader)
        total = 0.0
        for micro in range(accum):
            try:
                batch = next(batches)
            except UnreadableData as e:  # raised in a loader worker: its message carries the worker's traceback
                print(f"error: {cfg.data}: {_original_message(e)}", file=sys.stderr, flush=True)
                return 1
            skipped += batch["skipped"]
            sync = micro == accum - 1 or world == 1
            with model.no_sync() if not sync else contextlib.nullcontext():
                loss = trainer.loss(model, batch, step, backward_scale=1 / accum)
            total += loss.item() / accum
            seen += len(batch["key"]) * world
        skipped_all = skipped
        if world > 1:  # log the mean loss over ranks, not rank 0's, and every rank's skipped samples
            stats = torch.tensor([total, float(skipped)], device=device, dtype=torch.float64)
            torch.distributed.all_reduce(stats)
            total, skipped_all = stats[0].item() / world, int(stats[1].item())
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if rank == 0 and (step % cfg.log_every == 0 or step == cfg.max_steps):
            rate = seen / (time.monotonic() - started)
            mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
            print(f"step {step}/{cfg.max_steps} loss {total:.4f} lr {cfg.lr:g} {rate:.1f} samples/s "
                  f"mem {mem:.1f} GiB skipped {skipped_all}", flush=True)
            if writer:
                for k, v in {"loss": total, "lr": cfg.lr, "samples_per_s": rate, "memory_gib": mem,
                             "skipped": skipped_all}.items():
                    writer.add_scalar(f"train/{k}", v, step)
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            paused = time.monotonic()
            if rank == 0:
                save_checkpoint(out, unet, opt, step, cfg)
                if len(batch["key"]) > 1:  # does the model use the reference? own vs another sample's
                    own, other = trainer.reference_gap(unet, batch, step)
                    print(f"step {step} reference check: loss {own:.4f} with its own reference, {other:.4f} with "
                          f"another's", flush=True)
                    if writer:
                        writer.add_scalar("val/reference_gap", other - own, step)
                if cfg.val_samples and val_items:
                    grid = validation.render(sampler, val_items, cfg.val_steps, cfg.seed,
                                             autocast=device.type == "cuda" and cfg.bf16)
                    print(f"step {step} validation images: {validation.save(grid, out, step, writer)}", flush=True)
            if world > 1:
                torch.distributed.barrier()
            started += time.monotonic() - paused  # samples/s counts training time only
    if writer:
        writer.close()
    if world > 1:
        torch.distributed.destroy_process_group()
    if rank == 0:
        print(f"done: step {step}; adapters in {out / 'adapters.safetensors'} (checkpoint "
              f"{newest_checkpoint(out)}); use them with: dreamcache personalize --adapters "
              f"{out / 'adapters.safetensors'} --reference IMAGE --subject NOUN --out SUBJECT.cache", flush=True)
    return 0


def _original_message(e: Exception) -> str:
    """A DataLoader re-raises a worker's exception with the worker's traceback as its message: its last line."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    last = lines[-1] if lines else type(e).__name__
    return last.split(": ", 1)[1] if last.startswith(("training.data.UnreadableData", "UnreadableData")) else last


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


if __name__ == "__main__":
    sys.exit(main())
