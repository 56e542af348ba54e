"""Stage 3: SDXL target images (guidance 3.5, 25 steps, 1024 px; paper supp. S1).

One ``torch.Generator`` per sample, seeded from the sample id, so a sample's initial noise does not depend on
which other samples share its batch (the pixels can still differ in the last bits between batch sizes, as
batched kernels round differently; the same command on the same hardware gives identical bytes). The image leaves the stage JPEG-encoded: segmentation then runs on exactly
the pixels the trainer will read, and the object store carries ~0.3 MB per sample instead of 3 MB.
"""

from __future__ import annotations

from typing import Any

from dreamcache.models import default_device, resolve
from pipeline.config import ShardConfig, TargetConfig
from pipeline.stage import DrawnTargets, ModelRef


def load_sdxl(cfg: TargetConfig, device: str):
    import torch
    from diffusers import StableDiffusionXLPipeline

    dtype = getattr(torch, cfg.dtype) if device == "cuda" else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype, "revision": cfg.revision}
    if cfg.variant and device == "cuda":
        kwargs["variant"] = cfg.variant
    path = resolve(cfg.model)
    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(path, **kwargs)
    except (OSError, ValueError):
        if "variant" not in kwargs:
            raise
        kwargs.pop("variant")  # a checkpoint without fp16 files: load the full ones and cast
        pipe = StableDiffusionXLPipeline.from_pretrained(path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)  # diffusers' attention processors use SDPA by default
    if cfg.fp8 or (cfg.compile and device == "cuda"):  # FP8 runs compiled (its scaling fuses into the kernels)
        compile_sdxl(pipe, None if cfg.compile_mode == "default" else cfg.compile_mode, fp8=cfg.fp8)
    return pipe


def compile_sdxl(pipe, mode: str | None = None, fp8: bool = False, backend: str = "inductor") -> None:
    """``torch.compile`` for the U-Net and the VAE decoder, with fused q/k/v projections and channels-last
    convolutions; one static graph per batch shape. On an H100 at batch 8: 1.255 images/s against 1.012 eager,
    for about 2 minutes of compiling when each actor starts (BENCHMARKS.md). ``mode``: torch.compile's
    ("reduce-overhead": the U-Net's and the decoder's calls replayed as CUDA graphs); ``fp8``: the U-Net's
    transformers' linear layers in FP8 first (``quantize_fp8``). Called again (another mode), it compiles the same
    modules afresh."""
    import torch

    torch._dynamo.config.automatic_dynamic_shapes = False  # a new batch size compiles its own static graph
    torch._inductor.config.conv_1x1_as_mm = True
    unet = getattr(pipe.unet, "_orig_mod", pipe.unet)
    if not getattr(unet, "dreamcache_fused", False):
        pipe.fuse_qkv_projections()
        unet.dreamcache_fused = True
    unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    if fp8 and not getattr(unet, "dreamcache_fp8", False):
        quantize_fp8(unet)
    pipe.unet = torch.compile(unet, mode=mode, backend=backend)
    decode = getattr(pipe.vae.decode, "_torchdynamo_orig_callable", pipe.vae.decode)
    pipe.vae.decode = torch.compile(decode, mode=mode, backend=backend)


FP8_MIN_FEATURES = 512  # smaller matrix products gain less from FP8 than its scaling costs


def fp8_layer(module, name: str = "") -> bool:
    """Whether a U-Net layer (``name``: its path) can run in FP8: a linear layer over the image tokens, both sizes
    at least ``FP8_MIN_FEATURES`` and multiples of 16 (FP8 matrix units' tile): the transformers' projections
    and feed-forwards. The time and size embeddings' layers see one vector per row: too few to gain."""
    import torch

    return (isinstance(module, torch.nn.Linear) and min(module.in_features, module.out_features) >= FP8_MIN_FEATURES
            and module.in_features % 16 == 0 and module.out_features % 16 == 0
            and not any(part in name for part in ("time_emb", "add_embedding")))


def fp8_layers(unet) -> set[str]:
    """The paths of the ``fp8_layer``s that run: after ``fuse_qkv_projections`` an attention computes with its
    fused ``to_qkv`` (self-attention) or ``to_kv`` (cross-attention), and keeps the separate ones unused."""
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    unused = set()
    for name, module in unet.named_modules():
        if isinstance(getattr(module, "processor", None), FusedAttnProcessor2_0):
            fused = ("to_k", "to_v") if module.is_cross_attention else ("to_q", "to_k", "to_v")
            unused |= {f"{name}.{part}" for part in fused}
    return {name for name, module in unet.named_modules() if fp8_layer(module, name) and name not in unused}


def quantize_fp8(unet) -> int:
    """The U-Net's ``fp8_layers`` in FP8, in place (torchao's float8 dynamic activations and weights, one scale
    per row; inductor's settings left as they are, so that FP8 and bf16 compile alike); returns how many. Needs
    torchao, bf16 weights and a GPU with FP8 units (compute capability 8.9+)."""
    import torch

    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError:
        raise RuntimeError("targets.fp8 needs torchao: pip install 'dreamcache[fp8]' (or set targets.fp8=false)") \
            from None
    if unet.device.type != "cuda" or torch.cuda.get_device_capability(unet.device) < (8, 9):
        where = torch.cuda.get_device_name(unet.device) if unet.device.type == "cuda" else unet.device.type
        raise RuntimeError(f"targets.fp8 needs a GPU with FP8 units (compute capability 8.9+: H100, L40S); the "
                           f"U-Net is on {where}: set targets.fp8=false")
    if unet.dtype != torch.bfloat16:
        raise RuntimeError(f"targets.fp8 quantizes bf16 weights; the U-Net is in {unet.dtype}: set targets.dtype=bfloat16")
    names = fp8_layers(unet)
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    quantize_(unet, config, filter_fn=lambda module, name: name in names)
    unet.dreamcache_fp8 = True
    return len(names)


class TargetStage(DrawnTargets):
    """caption + seed -> ``target`` (JPEG bytes), by SDXL."""

    title = "SDXL"

    @classmethod
    def models(cls, cfg: TargetConfig) -> list[ModelRef]:
        return [ModelRef("targets", cfg.model, cfg.revision, "SDXL", "--set targets.model")]

    def __init__(self, cfg: TargetConfig, shards: ShardConfig = ShardConfig(), pipe=None):
        """``pipe``: an SDXL pipeline already built and placed (the benchmarks' random full-size one); default:
        load ``cfg.model``."""
        super().__init__(cfg, shards, pipe if pipe is not None else load_sdxl(cfg, default_device()))
