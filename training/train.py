"""Trains the DreamCache conditioning adapters on a frozen SD 1.5 / 2.1 / SDXL U-Net (paper sec. 3.3).

    torchrun --nproc-per-node 8 training/train.py --data s3://bucket/dreamcache-400k --out runs/sd15
    torchrun --standalone --nproc-per-node 2 training/train.py --profile tiny --data DIR --max-steps 6 --out RUN
    python training/train.py --base sd15 --random-init --dry-run      # build, inject, count, exit
    python training/train.py --base sdxl --random-init --dry-run      # the same on SDXL at 1024 px

Reads top to bottom: config -> checks -> distributed setup -> models -> adapters -> optimizer -> resume ->
data -> loop. Every random draw of a sample (noise, timestep, conditioning dropout, VAE sample) comes from a
generator seeded by (seed, step, key), and what a step sees is positions [s*G, (s+1)*G) of a seeded global
order of the samples (training/data.py), so a run resumed from a checkpoint computes exactly what the
uninterrupted run would have. Rank 0 alone reads and writes --out (a folder or an object store); the
checkpoint it resumes from reaches the other ranks by broadcast, before DDP is built.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import socket
import sys
import weakref

import torch

from dreamcache.adapter import adapter_modules, capture_features, install_adapters, load_adapter_state, trainable_parameters
from dreamcache.bases import base_spec, checkpoint, native_resolution
from dreamcache.conditioning import placeholder
from dreamcache.config import to_yaml
from dreamcache.errors import PipelineError
from dreamcache.store import Store
from dreamcache.usage import INTERRUPTED, fail
from training.checkpoints import CheckpointManager, newest_checkpoint, read_run
from training.config import TrainConfig, parse_args
from training.data import DataConfig, DataFailure, StepBatches, Stream, loader_workers
from training.distributed import agree, barrier, differing, end, from_rank0, setup_distributed, stop
from training.metrics import Metrics
from training.models import compile_training, load_models
from training.runs import RunFolderError
from training.shards import SampleIndex
from training.step import Step
from training.validation import Validation

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
    plan, error = None, None
    try:
        plan = check(cfg, args)
    except (ValueError, FileNotFoundError, PipelineError) as e:  # StoreError and RunFolderError are ValueErrors
        error = e
    rank, world, device = setup_distributed()
    error = agree(error, world)  # one rank's mistake stops them all, before any model loads
    if error is None and world > 1:
        error = differing(plan.index.identity, world)
    if error is not None:
        return stop(world, error if rank == 0 else None)
    try:
        return train(cfg, args, plan, rank, world, device)
    except DataFailure as e:
        print(f"error: {cfg.data}: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        found = newest_checkpoint(plan.out) if rank == 0 else None
        where = f"the newest checkpoint is {plan.out.url('checkpoints', found)}" if found else "no checkpoint yet"
        print(f"interrupted; {where}; continue with the same command and --resume", file=sys.stderr, flush=True)
        return INTERRUPTED


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the checks found: the dataset's samples, the run's store, and (rank 0) the checkpoint to resume."""

    index: SampleIndex
    out: Store
    checkpoint: str | None


def check(cfg: TrainConfig, args: argparse.Namespace) -> Plan:
    """Everything that can be checked before a model loads. The run folder is rank 0's alone: the other ranks
    never read it (on another node it may not exist or hold anything)."""
    from dreamcache.models import check_available
    from training.runs import check_resume, prepare

    if not cfg.data:
        raise ValueError("--data DATASET is required (a folder or URL written by pipeline/run.py)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.global_batch % (world * cfg.micro_batch):
        raise ValueError(f"global batch {cfg.global_batch} is not a multiple of {world} ranks x micro batch "
                         f"{cfg.micro_batch}")
    if args.allow_change and not args.resume:
        raise ValueError("--allow-change only applies with --resume")
    index = SampleIndex.from_store(cfg.data)
    check_available(checkpoint(cfg.base), None, f"base model ({cfg.base})", "--base")
    base_spec(cfg.base)  # a checkpoint of a family this toolkit knows
    out = Store(cfg.out)
    if not (out.local or out.object_store):
        raise ValueError(f"--out {cfg.out}: a run goes to a local folder or an object store (s3://, gs://, ...)")
    if int(os.environ.get("RANK", "0")) != 0:
        return Plan(index, out, None)
    prepare(out, args.resume, args.overwrite)
    found = newest_checkpoint(out) if args.resume else None
    if found:
        now = {"world_size": world, "dataset": index.identity}
        check_resume(found, *read_run(out, found), dataclasses.asdict(cfg), now, set(args.allow_change))
    return Plan(index, out, found)


def train(cfg: TrainConfig, args: argparse.Namespace, plan: Plan, rank: int, world: int, device: torch.device) -> int:
    accum = cfg.global_batch // (world * cfg.micro_batch)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    out = plan.out
    pipe, scheduler = load_models(cfg, device)
    unet = pipe.unet
    try:
        cfg = for_base(cfg, pipe)
    except ValueError as e:  # the same on every rank
        return stop(world, e if rank == 0 else None)
    torch.manual_seed(cfg.seed)  # adapter initialisation: the same on every rank and in every run
    install_adapters(unet, cfg.layers, cfg.fusion)
    params = trainable_parameters(unet)
    for p in params:  # adapters train in fp32 whatever the frozen weights' dtype
        p.data = p.data.float()
    if cfg.grad_checkpointing:
        unet.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)  # one kernel per step
    try:
        latents, message, views = latent_caches(cfg, pipe.vae, plan, rank, world)
    except (ValueError, RuntimeError, OSError) as e:  # a cache that cannot be read: the same error on every rank
        return stop(world, e if rank == 0 else None)
    # What the run is at: the step, the global position of the next sample, the digest of the keys seen.
    run = {"step": 0, "position": 0, "digest": 0, "world_size": world, "dataset": plan.index.identity,
           "latents": "vae" if not latents else f"cache+{views} reference views" if views else "cache"}
    checkpoints = CheckpointManager(out, cfg, rank, world, device)
    try:
        state = checkpoints.resume(plan.checkpoint, run["latents"], set(args.allow_change))
    except RunFolderError as e:
        return stop(world, e if rank == 0 else None)
    if state:
        load_adapter_state(unet, state["adapters"])
        opt.load_state_dict(state["optimizer"])
        saved = state["run"] or {"step": state["step"], "position": state["step"] * cfg.global_batch, "digest": "0"}
        run.update(step=saved["step"], position=saved["position"], digest=int(saved["digest"], 16) if rank == 0 else 0)
    model = unet
    if world > 1:  # frozen weights have requires_grad False: DDP synchronises the adapters only
        model = torch.nn.parallel.DistributedDataParallel(
            unet, device_ids=[device.index] if device.type == "cuda" else None)
    ddp = weakref.ref(model)
    forward = compile_training(model, cfg.compile_backend) if cfg.compile else model
    metrics = Metrics(cfg, out, rank, world, device)
    if rank == 0:
        announce(cfg, args, plan, run["step"] if state else None, world, accum, params, metrics.folder, message)
    trainer = Step(cfg, pipe, scheduler, device)
    validation = Validation(cfg, pipe, list(plan.index.urls), out, trainer, device) if rank == 0 else None
    # This rank's micro-batches from the run's position on: the loader is built once, never reseeded.
    mine = StepBatches(start=run["position"], steps=max(0, cfg.max_steps - run["step"]),
                       global_batch=cfg.global_batch, world=world, rank=rank, micro_batch=cfg.micro_batch)
    data = Stream(plan.index, DataConfig(resolution=cfg.resolution, latents=latents, views=cfg.references,
                                         reference_views=views),
                  cfg.seed, mine, cfg.num_workers, digest=run["digest"])

    step, digest = run["step"], run["digest"]
    metrics.start()
    while step < cfg.max_steps:
        loss = torch.zeros((), device=device)  # read on logging steps only: no host synchronisation per step
        for micro in range(accum):
            batch = data.next()
            sync = micro == accum - 1 or world == 1  # DDP reduces the gradients on the last micro-batch only
            with model.no_sync() if not sync else contextlib.nullcontext():
                loss += trainer.loss(forward, batch, step, backward_scale=1 / accum).detach() / accum
            metrics.count(len(batch["key"]) * world)
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        run.update(step=step, position=run["position"] + cfg.global_batch, digest=data.digest)
        metrics.log(step, loss, data.skipped)
        if checkpoints.due(step):
            with metrics.paused():
                digest = checkpoints.save(unet, opt, run)
                if validation:
                    validation(step, unet, batch, metrics)
                barrier(world)
    metrics.close()
    del model, forward  # DDP's Reducer holds the process group: it goes first (distributed.end)
    if cfg.compile:
        torch._dynamo.reset()  # and the compiled code that holds it
    end(world, ddp)
    if rank == 0:
        adapters, newest = out.url("adapters.safetensors"), out.url("checkpoints", newest_checkpoint(out))
        print(f"done: step {step}; adapters in {adapters} (checkpoint {newest}; data digest {digest:012x}); "
              f"use them with: dreamcache personalize --adapters {adapters} --reference IMAGE "
              f"--subject NOUN --out SUBJECT.cache", flush=True)
    return 0


def latent_caches(cfg: TrainConfig, vae, plan: Plan, rank: int, world: int) -> tuple[str | None, str, int]:
    """(this rank's latent cache folder or None, what the log says about it, the reference views drawn in advance
    that --reference-latents trains on, else 0). Rank 0 reads the cache files' headers for every rank; each rank
    lists its own copy of --data (node-local copies), and the ranks agree. ValueError, the same on every rank,
    when --reference-latents finds no views."""
    from training.encode import find_cache, listed, reference_views

    urls = list(plan.index.urls)
    if not cfg.latents:
        found, message = None, "off (--no-latents)"
    else:
        found, message = from_rank0(world, rank, lambda: find_cache(cfg.data, cfg.base, cfg.resolution, vae, urls))
    latents, problem = None, None
    try:  # every rank reaches agree(), whatever its listing does
        latents, missing = listed(cfg.data, cfg.base, cfg.resolution, urls) if found else (None, [])
        if missing:
            problem = RunFolderError(f"--data {cfg.data}: the latent cache {latents} lacks {len(missing)} of "
                                     f"{len(urls)} shards' files that rank 0's copy has")
    except Exception as e:  # noqa: BLE001 - a store that cannot be listed: every rank stops with it
        problem = e
    error = agree(problem, world)
    if error is not None:
        raise error if isinstance(error, (ValueError, RuntimeError, OSError)) else RuntimeError(str(error))
    if not cfg.reference_latents:
        return latents, message, 0
    if latents is None:
        raise ValueError("--reference-latents reads the reference views from the latent cache, which this run does "
                         f"not use ({'--no-latents' if not cfg.latents else 'none covers the data'}); write it with: "
                         f"python -m training.encode {cfg.data} --base {cfg.base} --reference-views K")
    views = from_rank0(world, rank, lambda: reference_views(cfg.data, cfg.base, cfg.resolution, vae, urls))
    return latents, f"{message}; reference views: {views} per sample, drawn in advance (--reference-latents)", views


def for_base(cfg: TrainConfig, pipe) -> TrainConfig:
    """``cfg`` with what the loaded base decides: its resolution, its adapter layers (unless given), the loader
    workers. ValueError when --resolution is not the base's own."""
    native = native_resolution(pipe.unet.config.sample_size, pipe.vae)
    if cfg.resolution not in (None, native):
        raise ValueError(f"--resolution {cfg.resolution} differs from {cfg.base}'s own {native} px (its U-Net sample "
                         f"size x VAE factor); adapters are trained, cached and used at the base model's resolution. "
                         f"Leave --resolution out, or pick a base made for {cfg.resolution} px")
    return dataclasses.replace(cfg, resolution=native, layers=cfg.layers or base_spec(cfg.base).layers,
                               num_workers=loader_workers(cfg.num_workers))


def announce(cfg: TrainConfig, args: argparse.Namespace, plan: Plan, resumed: int | None, world: int, accum: int,
             params, tensorboard: str, latents: str) -> None:
    """Rank 0: the resolved config into OUT/config.json, and what the run is about to do (``resumed``: the step it
    resumes at, None for a start)."""
    out = plan.out
    if args.resume and not plan.checkpoint:
        print(f"--resume: no complete checkpoint in {out.url('checkpoints')}"
              f"{'' if not out.local else ' on ' + socket.gethostname()}; starting from step 0", flush=True)
    out.write_atomic(json.dumps(dataclasses.asdict(cfg), indent=1).encode(), "config.json")
    start = "starting" if resumed is None else f"resuming at step {resumed}"
    print(f"{start}: {world} rank(s) x {cfg.micro_batch} x {accum} accumulation = global batch {cfg.global_batch}; "
          f"{sum(p.numel() for p in params):,} adapter parameters; {cfg.num_workers} loader workers per rank; "
          f"TensorBoard in {tensorboard}", flush=True)
    print(f"latent cache: {latents}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
