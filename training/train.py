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
import time
from pathlib import Path

import torch

from dreamcache.adapter import adapter_modules, capture_features, install_adapters, load_adapter_state, trainable_parameters
from dreamcache.bases import base_spec, checkpoint, native_resolution
from dreamcache.conditioning import placeholder
from dreamcache.config import to_yaml
from dreamcache.errors import PipelineError
from dreamcache.store import Store
from dreamcache.usage import INTERRUPTED, fail
from training.checkpoints import (broadcast_state, load_checkpoint, newest_checkpoint, read_run, recipe_metadata,
                                  save_checkpoint)
from training.config import TrainConfig, parse_args
from training.data import DIGEST_BITS, DataConfig, StepBatches, UnreadableData, keys_digest, loader
from training.runs import RunFolderError, latents_change, refuse
from training.shards import SampleIndex, StoreUnavailable
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
        check_resume(out, found, dataclasses.asdict(cfg), {"world_size": world, "dataset": index.identity},
                     set(args.allow_change))
    return Plan(index, out, found)


def agree(error: BaseException | None, world: int) -> BaseException | None:
    """The first rank's error, on every rank (None when no rank has one)."""
    if world == 1:
        return error
    errors: list = [None] * world
    torch.distributed.all_gather_object(errors, None if error is None else str(error))
    first = next(((r, e) for r, e in enumerate(errors) if e is not None), None)
    if first is None:
        return None
    return error if error is not None and first[0] == torch.distributed.get_rank() else RunFolderError(
        f"rank {first[0]}: {first[1]}")


def differing(identity: dict, world: int) -> RunFolderError | None:
    """The same error on every rank when the ranks' ``--data`` are not the same committed shards (a node-local
    copy of another version): each rank would read other samples at the same positions."""
    identities: list = [None] * world
    torch.distributed.all_gather_object(identities, identity)
    other = [r for r, i in enumerate(identities) if i != identities[0]]
    if not other:
        return None
    return RunFolderError(f"--data: rank {other[0]} sees {identities[other[0]]}, rank 0 {identities[0]}: every rank "
                          "must read the same committed shards (one dataset URL, or identical copies)")


def stop(world: int, error: BaseException | None) -> int:
    """Ends the process group; rank 0 prints the error (the others' copies would repeat it)."""
    if world > 1:
        torch.distributed.destroy_process_group()
    return fail(error) if error is not None else 2


def train(cfg: TrainConfig, args: argparse.Namespace, plan: Plan, rank: int, world: int, device: torch.device) -> int:
    accum = cfg.global_batch // (world * cfg.micro_batch)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    out = plan.out

    pipe, scheduler = load_models(cfg, device)
    unet = pipe.unet
    native = native_resolution(unet.config.sample_size, pipe.vae)
    if cfg.resolution not in (None, native):  # the same on every rank
        return stop(world, ValueError(
            f"--resolution {cfg.resolution} differs from {cfg.base}'s own {native} px (its U-Net sample size x VAE "
            f"factor); adapters are trained, cached and used at the base model's resolution. Leave --resolution "
            f"out, or pick a base made for {cfg.resolution} px") if rank == 0 else None)
    cfg = dataclasses.replace(cfg, resolution=native, layers=cfg.layers or base_spec(cfg.base).layers,
                              num_workers=loader_workers(cfg.num_workers))
    torch.manual_seed(cfg.seed)  # adapter initialisation: the same on every rank and in every run
    install_adapters(unet, cfg.layers, cfg.fusion)
    params = trainable_parameters(unet)
    for p in params:  # adapters train in fp32 whatever the frozen weights' dtype
        p.data = p.data.float()
    if cfg.grad_checkpointing:
        unet.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    latents, message = None, "off (--no-latents)"
    if cfg.latents:
        from training.encode import find_cache

        latents, message = find_cache(cfg.data, cfg.base, cfg.resolution, pipe.vae, list(plan.index.urls))
    # What the run is at: the step, the global position of the next sample, the digest of the keys seen.
    run = {"step": 0, "position": 0, "digest": 0, "world_size": world, "dataset": plan.index.identity,
           "latents": "cache" if latents else "vae"}
    state, error = None, None
    if rank == 0 and plan.checkpoint:  # only rank 0's --out need hold the checkpoint
        try:
            refuse(latents_change(read_run(out, plan.checkpoint)[1], run["latents"], set(args.allow_change)),
                   plan.checkpoint)
            state = load_checkpoint(out, plan.checkpoint)
        except RunFolderError as e:
            error = e
        except Exception as e:  # noqa: BLE001 - every rank must hear of it, or they wait in the broadcast forever
            where = out.url("checkpoints", plan.checkpoint)
            if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):  # the store's failure, not the file's
                error = RunFolderError(f"checkpoint {where} could not be read ({type(e).__name__}: {e}): the store "
                                       "failed, not the checkpoint; run the same command again once it answers")
            else:
                error = RunFolderError(f"checkpoint {where} cannot be loaded ({type(e).__name__}: {e}); move that "
                                       "folder aside to resume from the one before it")
    error = agree(error, world)
    if error is not None:
        return stop(world, error if rank == 0 else None)
    if world > 1:  # rank 0's checkpoint (or None) on every rank: all start from the same step and weights
        state = broadcast_state(state, device)
    if state:
        load_adapter_state(unet, state["adapters"])
        opt.load_state_dict(state["optimizer"])
        saved = state["run"] or {"step": state["step"], "position": state["step"] * cfg.global_batch, "digest": "0"}
        run.update(step=saved["step"], position=saved["position"], digest=int(saved["digest"], 16) if rank == 0 else 0)
    model = unet
    if world > 1:  # frozen weights have requires_grad False: DDP synchronises the adapters only
        model = torch.nn.parallel.DistributedDataParallel(
            unet, device_ids=[device.index] if device.type == "cuda" else None)
    step = run["step"]
    tensorboard = tensorboard_dir(cfg, out)
    if rank == 0:
        if args.resume and not plan.checkpoint:
            print(f"--resume: no complete checkpoint in {out.url('checkpoints')}"
                  f"{'' if not out.local else ' on ' + socket.gethostname()}; starting from step 0", flush=True)
        out.write_atomic(json.dumps(dataclasses.asdict(cfg), indent=1).encode(), "config.json")
        print(f"{'resuming at step ' + str(step) if state else 'starting'}: {world} rank(s) x {cfg.micro_batch} x "
              f"{accum} accumulation = global batch {cfg.global_batch}; "
              f"{sum(p.numel() for p in params):,} adapter parameters; {cfg.num_workers} loader workers per rank; "
              f"TensorBoard in {tensorboard}", flush=True)
        print(f"latent cache: {message}", flush=True)
    writer = _tensorboard(tensorboard) if rank == 0 else None

    data_cfg = DataConfig(resolution=cfg.resolution, latents=latents, views=cfg.references)
    trainer = Step(cfg, pipe, scheduler, device)
    if rank == 0 and cfg.val_samples:
        from training import validation

        val_items = validation.validation_set(list(plan.index.urls), cfg.val_samples)
        if not val_items:
            print("validation: no readable sample in the shards; no validation images this run", flush=True)
        sampler = validation.sampling_pipeline(pipe, label=out.url(), recipe=recipe_metadata(cfg))
    # This rank's micro-batches from the run's position on: the loader is built once, never reseeded.
    mine = StepBatches(start=run["position"], steps=max(0, cfg.max_steps - step), global_batch=cfg.global_batch,
                       world=world, rank=rank, micro_batch=cfg.micro_batch)
    batches = iter(loader(plan.index, data_cfg, cfg.seed, mine, cfg.num_workers))
    started, seen, skipped, skipped_all, digest = time.monotonic(), 0, 0, 0, run["digest"]
    while step < cfg.max_steps:
        total = 0.0
        for micro in range(accum):
            try:
                batch = next(batches)
            except (UnreadableData, StoreUnavailable) as e:  # from a loader worker, its traceback in the message
                print(f"error: {cfg.data}: {_original_message(e)}", file=sys.stderr, flush=True)
                return 1
            skipped += batch["skipped"]
            run["digest"] = (run["digest"] + keys_digest(batch["position"], batch["key"])) % (1 << DIGEST_BITS)
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
        run.update(step=step, position=run["position"] + cfg.global_batch)
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
            digest = all_ranks_digest(run["digest"], world, device)
            if rank == 0:
                save_checkpoint(out, unet, opt, cfg, {**run, "digest": f"{digest:012x}"})
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
        adapters, newest = out.url("adapters.safetensors"), out.url("checkpoints", newest_checkpoint(out))
        print(f"done: step {step}; adapters in {adapters} (checkpoint {newest}; data digest {digest:012x}); "
              f"use them with: dreamcache personalize --adapters {adapters} --reference IMAGE "
              f"--subject NOUN --out SUBJECT.cache", flush=True)
    return 0


def all_ranks_digest(mine: int, world: int, device: torch.device) -> int:
    """The digest of every key every rank has seen (a sum modulo 2^48, so it does not depend on the grouping)."""
    if world == 1:
        return mine
    total = torch.tensor([mine], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(total)
    return int(total.item()) % (1 << DIGEST_BITS)


def tensorboard_dir(cfg: TrainConfig, out: Store) -> str:
    """TensorBoard writes local files: --tensorboard, OUT/tensorboard, or for a run on an object store
    ./tensorboard/<bucket>/<prefix>."""
    if cfg.tensorboard:
        return cfg.tensorboard
    if out.local:
        return out.path("tensorboard")
    return str(Path("tensorboard") / out.uri.split("://", 1)[1].strip("/"))


def _original_message(e: Exception) -> str:
    """A DataLoader re-raises a worker's exception with the worker's traceback as its message: its last line."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    last = lines[-1] if lines else type(e).__name__
    names = ("training.data.UnreadableData", "UnreadableData", "training.shards.StoreUnavailable", "StoreUnavailable")
    return last.split(": ", 1)[1] if last.startswith(names) else last


def _tensorboard(folder: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(folder)


if __name__ == "__main__":
    sys.exit(main())
