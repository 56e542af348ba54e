"""Trains the DreamCache conditioning adapters on a frozen SD 1.5 / 2.1 U-Net (paper sec. 3.3).

    torchrun --nproc-per-node 8 training/train.py --data s3://bucket/dreamcache-400k --out runs/sd15
    torchrun --standalone --nproc-per-node 2 training/train.py --profile tiny --data DIR --max-steps 6 --out RUN
    python training/train.py --base sd15 --random-init --dry-run      # build, inject, count, exit

Reads top to bottom: config -> distributed setup -> models -> adapters -> optimizer -> data -> loop.
Every random draw of a sample (noise, timestep, conditioning dropout, VAE sample) comes from a generator
seeded by (seed, step, key), and the data stream is reseeded at every checkpoint boundary, so a run
resumed from a checkpoint computes exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python training/train.py` puts training/ first on sys.path, not the project
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from manifests.store import write_file_atomic  # noqa: E402
from manifests.usage import INTERRUPTED, Parser, fail  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from training.adapter import (CACHE_PROMPT, DEFAULT_FUSION, DEFAULT_LAYERS, FUSIONS,  # noqa: E402
                              adapter_modules, cache_prompt, cached, capture_features, check_cache_prompt,
                              install_adapters, load_adapter_state, reference_features, save_adapters,
                              trainable_parameters)

CONFIGS = ROOT / "training" / "configs"
# SD 2.1-base (512 px, epsilon prediction): the model of the paper's SD 2.1 results and the official config.
BASES = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd21": "stabilityai/stable-diffusion-2-1-base"}


@dataclass(frozen=True)
class TrainConfig:
    data: str = ""  # dataset folder or fsspec URL written by pipeline/run.py
    out: str = "runs/dreamcache"
    base: str = "sd15"  # sd15 | sd21 | a hub id | a local diffusers folder | tiny:sd15
    layers: tuple[str, ...] = DEFAULT_LAYERS
    resolution: int | None = None  # the base model's own (U-Net sample size x VAE factor): 512 for SD 1.5 and 2.1-base
    lr: float = 1e-5  # paper, AdamW
    weight_decay: float = 1e-2
    global_batch: int = 128  # paper; reached by gradient accumulation
    micro_batch: int = 8  # per GPU per forward
    max_steps: int = 25_000  # paper
    # Conditioning dropout, the official code's: the caption is dropped with p = 0.07, the reference never (a
    # row without it is the frozen base model and trains nothing). The flags stay for experiments.
    drop_text: float = 0.07
    drop_image: float = 0.0
    drop_both: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 1000
    log_every: int = 10
    num_workers: int | None = None  # loader processes per rank; None: the rank's share of the cores, less one
    shuffle_buffer: int = 1000
    bf16: bool = True  # autocast on GPU; adapter weights stay fp32
    tf32: bool = True
    grad_checkpointing: bool = False
    latents: bool = True  # use DATA/latents/<base>-<resolution> (python -m training.encode) when it covers the data
    val_samples: int = 4  # validation grid at every checkpoint: this many fixed references (0: none)
    val_steps: int = 25  # DDIM steps for the validation images
    cache_timestep: int = 1  # the reference's timestep in the caching pass (paper: t=1; Table S3 ablation)
    # The caching pass's text (paper: empty; Table 6 ablation): a template with {subject} (the sample's subject
    # phrase) and {caption} (its caption), e.g. "a photo of {subject}" or "{caption}".
    cache_prompt: str = CACHE_PROMPT
    fusion: str = DEFAULT_FUSION  # how the reference enters the block (paper: concat; Table 4 ablation)

    def __post_init__(self):
        for name in ("max_steps", "checkpoint_every", "log_every", "global_batch", "micro_batch", "val_steps",
                     "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "val_samples", "weight_decay", "max_grad_norm"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr:g}")
        if any(not 0 <= p < 1 for p in (self.drop_text, self.drop_image, self.drop_both)):
            raise ValueError("conditioning dropout probabilities must be in [0, 1)")
        if self.drop_text + self.drop_image + self.drop_both >= 1:
            raise ValueError("conditioning dropout probabilities must sum to less than 1")
        if not 0 <= self.cache_timestep < 1000:
            raise ValueError(f"--cache-timestep must be a training timestep in [0, 1000), got {self.cache_timestep}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"--fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        check_cache_prompt(self.cache_prompt)
        if self.resolution is not None and self.resolution < 8:
            raise ValueError(f"--resolution must be a positive image size in pixels, got {self.resolution}")


TINY = {"base": "tiny:sd15", "micro_batch": 2, "global_batch": 4, "lr": 1e-4,
        "checkpoint_every": 2, "log_every": 1, "num_workers": 0, "shuffle_buffer": 8, "val_samples": 2,
        "val_steps": 3}


# ----------------------------------------------------------------------------------------------- setup

def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; a single process without it."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device


def loader_workers(configured: int | None) -> int:
    """DataLoader workers per rank: as configured, or the cores this process may use divided among the node's
    ranks (torchrun's LOCAL_WORLD_SIZE), less one for the rank itself, at most 16."""
    if configured is not None:
        return configured
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_rank = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(0, min(per_rank - 1, 16))


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
    from pipeline.models import resolve

    return resolve(BASES.get(base, base))


def native_resolution(sample_size: int, vae) -> int:
    """The base model's image size: its U-Net's sample size times the VAE's spatial reduction."""
    return sample_size * 2 ** (len(vae.config.block_out_channels) - 1)


def load_models(cfg: TrainConfig, device: torch.device):
    """Frozen U-Net, VAE and text encoder (bf16 on GPU), tokenizer and the training noise scheduler."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    path = resolve_base(cfg.base)
    dtype = torch.bfloat16 if device.type == "cuda" and cfg.bf16 else torch.float32
    unet = build_unet(cfg.base, random_init=False, device=str(device))
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae").to(device)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder").to(device)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")  # epsilon or v_prediction (SD 2.1)
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False).eval()
        if dtype != torch.float32:
            m.to(dtype)
    return unet, vae, text_encoder, tokenizer, scheduler


# ----------------------------------------------------------------------------------------------- one step

def sample_generator(seed: int, step: int, key: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{step}/{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") & (2**63 - 1))


class Step:
    """The diffusion loss of a micro-batch with the adapters conditioned on the cached reference features."""

    def __init__(self, cfg: TrainConfig, unet, vae, text_encoder, tokenizer, scheduler, device):
        self.cfg, self.unet, self.vae, self.scheduler, self.device = cfg, unet, vae, scheduler, device
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.null = self.encode_text([""])  # (1, 77, D): the empty prompt, for text dropout and (paper) caching

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    @torch.no_grad()
    def latents(self, images: torch.Tensor, eps: torch.Tensor | None) -> torch.Tensor:
        dist = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist
        z = dist.mean if eps is None else dist.mean + dist.std * eps.to(self.device, dist.mean.dtype)
        return z * self.vae.config.scaling_factor

    @torch.no_grad()
    def target_latents(self, batch: dict, eps: torch.Tensor) -> torch.Tensor:
        """The targets' latents sampled with ``eps``: encoded here, or from the cached distribution."""
        if "target_mean" not in batch:
            return self.latents(batch["target"], eps)
        mean, std = (batch[k].to(self.device, self.vae.dtype) for k in ("target_mean", "target_std"))
        return (mean + std * eps.to(self.device, mean.dtype)) * self.vae.config.scaling_factor

    def cache_text(self, batch: dict, captions: torch.Tensor) -> torch.Tensor:
        """The caching pass's prompt embedding: (1, 77, D) for the paper's empty prompt, else one per row (the
        --cache-prompt template filled with each sample's subject and caption)."""
        if self.cfg.cache_prompt == CACHE_PROMPT:
            return self.null
        prompts = [cache_prompt(self.cfg.cache_prompt, subject, caption)
                   for subject, caption in zip(batch["subject"], batch["caption"])]
        return captions if prompts == batch["caption"] else self.encode_text(prompts)

    @torch.no_grad()
    def reference_gap(self, model, batch: dict, step: int) -> tuple[float, float]:
        """(loss with each sample's own reference, loss with another sample's): same noise, timesteps and
        captions, no dropout. The adapters use the reference exactly when the first is lower."""
        rolled = {**batch, "reference": batch["reference"].roll(1, dims=0)}
        return (self.loss(model, batch, step, dropout=False).item(),
                self.loss(model, rolled, step, dropout=False).item())

    def loss(self, model, batch: dict, step: int, dropout: bool = True,
             backward_scale: float | None = None) -> torch.Tensor:
        """The micro-batch's loss; with ``backward_scale``, also backpropagates ``loss * backward_scale``. The
        backward pass runs while the reference features are still in place: gradient checkpointing recomputes
        the adapters' blocks during it, and they must see what the forward pass saw."""
        cfg, sched = self.cfg, self.scheduler
        B = len(batch["key"])
        gens = [sample_generator(cfg.seed, step, k) for k in batch["key"]]
        if "target_mean" in batch:  # the latent cache: the target's latent distribution, encoded once
            lat_shape = tuple(batch["target_mean"].shape[1:])
        else:
            down = 2 ** (len(self.vae.config.block_out_channels) - 1)  # the VAE's spatial reduction
            lat_shape = (self.vae.config.latent_channels, *(s // down for s in batch["target"].shape[-2:]))
        draw = lambda shape: torch.stack([torch.randn(shape, generator=g) for g in gens])  # noqa: E731
        target = self.target_latents(batch, draw(lat_shape))  # (B, 4, h, w)
        noise, ref_noise = draw(lat_shape).to(target), draw(lat_shape).to(target)
        t = torch.cat([torch.randint(0, sched.config.num_train_timesteps, (1,), generator=g) for g in gens]).to(self.device)
        u = torch.cat([torch.rand(1, generator=g) for g in gens])
        if not dropout:
            u = torch.ones_like(u)  # every sample keeps caption and reference (draws consumed all the same)
        drop_text = (u < cfg.drop_text) | (u >= cfg.drop_text + cfg.drop_image) & (u < cfg.drop_text + cfg.drop_image + cfg.drop_both)
        use_image = ~((u >= cfg.drop_text) & (u < cfg.drop_text + cfg.drop_image + cfg.drop_both))
        captions = self.encode_text(batch["caption"])
        text = torch.where(drop_text.to(self.device).view(B, 1, 1), self.null.expand_as(captions), captions)
        features = reference_features(self.unet, cfg.layers, sched, self.latents(batch["reference"], None),
                                      ref_noise, self.cache_text(batch, captions), cfg.cache_timestep)
        noisy = sched.add_noise(target, noise, t)
        goal = sched.get_velocity(target, noise, t) if sched.config.prediction_type == "v_prediction" else noise
        autocast = cfg.bf16 and self.unet.dtype == torch.bfloat16  # frozen weights in bf16: fp32 adapters autocast
        with cached(self.unet, features, active=use_image.to(self.device)):
            with torch.autocast(self.device.type, torch.bfloat16, enabled=autocast):
                pred = model(noisy, t, encoder_hidden_states=text).sample
            loss = torch.nn.functional.mse_loss(pred.float(), goal.float())
            if backward_scale is not None:
                (loss * backward_scale).backward()
        return loss


# ----------------------------------------------------------------------------------------------- checkpoints

def newest_checkpoint(out: Path) -> Path | None:
    done = sorted(p for p in (out / "checkpoints").glob("step-*") if (p / "COMPLETE").exists())
    return done[-1] if done else None


def recipe_metadata(cfg: TrainConfig) -> dict[str, str]:
    """What personalisation and generation must repeat, stored with the adapters (the fusion is saved with
    the adapters themselves)."""
    return {"resolution": str(cfg.resolution), "cache_timestep": str(cfg.cache_timestep),
            "cache_prompt": cfg.cache_prompt}


def save_checkpoint(out: Path, unet, opt, step: int, cfg: TrainConfig) -> Path:
    """checkpoints/step-N/{adapters.safetensors, trainer.pt, config.json, COMPLETE}, written in a temporary
    folder and renamed; out/adapters.safetensors is replaced atomically with the newest adapters."""
    final = out / "checkpoints" / f"step-{step:08d}"
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    meta = {"base": cfg.base, "step": str(step), **recipe_metadata(cfg),
            "config_sha256": hashlib.sha256(config.encode()).hexdigest()[:16]}
    save_adapters(unet, str(tmp / "adapters.safetensors"), meta)
    torch.save({"optimizer": opt.state_dict(), "step": step}, tmp / "trainer.pt")
    (tmp / "config.json").write_text(config)
    (tmp / "COMPLETE").write_text("ok\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    shutil.copyfile(final / "adapters.safetensors", out / ".adapters.safetensors.tmp")
    os.replace(out / ".adapters.safetensors.tmp", out / "adapters.safetensors")
    return final


# ----------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> tuple[TrainConfig, argparse.Namespace]:
    """(config, flags); raises ValueError for values the config refuses."""
    p = Parser(prog="training/train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", choices=["paper", "tiny"], default="paper")
    p.add_argument("--random-init", action="store_true", help="random weights from the architecture config")
    p.add_argument("--dry-run", action="store_true", help="build, inject and count the adapters, then exit")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="--out holds a run: delete its files and start again")
    p.add_argument("--allow-change", nargs="+", default=[], metavar="FIELD",
                   help="with --resume: accept a changed value of these config fields (e.g. lr)")
    for f in dataclasses.fields(TrainConfig):
        flag = f"--{f.name.replace('_', '-')}"  # field types are strings (postponed annotations)
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif f.name == "layers":
            p.add_argument(flag, nargs="+", default=None)
        else:
            kind = f.type.removesuffix(" | None")  # resolution: int | None
            p.add_argument(flag, type={"int": int, "float": float}.get(kind, str), default=None)
    args = p.parse_args(argv)
    values = dict(TINY) if args.profile == "tiny" else {}
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                   if getattr(args, f.name) is not None})
    if "layers" in values:
        values["layers"] = tuple(values["layers"])
    return TrainConfig(**values), args


def dry_run(cfg: TrainConfig, random_init: bool) -> int:
    unet = build_unet(cfg.base, random_init, device="meta" if random_init else "cpu")
    install_adapters(unet, cfg.layers, cfg.fusion)
    trainable = trainable_parameters(unet)
    frozen = sum(p.numel() for p in unet.parameters() if not p.requires_grad)
    print(f"base: {cfg.base} ({'random init' if random_init else BASES.get(cfg.base, cfg.base)})")
    print(f"frozen U-Net parameters: {frozen:,}")
    prompt = repr(cfg.cache_prompt) if cfg.cache_prompt else "empty (the paper's)"
    print(f"fusion: {cfg.fusion}; caching pass: prompt {prompt}, timestep {cfg.cache_timestep}")
    per_layer: dict[str, int] = {}
    for proc in adapter_modules(unet).values():
        per_layer[proc.layer] = per_layer.get(proc.layer, 0) + sum(p.numel() for p in proc.parameters())
    for layer, n in per_layer.items():
        print(f"  {layer}: {n:,}")
    print(f"adapter parameters: {sum(p.numel() for p in trainable):,}")
    resolution = cfg.resolution or unet.config.sample_size * 8  # the SD VAEs reduce by 8
    values = cache_values(unet.config, cfg.layers, resolution)
    print(f"feature cache per reference at {resolution} px: {values:,} values ({2 * values / 1e6:.1f} MB in fp16)")
    return 0


def cache_values(config, layers: tuple[str, ...], resolution: int) -> int:
    """Values in one reference's feature cache, from a pass of the architecture on the meta device."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        latent = torch.empty(1, unet.config.in_channels, resolution // 8, resolution // 8)
        text = torch.empty(1, 77, unet.config.cross_attention_dim)
        features = capture_features(unet, layers, latent, torch.tensor([1]), text)
    return sum(v.numel() for v in features.values())


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, args = parse_args(argv)
    except ValueError as e:
        return fail(e)
    from pipeline.models import quiet_model_loading

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
    from pipeline.models import check_available
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
    check_available(BASES.get(cfg.base, cfg.base), None, f"base model ({cfg.base})", "--base")
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

    unet, vae, text_encoder, tokenizer, scheduler = load_models(cfg, device)
    native = native_resolution(unet.config.sample_size, vae)
    if cfg.resolution not in (None, native):
        print(f"error: --resolution {cfg.resolution} differs from {cfg.base}'s own {native} px (its U-Net sample size "
              f"x VAE factor); adapters are trained, cached and used at the base model's resolution. Leave "
              f"--resolution out, or pick a base made for {cfg.resolution} px", file=sys.stderr)
        return 2
    cfg = dataclasses.replace(cfg, resolution=native, num_workers=loader_workers(cfg.num_workers))
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

        latents, message = find_cache(cfg.data, cfg.base, cfg.resolution, vae, urls)
        if rank == 0:
            print(f"latent cache: {message}", flush=True)
    data_cfg = DataConfig(resolution=cfg.resolution, shuffle_buffer=cfg.shuffle_buffer, latents=latents)
    trainer = Step(cfg, unet, vae, text_encoder, tokenizer, scheduler, device)
    if rank == 0 and cfg.val_samples:
        from training import validation

        val_items = validation.validation_set(urls, cfg.val_samples)
        if not val_items:
            print("validation: no readable sample in the shards; no validation images this run", flush=True)
        sampler = validation.sampling_pipeline(unet, vae, text_encoder, tokenizer, scheduler, label=str(out),
                                               recipe=recipe_metadata(cfg))
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
