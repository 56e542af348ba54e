"""The trainer's configuration: every flag of training/train.py is a field here, with the paper's value (the
flags, --config, --set and --print-config come from the dataclass: dreamcache/config.py)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from dreamcache.adapter import CACHE_PROMPT, DEFAULT_FUSION, FUSIONS, check_cache_prompt
from dreamcache.config import add_config_options, add_flags, at_least, given, layers, one_of, resolve
from dreamcache.usage import Parser


@dataclass(frozen=True)
class TrainConfig:
    data: str = ""  # dataset folder or fsspec URL written by pipeline/run.py
    out: str = "runs/dreamcache"
    base: str = "sd15"  # sd15 | sd21 | sdxl | a hub id | a local diffusers folder | tiny:sd15 (dreamcache/bases.py)
    layers: tuple[str, ...] | None = None  # where the adapters go; None: the base's (mid block + every 2nd decoder layer)
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
    keep_checkpoints: int | None = None  # keep the N newest checkpoints (None: all); OUT/adapters.safetensors stays
    log_every: int = 10
    tensorboard: str | None = None  # TensorBoard's local folder; None: OUT/tensorboard, or ./tensorboard/BUCKET/PREFIX
    num_workers: int | None = None  # loader processes per rank; None: the rank's share of the cores, less one
    bf16: bool = True  # autocast on GPU; adapter weights stay fp32
    tf32: bool = True
    grad_checkpointing: bool = False
    # torch.compile the training pass's U-Net (with the adapters) and the VAE encoder, at fixed shapes: one graph
    # for every step (the rows without a reference are masked, not indexed); the trainer reports any recompile
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile's backend (aot_eager: the eager kernels, no code generation)
    # NHWC convolutions, which GPUs' tensor cores run natively; the same computation in another layout
    channels_last: bool = False  # the U-Net and the VAE in channels-last memory, and the images encoded in it
    latents: bool = True  # use DATA/latents/<base>-<resolution> (python -m training.encode) when it covers the data
    # Opt-in: each reference is one of K augmentations drawn and encoded in advance (python -m training.encode
    # --reference-views K) rather than augmented and encoded at every step: the same augmentation, K draws per
    # sample over the whole run, and no reference encode in the step
    reference_latents: bool = False  # references drawn and encoded in advance (training.encode --reference-views K)
    val_samples: int = 4  # validation grid at every checkpoint: this many fixed references (0: none)
    val_steps: int = 25  # DDIM steps for the validation images
    cache_timestep: int = 1  # the reference's timestep in the caching pass (paper: t=1; Table S3 ablation)
    # The caching pass's text (paper: empty; Table 6 ablation): a template with {subject} (the sample's subject
    # phrase) and {caption} (its caption), e.g. "a photo of {subject}" or "{caption}".
    cache_prompt: str = CACHE_PROMPT
    fusion: str = DEFAULT_FUSION  # how the reference enters the block (paper: concat; Table 4 ablation)
    # K > 1: each sample's reference as K independent augmentations cached together, the adapters attending over
    # the union of their tokens, as they do over several references at personalisation (paper: 1)
    references: int = 1  # reference views per sample

    def __post_init__(self):
        at_least(self, 1, "max_steps", "checkpoint_every", "log_every", "global_batch", "micro_batch", "val_steps",
                 "keep_checkpoints")  # keep_checkpoints: None keeps every checkpoint
        at_least(self, 0, "num_workers", "val_samples", "weight_decay", "max_grad_norm")
        at_least(self, 1, "references")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr:g}")
        if any(not 0 <= p < 1 for p in (self.drop_text, self.drop_image, self.drop_both)):
            raise ValueError("conditioning dropout probabilities must be in [0, 1)")
        if self.drop_text + self.drop_image + self.drop_both >= 1:
            raise ValueError("conditioning dropout probabilities must sum to less than 1")
        if not 0 <= self.cache_timestep < 1000:
            raise ValueError(f"--cache-timestep must be a training timestep in [0, 1000), got {self.cache_timestep}")
        one_of(self, "fusion", FUSIONS)
        check_cache_prompt(self.cache_prompt)
        if self.resolution is not None and self.resolution < 8:
            raise ValueError(f"--resolution must be a positive image size in pixels, got {self.resolution}")


TINY = {"base": "tiny:sd15", "micro_batch": 2, "global_batch": 4, "lr": 1e-4,
        "checkpoint_every": 2, "log_every": 1, "num_workers": 0, "val_samples": 2,
        "val_steps": 3}


def parse_args(argv: list[str] | None) -> tuple[TrainConfig, argparse.Namespace]:
    """(config, flags): one flag per TrainConfig field, over --profile, --config and --set (dreamcache.config);
    raises ValueError (a ConfigError names the flag) for values the config refuses."""
    p = Parser(prog="training/train.py", description="Trains the DreamCache conditioning adapters on a frozen base U-Net.")
    p.add_argument("--profile", choices=["paper", "tiny"], default="paper")
    p.add_argument("--random-init", action="store_true", help="random weights from the architecture config")
    p.add_argument("--dry-run", action="store_true", help="build, inject and count the adapters, then exit")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="--out holds a run: delete its files and start again")
    p.add_argument("--allow-change", nargs="+", default=[], metavar="FIELD",
                   help="with --resume: accept a changed value of these config fields (e.g. lr, micro_batch), "
                        "or world_size, dataset, latents")
    add_config_options(p, "lr=1e-4")
    flags = add_flags(p, TrainConfig)
    args = p.parse_args(argv)
    cfg = resolve(TrainConfig, *layers(args, TINY if args.profile == "tiny" else None), given(args, flags),
                  flags=flags)
    return cfg, args
