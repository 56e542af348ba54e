"""Base models: one spec per base, read by the trainer, validation, generation, evaluation and benchmarks.

A spec names once what the rest of the code would otherwise assume: which checkpoint, its U-Net architecture,
where the adapters go, the image size, the text encoders and any added conditioning, the prediction type and
the VAE's latent scale. A new base is one more entry in ``SPECS``.

    sd15   SD 1.5: one CLIP text encoder, 512 px, epsilon prediction (the paper's main table)
    sd21   SD 2.1-base: OpenCLIP text encoder, 512 px, epsilon (the paper's and the official code's SD 2.1)
    sdxl   SDXL base 1.0: two text encoders, pooled text and size/crop ids (``text_time``), 1024 px

A checkpoint's own configs win over a spec's values where both say something (a fine-tune at another size,
a v-prediction variant): the spec is the default, the documentation and what random-weight builds use.

``BaseIdentity`` is what adapters remember of the base they were trained on (family, text width, a hash of the
U-Net's architecture, the checkpoint), read from the U-Net itself so that any writer records the same thing.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parent / "configs"  # the released U-Nets' architecture configs

# The official code's choice on SD 1.x/2.x: the mid block and every second decoder transformer, counting the
# transformers over the whole U-Net (encoder 0-5, mid 6, decoder 7-15) and keeping the even ids 8, 10, 12, 14.
SD_LAYERS = ("mid_block.attentions.0", "up_blocks.1.attentions.1", "up_blocks.2.attentions.0",
             "up_blocks.2.attentions.2", "up_blocks.3.attentions.1")
# The same rule on SDXL's U-Net (encoder 0-3, mid 4, decoder 5-10; even ids 6, 8, 10): the mid block's 10
# transformer blocks at 32x32 (1024 px), the decoder's 10-block layer after it, and two 2-block layers at 64x64.
SDXL_LAYERS = ("mid_block.attentions.0", "up_blocks.0.attentions.1", "up_blocks.1.attentions.0",
               "up_blocks.1.attentions.2")


@dataclass(frozen=True)
class BaseSpec:
    """What the toolkit needs to know about a base model."""

    name: str  # sd15 | sd21 | sdxl | tiny:sd15 | a hub id | a local folder
    checkpoint: str  # where its weights come from (a hub id, a folder or a tiny:<name> model)
    family: str  # "sd" (SD 1.x/2.x) or "sdxl": which DreamCache pipeline class, how prompts are encoded
    unet_config: str | None  # architecture file in dreamcache/configs/ (random-weight builds); None: the checkpoint's
    layers: tuple[str, ...]  # where the adapters go by default
    resolution: int  # image side in pixels the base was trained at (U-Net sample size x VAE reduction)
    text_encoders: tuple[str, ...]  # the pipeline's text-encoder components, in the order their features concatenate
    added_conditioning: str | None  # addition_embed_type: None, or "text_time" (pooled text + 6 size/crop ids)
    prediction_type: str  # epsilon | v_prediction
    vae_scale: float  # latents = VAE mean x this

    def build_unet(self, random_init: bool, device: str = "cpu"):
        """The U-Net: from its architecture config with random weights (``device="meta"``: shapes only,
        nothing computed), or from the checkpoint."""
        from diffusers import UNet2DConditionModel

        if random_init:
            if self.unet_config is None:
                raise ValueError(f"{self.name}: no architecture config to build a random U-Net from; use one of "
                                 f"{', '.join(SPECS)}")
            with torch.device(device):
                return UNet2DConditionModel.from_config(json.loads((CONFIGS / self.unet_config).read_text()))
        return UNet2DConditionModel.from_pretrained(self.path(), subfolder="unet").to(device)

    def path(self) -> str:
        """The checkpoint's local folder (built first for a tiny model) or hub id."""
        from dreamcache.models import resolve

        return resolve(self.checkpoint)


SD15 = BaseSpec("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd", "sd15_unet.json", SD_LAYERS, 512,
                ("text_encoder",), None, "epsilon", 0.18215)
SD21 = BaseSpec("sd21", "stabilityai/stable-diffusion-2-1-base", "sd", "sd21_unet.json", SD_LAYERS, 512,
                ("text_encoder",), None, "epsilon", 0.18215)
SDXL = BaseSpec("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "sdxl", "sdxl_unet.json", SDXL_LAYERS, 1024,
                ("text_encoder", "text_encoder_2"), "text_time", "epsilon", 0.13025)
SPECS = {s.name: s for s in (SD15, SD21, SDXL)}
# The tiny profile's bases (dreamcache/tiny.py): the real layouts at toy width. tiny:sd21 is the v-prediction
# member of the SD 2 family (its VAE scale is set when it is built), so its checkpoint's configs are read.
TINY = {"tiny:sd15": replace(SD15, name="tiny:sd15", checkpoint="tiny:sd15", unet_config=None, resolution=32),
        "tiny:sd21": replace(SD21, name="tiny:sd21", checkpoint="tiny:sd21", unet_config=None, resolution=32,
                             prediction_type="v_prediction"),
        "tiny:sdxl": replace(SDXL, name="tiny:sdxl", checkpoint="tiny:sdxl", unet_config=None, resolution=64,
                             vae_scale=0.18215)}
FAMILIES = {"StableDiffusionPipeline": SD15, "StableDiffusionXLPipeline": SDXL}  # model_index.json's _class_name


def base_spec(base: str) -> BaseSpec:
    """The spec of ``base``: a name in SPECS, a tiny model, or any diffusers checkpoint of a known family (a hub
    id or a folder, told apart by its model_index.json), with that family's defaults."""
    if base in SPECS:
        return SPECS[base]
    if base in TINY:
        return TINY[base]
    family = FAMILIES.get(_pipeline_class(base))
    if family is None:
        raise ValueError(f"base model {base!r}: not a Stable Diffusion 1.x/2.x or SDXL checkpoint (its "
                         f"model_index.json names {_pipeline_class(base)!r}); bases: {', '.join(SPECS)}, or a "
                         "diffusers folder of one of those families")
    config = _local_unet_config(base)
    layers = default_layers(config) if config else family.layers
    return replace(family, name=base, checkpoint=base, unet_config=None, layers=layers)


def default_layers(unet_config: dict) -> tuple[str, ...]:
    """The official code's rule on any U-Net: its transformers counted over the whole U-Net (encoder, mid block,
    decoder), and the mid block's with every decoder one of even count. It gives SD_LAYERS on SD 1.x/2.x and
    SDXL_LAYERS on SDXL, and the same rule on a checkpoint of another layout (the small world's base)."""
    count = 0
    per_block = unet_config["layers_per_block"]
    n = len(unet_config["down_block_types"])
    per_block = per_block if isinstance(per_block, (list, tuple)) else [per_block] * n
    for i, kind in enumerate(unet_config["down_block_types"]):
        if "CrossAttn" in kind:
            count += per_block[i]
    layers = []
    mid = unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn")  # None: the U-Net has no mid block
    if mid and "CrossAttn" in mid:
        layers.append("mid_block.attentions.0")
        count += 1
    for i, kind in enumerate(unet_config["up_block_types"]):
        if "CrossAttn" not in kind:
            continue
        for j in range(list(reversed(per_block))[i] + 1):
            if count % 2 == 0:
                layers.append(f"up_blocks.{i}.attentions.{j}")
            count += 1
    return tuple(layers)


@functools.cache
def _local_unet_config(base: str) -> dict | None:
    """The U-Net config of a local checkpoint folder; None for a hub id (its family's layers hold)."""
    from dreamcache.models import resolve

    path = Path(resolve(base)).expanduser() / "unet" / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


@functools.cache  # base_spec is asked often; a hub id's file is looked up once
def _pipeline_class(base: str) -> str | None:
    from dreamcache.models import resolve

    path = Path(resolve(base)).expanduser()
    try:
        if path.is_dir():
            index = path / "model_index.json"
        else:  # a hub id: from the local cache, or the hub when it can be reached
            from huggingface_hub import hf_hub_download

            index = Path(hf_hub_download(base, "model_index.json"))
        return json.loads(index.read_text()).get("_class_name")
    except Exception as e:  # not a diffusers pipeline folder, not downloadable: the same answer for the user
        raise ValueError(f"base model {base!r}: cannot read its model_index.json ({type(e).__name__}); give one of "
                         f"{', '.join(SPECS)}, or a diffusers pipeline folder or hub id") from None


def checkpoint(base: str) -> str:
    """The hub id or reference that ``base`` names, unresolved (for messages and availability checks)."""
    return SPECS[base].checkpoint if base in SPECS else base


def check_base(base: str) -> None:
    """The base model is there (a known name, a folder, or in the Hugging Face cache) and of a family the
    toolkit knows; else a clear error naming --base."""
    from dreamcache.models import check_available

    check_available(checkpoint(base), None, f"base model ({base})", "--base")
    base_spec(base)


def resolve_base(base: str) -> str:
    """The local folder or hub id of ``base``'s weights."""
    return base_spec(base).path()


def native_resolution(sample_size: int, vae) -> int:
    """A loaded checkpoint's image size: its U-Net's sample size times the VAE's spatial reduction."""
    return sample_size * 2 ** (len(vae.config.block_out_channels) - 1)


# The U-Net config entries that make two U-Nets one network (its blocks, widths, heads, projections and
# conditioning), a fixed list so that the hash does not change when diffusers adds a config field. The sample
# size is not among them: the resolution the adapters were trained at is recorded and checked on its own.
ARCHITECTURE = ("in_channels", "out_channels", "down_block_types", "mid_block_type", "up_block_types",
                "block_out_channels", "layers_per_block", "transformer_layers_per_block",
                "reverse_transformer_layers_per_block", "attention_head_dim", "num_attention_heads",
                "cross_attention_dim", "use_linear_projection", "only_cross_attention", "upcast_attention",
                "dual_cross_attention", "attention_type", "norm_num_groups", "act_fn", "addition_embed_type",
                "addition_time_embed_dim", "projection_class_embeddings_input_dim", "class_embed_type",
                "encoder_hid_dim", "encoder_hid_dim_type", "time_cond_proj_dim", "time_embedding_type",
                "resnet_time_scale_shift", "conv_in_kernel", "conv_out_kernel")


@dataclass(frozen=True)
class BaseIdentity:
    """Which base model adapters belong to, as an adapter file records it (``base_*`` metadata). Two bases are
    the same for the adapters when family, text width and architecture agree; the checkpoint is recorded and
    named in messages but not compared, so a fine-tune of the same architecture takes the same adapters."""

    family: str  # "sd" (SD 1.x/2.x) or "sdxl" (added text-time conditioning)
    text_width: int  # the U-Net's cross_attention_dim: 768 on SD 1.x, 1024 on SD 2.x, 2048 on SDXL
    unet: str  # sha256 (16 hex digits) of the U-Net config's ARCHITECTURE entries
    checkpoint: str | None = None  # hub id, tiny:<name> or folder, where known

    KEYS = ("family", "text_width", "unet")  # what must agree

    @classmethod
    def of(cls, unet_config, base: str | None = None) -> "BaseIdentity":
        """The identity of a U-Net (its config) loaded from ``base`` (a name in SPECS, a tiny model, a hub id or
        folder; None where unknown)."""
        arch = json.dumps({k: unet_config.get(k) for k in ARCHITECTURE}, sort_keys=True)
        family = "sdxl" if unet_config.get("addition_embed_type") == "text_time" else "sd"
        return cls(family, int(unet_config["cross_attention_dim"]), hashlib.sha256(arch.encode()).hexdigest()[:16],
                   checkpoint(base) if base else None)

    def metadata(self) -> dict[str, str]:
        meta = {"base_family": self.family, "base_text_width": str(self.text_width), "base_unet_sha256": self.unet}
        return {**meta, "base_checkpoint": self.checkpoint} if self.checkpoint else meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> "BaseIdentity | None":
        """The identity an adapter file records; None for files written before identities were recorded."""
        if not {"base_family", "base_text_width", "base_unet_sha256"} <= set(meta):
            return None
        return cls(meta["base_family"], int(meta["base_text_width"]), meta["base_unet_sha256"],
                   meta.get("base_checkpoint"))

    def differences(self, other: "BaseIdentity") -> list[str]:
        """The fields (of KEYS) in which ``other`` is another base."""
        return [k for k in self.KEYS if getattr(self, k) != getattr(other, k)]

    def __str__(self) -> str:
        return (f"{self.checkpoint or 'an unnamed checkpoint'} (family {self.family}, text width {self.text_width}, "
                f"U-Net architecture {self.unet})")


def build_unet(base: str, random_init: bool, device: str = "cpu"):
    """``base``'s U-Net (see ``BaseSpec.build_unet``)."""
    return base_spec(base).build_unet(random_init, device)
