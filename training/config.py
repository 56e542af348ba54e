"""The trainer's configuration: every flag of training/train.py is a field here, with the paper's value."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from dreamcache.adapter import CACHE_PROMPT, DEFAULT_FUSION, FUSIONS, check_cache_prompt
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
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise ValueError(f"--keep-checkpoints must be >= 1 (leave it out to keep every checkpoint), got "
                             f"{self.keep_checkpoints}")
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


def parse_args(argv: list[str] | None) -> tuple[TrainConfig, argparse.Namespace]:
    """(config, flags); raises ValueError for values the config refuses."""
    p = Parser(prog="training/train.py", description="Trains the DreamCache conditioning adapters on a frozen base U-Net.")
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
