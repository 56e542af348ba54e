"""Personalised generation: a diffusers ``StableDiffusionPipeline`` with the DreamCache adapters loaded.

    pipe = DreamCachePipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    pipe.load_adapters("runs/sd15/adapters.safetensors")
    cache = pipe.cache_reference(Image.open("dog_on_white.png"))      # once per subject (paper sec. 3.1)
    image = pipe("a dog in the snow", cache=cache).images[0]          # joint guidance, 50 steps, scale 7.5
    image = pipe("a dog in the snow").images[0]                       # no cache: the base pipeline, unchanged

Guidance (paper S4), with e(z, image, text) the U-Net's prediction:
    joint:     e(z,0,0) + s (e(z,I,T) - e(z,0,0))
    combined:  e(z,0,0) + s_I (e(z,I,0) - e(z,0,0)) + s_T (e(z,I,T) - e(z,I,0))
The conditions are rows of one batched U-Net call; a row "without the image" has its adapters switched off
(the ``active`` mask), so it computes exactly the base model's prediction.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from PIL import Image

from dreamcache.bases import resolve_base
from dreamcache.images import to_tensor
from dreamcache.sampling import (DEFAULT_GUIDANCE, GUIDANCE, IMAGE_SCALE, STEPS, TEXT_SCALE,  # noqa: F401
                                 combined_guidance, joint_guidance)
from dreamcache.store import write_file_atomic
from dreamcache.adapter import FORMAT as ADAPTER_FORMAT
from dreamcache.adapter import (CACHE_PROMPT, DEFAULT_FUSION, FUSIONS, REFERENCE_TIMESTEP, adapter_modules,
                              cache_prompt, cached, install_adapters, load_adapter_state, reference_features,
                              remove_adapters)

CACHE_FORMAT = "dreamcache-cache/1"
CACHE_DTYPE = torch.float16


def noun_phrase(noun: str) -> str:
    """"dog" -> "a dog", "apple" -> "an apple"; a phrase that already has its determiner is kept. The pipeline's
    subjects are phrases like "a red teapot", and a caching prompt's {subject} expects one."""
    noun = noun.strip()
    if noun.split(" ", 1)[0].lower() in {"a", "an", "the", "my", "this", "some"}:
        return noun
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def read_safetensors(path: str | Path, what: str, remedy: str,
                     tensors: bool = True) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file; a missing, truncated or foreign file is a ValueError (or
    FileNotFoundError) that names it and says ``remedy``."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise FileNotFoundError(f"no {what} at {path}: {remedy}")
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {}), ({k: f.get_tensor(k) for k in f.keys()} if tensors else {})
    except Exception as e:  # safetensors raises its own error type for every kind of damage
        raise ValueError(f"{path} is not a readable {what} ({type(e).__name__}: {e}; truncated or not a safetensors "
                         f"file?): {remedy}") from None


def adapter_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of an adapter file written by the trainer (base, layers, dims, step, config hash)."""
    meta, _ = read_safetensors(path, "adapter file", "train one with training/train.py (it writes "
                               "OUT/adapters.safetensors)", tensors=False)
    if meta.get("format") == "dreamcache-adapters/1":
        raise ValueError(f"{path} holds adapters of an earlier format (dreamcache-adapters/1, without the query "
                         "LayerNorm); train them again with training/train.py")
    if meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path} is not a DreamCache adapter file (format {meta.get('format')!r})")
    if meta.setdefault("fusion", DEFAULT_FUSION) not in FUSIONS:
        raise ValueError(f"{path} holds adapters of fusion {meta['fusion']!r}, which this version does not know "
                         f"(it knows {', '.join(FUSIONS)})")
    return meta


@dataclass
class ReferenceCache:
    """One subject's cached features: {layer: (1, M, C)} plus where they came from."""

    features: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)  # base, layers, adapters, adapters_sha256, resolution

    def save(self, path: str | Path) -> None:
        """Writes the cache through a temporary file: an existing cache is replaced only by a complete one."""
        from safetensors.torch import save

        data = save({k: v.detach().to("cpu", CACHE_DTYPE).contiguous() for k, v in self.features.items()},
                    metadata={"format": CACHE_FORMAT, **self.metadata})
        write_file_atomic(path, data)

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceCache":
        metadata, features = read_safetensors(path, "feature cache", "make it again with `dreamcache personalize`")
        if metadata.get("format") != CACHE_FORMAT:
            raise ValueError(f"{path} is not a DreamCache feature cache (format {metadata.get('format')!r})")
        metadata.pop("format")
        return cls(features, metadata)


class DreamCachePipeline(StableDiffusionPipeline):
    """``StableDiffusionPipeline`` plus ``load_adapters``, ``cache_reference`` and ``cache=`` in ``__call__``."""

    adapters_metadata: dict[str, str] | None = None

    def load_adapters(self, path: str | Path) -> dict[str, str]:
        """Installs the adapters saved by the trainer (their layers come from the file) and loads their weights."""
        meta = adapter_metadata(path)
        _, state = read_safetensors(path, "adapter file", "train it again with training/train.py")
        trained = int(meta.get("resolution") or self.resolution)  # the trainer records it; other writers may not
        if trained != self.resolution:
            raise ValueError(f"{path} was trained at {trained} px on {meta.get('base', 'another base')}; this base "
                             f"model works at {self.resolution} px. Use the base the adapters were trained on.")
        if self.adapters_metadata is not None:
            remove_adapters(self.unet)
        install_adapters(self.unet, tuple(json.loads(meta["layers"])), meta["fusion"])
        load_adapter_state(self.unet, state)
        for proc in adapter_modules(self.unet).values():  # adapters in the U-Net's inference dtype and device
            proc.to(device=self.unet.device, dtype=self.unet.dtype)
        self.adapters_metadata = {**meta, "adapters": str(path), "adapters_sha256": file_sha256(path)}
        return self.adapters_metadata

    def use_installed_adapters(self, label: str, recipe: dict[str, str] | None = None) -> None:
        """For adapters already on ``self.unet`` (the trainer's): ``label`` stands in for the file's hash and
        ``recipe`` for the file's caching metadata (cache_timestep, cache_prompt)."""
        if not adapter_modules(self.unet):
            raise RuntimeError("the U-Net has no DreamCache adapters installed")
        self.adapters_metadata = {**(recipe or {}), "adapters_sha256": label, "fusion": self.unet.dreamcache_fusion}

    @property
    def resolution(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    @torch.no_grad()
    def cache_reference(self, image: Image.Image, seed: int = 0, subject: str | None = None,
                        caption: str | None = None) -> ReferenceCache:
        """Caches a reference that is already the subject on white (``dreamcache personalize`` segments one):
        resized to the model's resolution, VAE mean, noised to the timestep the adapters were trained with (t=1
        unless their metadata says otherwise), one U-Net pass with the prompt they were trained with (the empty
        one unless their ``cache_prompt`` template asks for the reference's ``subject`` phrase, "a dog", or
        its ``caption``, by default the subject)."""
        self._require_adapters()
        device, size = self._execution_device, self.resolution
        x = to_tensor(image, size)[None].to(device, self.vae.dtype)
        latents = self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
        prompt = cache_prompt(self.adapters_metadata.get("cache_prompt", CACHE_PROMPT), subject,
                              subject if caption is None else caption)
        text = self.encode_prompt([prompt], device, 1, False)[0]
        layers = self.unet.dreamcache_layers
        timestep = int(self.adapters_metadata.get("cache_timestep", REFERENCE_TIMESTEP))
        # Kept in fp16, the precision the cache file stores: a cache used straight away and one saved and loaded
        # again generate the same images.
        features = {k: v.to(CACHE_DTYPE) for k, v in
                    reference_features(self.unet, layers, self.scheduler, latents, noise, text, timestep).items()}
        meta = {k: self.adapters_metadata[k] for k in ("base", "adapters", "adapters_sha256") if k in self.adapters_metadata}
        return ReferenceCache(features, {**meta, "layers": json.dumps(list(layers)), "resolution": str(size),
                                         "seed": str(seed), "cache_timestep": str(timestep), "cache_prompt": prompt})

    def _require_adapters(self) -> None:
        if self.adapters_metadata is None:
            raise RuntimeError("no adapters loaded: call pipe.load_adapters(path) first")

    def check_cache(self, cache: ReferenceCache) -> None:
        self._require_adapters()
        want = cache.metadata.get("adapters_sha256")
        have = self.adapters_metadata["adapters_sha256"]
        if want and want != have:
            raise ValueError(f"the cache was made with other adapters (sha256 {want}, loaded {have}); "
                             f"personalize again with these adapters")
        missing = set(self.unet.dreamcache_layers) - set(cache.features)
        if missing:
            raise ValueError(f"the cache lacks layers {sorted(missing)} that the loaded adapters read")

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, *, cache: ReferenceCache | None = None,
                 guidance: str = DEFAULT_GUIDANCE, guidance_scale: float = TEXT_SCALE,
                 image_guidance_scale: float = IMAGE_SCALE, num_inference_steps: int = STEPS, num_images_per_prompt: int = 1, height: int | None = None,
                 width: int | None = None, negative_prompt: str | list[str] | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, latents: torch.Tensor | None = None,
                 eta: float = 0.0, output_type: str = "pil", **kwargs):
        """Without ``cache`` this is ``StableDiffusionPipeline.__call__`` (the adapters stay inactive). With it,
        ``guidance`` picks joint (``guidance_scale``) or combined (``image_guidance_scale`` and
        ``guidance_scale`` as the text scale)."""
        if cache is None:
            return super().__call__(prompt, height=height, width=width, num_inference_steps=num_inference_steps,
                                    guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                                    num_images_per_prompt=num_images_per_prompt, generator=generator,
                                    latents=latents, eta=eta, output_type=output_type, **kwargs)
        if guidance not in GUIDANCE:
            raise ValueError(f"guidance must be one of {', '.join(GUIDANCE)}, not {guidance!r}")
        if kwargs:
            raise TypeError(f"unsupported arguments with a cache: {', '.join(sorted(kwargs))}")
        self.check_cache(cache)
        device = self._execution_device
        height, width = height or self.resolution, width or self.resolution
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        text, null = self.encode_prompt(prompts, device, num_images_per_prompt, True, negative_prompt)
        B = text.shape[0]
        # Rows of one U-Net call: (text, image on?) per condition, in the order the guidance formula takes them.
        rows = [(null, False), (text, True)] if guidance == "joint" else [(null, False), (null, True), (text, True)]
        k = len(rows)
        embeds = torch.cat([t for t, _ in rows])
        active = torch.tensor([on for _, on in rows for _ in range(B)], device=device)
        features = {layer: f.to(device, self.unet.dtype).expand(k * B, -1, -1) for layer, f in cache.features.items()
                    if layer in self.unet.dreamcache_layers}
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self.prepare_latents(B, self.unet.config.in_channels, height, width, text.dtype, device, generator,
                                       latents)
        extra = self.prepare_extra_step_kwargs(generator, eta)
        with cached(self.unet, features, active):
            for t in self.progress_bar(self.scheduler.timesteps):
                x = self.scheduler.scale_model_input(torch.cat([latents] * k), t)
                e = self.unet(x, t, encoder_hidden_states=embeds).sample.chunk(k)
                if guidance == "joint":
                    e = joint_guidance(e[0], e[1], guidance_scale)
                else:
                    e = combined_guidance(e[0], e[1], e[2], image_guidance_scale, guidance_scale)
                latents = self.scheduler.step(e, t, latents, **extra).prev_sample
        if output_type == "latent":
            return StableDiffusionPipelineOutput(images=latents, nsfw_content_detected=None)
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=[True] * B)
        self.maybe_free_model_hooks()
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=None)


def load_pipeline(base: str, adapters: str | Path | None = None, device: str | None = None,
                  dtype: torch.dtype | None = None, sampler: str = "ddim") -> DreamCachePipeline:
    """The base model (``sd15``, ``sd21``, a hub id, a local folder or ``tiny:sd15``) as a DreamCachePipeline,
    with the adapters loaded when a file is given. fp16 on GPU, fp32 on CPU, unless ``dtype`` says otherwise.
    ``sampler``: "ddim" (the paper's: DDIM, eta 0 unless a call says otherwise) or "model" (the checkpoint's
    own scheduler)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    path = resolve_base(base)
    pipe = DreamCachePipeline.from_pretrained(path, dtype=dtype, safety_checker=None,
                                              requires_safety_checker=False)
    if sampler == "ddim":
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    elif sampler != "model":
        raise ValueError(f"sampler must be 'ddim' or 'model', not {sampler!r}")
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if adapters is not None:
        pipe.load_adapters(adapters)
    return pipe
