"""Personalised generation: a diffusers pipeline (SD 1.x/2.x or SDXL) with the DreamCache adapters loaded.

    pipe = load_pipeline("sd15", "runs/sd15/adapters.safetensors")    # DreamCachePipeline; "sdxl": DreamCacheXLPipeline
    cache = pipe.cache_reference(Image.open("dog_on_white.png"))      # once per subject (paper sec. 3.1)
    image = pipe("a dog in the snow", cache=cache).images[0]          # joint guidance, 50 steps, scale 7.5
    image = pipe("a dog in the snow").images[0]                       # no cache: the base pipeline, unchanged

Guidance (paper S4), with e(z, image, text) the U-Net's prediction:
    joint:     e(z,0,0) + s (e(z,I,T) - e(z,0,0))
    combined:  e(z,0,0) + s_I (e(z,I,0) - e(z,0,0)) + s_T (e(z,I,T) - e(z,I,0))
With a cache the stock pipeline's ``__call__`` runs, denoising loop, callbacks and all; only its U-Net calls are
changed, by ``GuidedUNet``'s hooks on the U-Net for the call's duration: they run the conditions as rows of one
batched call (a row "without the image" has its adapters off, so it computes exactly the base model's
prediction) and hand the stock classifier-free guidance the two rows that it turns into the formula.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from PIL import Image

from dreamcache.bases import BaseIdentity, base_spec
from dreamcache.conditioning import Condition
from dreamcache.images import to_tensor
from dreamcache.models import default_device
from dreamcache.sampling import (DEFAULT_GUIDANCE, GUIDANCE, IMAGE_SCALE, STEPS, TEXT_SCALE,  # noqa: F401
                                 combined_as_cfg, combined_guidance, joint_guidance)
from dreamcache.hub import locate_adapters, pinned
from dreamcache.store import write_file_atomic
from dreamcache.adapter import FORMAT as ADAPTER_FORMAT
from dreamcache.adapter import (CACHE_KEY, CACHE_PROMPT, DEFAULT_FUSION, FUSIONS, REFERENCE_TIMESTEP, CacheInputs,
                                adapter_modules, cache_prompt, forward_process, install_adapters,
                                load_adapter_state, reference_features, remove_adapters)

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
    """The metadata of an adapter file written by the trainer (base, layers, dims, step, config hash); ``path``: a
    file, a folder holding one, or a Hugging Face repo id (``hub.locate_adapters``)."""
    path = locate_adapters(path)
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


def image_sha256(image: Image.Image) -> str:
    """A short hash of an image's pixels (RGB, with its size): which reference a cache holds."""
    rgb = image.convert("RGB")
    return hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()[:16]


# What must agree for caches to be merged: the same adapters read them, and they were made the same way.
MERGE_KEYS = ("adapters_sha256", "layers", "resolution", "cache_timestep")


@dataclass
class ReferenceCache:
    """One subject's cached features: {layer: (1, K x M, C)}, the tokens of its K references one after the other
    (the adapters attend over their union at each layer), plus where they came from: base, adapters and their
    hash, layers, resolution, the caching timestep and prompt, and ``references`` (a JSON list, one
    ``{"name", "sha256"}`` per reference, the hash of its pixels as cached)."""

    features: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def references(self) -> list[dict[str, str]]:
        return json.loads(self.metadata.get("references", "[]"))

    @classmethod
    def concat(cls, caches: list["ReferenceCache"]) -> "ReferenceCache":
        """Several caches of one subject as one (their references' tokens concatenated at each layer), as if
        its references had been cached together. They must come from the same adapters and caching recipe."""
        if not caches:
            raise ValueError("no caches to merge")
        for key in MERGE_KEYS:
            values = [c.metadata.get(key) for c in caches]
            if len(set(values)) > 1:
                raise ValueError(f"caches made with different {key} ({', '.join(map(str, values))}) cannot be "
                                 "merged: personalize every reference with the same adapters")
        first = caches[0]
        if any(set(c.features) != set(first.features) for c in caches):
            raise ValueError("caches of different layers cannot be merged")
        features = {k: torch.cat([c.features[k] for c in caches], dim=1) for k in first.features}
        metadata = {**first.metadata, "references": json.dumps([r for c in caches for r in c.references])}
        for key in ("seed", "cache_prompt"):  # one value if they agree, else one per cache
            values = [c.metadata.get(key) for c in caches]
            if len(set(values)) > 1:
                metadata[key] = json.dumps(values)
        return cls(features, metadata)

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


_GUIDED: weakref.WeakSet = weakref.WeakSet()  # the U-Nets in a call with a cache now
RECOMPILE_LIMIT = 64  # the layouts (graphs) a compiled sampling U-Net may have


def _own_output(module, args, output):
    """The U-Net's prediction in memory of its own: a CUDA graph's output is overwritten by its next replay, and
    a scheduler may keep a prediction longer (PNDM's and multistep solvers' history)."""
    if isinstance(output, UNet2DConditionOutput):
        return UNet2DConditionOutput(sample=output.sample.clone())
    return (output[0].clone(), *output[1:])


class GuidedUNet:
    """Hooks on the pipeline's own U-Net for one call with a cache: the stock denoising loop, and anything that
    looks at ``pipe.unet`` meanwhile (model CPU offload's hooks, callbacks), sees the U-Net itself. The loop's
    classifier-free guidance calls it with 2B rows, (uncond, text), and combines them as u + s (c - u):

    joint     one call with the cache active on the text rows: u = e(z,0,0), c = e(z,I,T), the formula itself;
    combined  one call of 3B rows, (uncond, no image), (uncond, image), (text, image), turned into the pair
              ``combined_as_cfg`` gives, whose guidance is the combined formula (to float rounding).

    Without guidance (a scale <= 1) the loop calls with the B text rows, all with the image (joint only).

        with GuidedUNet(unet, features, "joint", 1.0, 7.5, guided=lambda: True):
            ...  # every unet(...) call in here reads the cache
    """

    def __init__(self, unet, features: dict[str, torch.Tensor], guidance: str, image_scale: float,
                 text_scale: float, guided, attention=None):
        self.unet, self.features, self.guidance, self.attention = unet, features, guidance, attention
        self.image_scale, self.text_scale, self.guided = image_scale, text_scale, guided  # guided(): 2B rows?
        self.module = getattr(unet, "_orig_mod", unet)  # the U-Net itself, compiled (torch.compile) or not
        self.signature = inspect.signature(type(self.module).forward)
        self.handles: list = []
        self.combine: list[bool] = []  # per call in flight: turn its 3B rows into the guided pair

    def __enter__(self) -> "GuidedUNet":
        if self.module in _GUIDED:  # pipelines may share a U-Net (from_pipe, from_modules): one cached call at a time
            raise RuntimeError("this U-Net is in a call with a cache already (another thread, or a pipeline sharing "
                               "it): one cached call per U-Net at a time; give each thread a pipeline of its own")
        _GUIDED.add(self.module)
        self.handles = [self.unet.register_forward_pre_hook(self._before, with_kwargs=True),
                        self.unet.register_forward_hook(self._after, with_kwargs=True)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.combine = [], []
        _GUIDED.discard(self.module)

    def _before(self, module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        call = self.signature.bind(module, *args, **kwargs).arguments
        call.pop("self")
        n, device = len(call["sample"]), call["sample"].device
        combine = self.guided() and self.guidance == "combined"
        if not self.guided():
            if self.guidance == "combined":
                raise ValueError("combined guidance needs the pipeline's classifier-free guidance (guidance_scale > 1)")
            rows, image_of = None, (lambda r: r)
        elif self.guidance == "joint":  # the text rows, the second half, see the image
            rows, image_of = slice(n // 2, n), (lambda r: r - n // 2)
        else:
            B = n // 2
            pick = torch.cat([torch.arange(B, device=device), torch.arange(n, device=device)])  # uncond twice, text
            take = lambda v: v[pick] if torch.is_tensor(v) and v.dim() > 0 and len(v) == n else v  # noqa: E731
            call = {k: ({a: take(b) for a, b in v.items()} if isinstance(v, dict) and k != "cross_attention_kwargs"
                        else take(v)) for k, v in call.items()}  # sample, timestep, added_cond_kwargs (SDXL), ...
            rows = slice(B, 3 * B)
            image_of = lambda r: r - 2 * B if r >= 2 * B else None  # noqa: E731 - the (text, image) rows
        record = self.attention.recorder(image_of) if self.attention is not None else None
        call["cross_attention_kwargs"] = {**(call.get("cross_attention_kwargs") or {}),
                                          CACHE_KEY: CacheInputs(self.features, rows, attention=record)}
        self.combine.append(combine)
        return (), call

    def _after(self, module, args: tuple, kwargs: dict, output):
        if not self.combine.pop():
            return output
        e00, eI0, eIT = (output.sample if isinstance(output, UNet2DConditionOutput) else output[0]).chunk(3)
        e = torch.cat(combined_as_cfg(e00, eI0, eIT, self.image_scale, self.text_scale))
        return UNet2DConditionOutput(sample=e) if isinstance(output, UNet2DConditionOutput) else (e, *output[1:])


class DreamCacheMixin:
    """``load_adapters``, ``cache_reference`` and ``cache=`` in ``__call__`` for a diffusers text-to-image
    pipeline (as diffusers' loader mixins add IP-Adapters to SD and SDXL alike). The pipeline class supplies
    what differs between bases: ``encode`` (prompts -> ``Condition``), ``null_condition`` and
    ``encode_image``; generation is the stock ``__call__``."""

    adapters_metadata: dict[str, str] | None = None
    base_name: str | None = None  # the base it was loaded as (load_pipeline): the checkpoint its identity names
    EXTRA_COMPONENTS: dict = {}  # what from_pretrained and from_modules add (SD: no safety checker)

    def register_modules(self, **modules):
        """diffusers' own; the first scheduler registered is kept for ``noise_schedule``."""
        super().register_modules(**modules)
        if modules.get("scheduler") is not None and "_first_scheduler" not in self.__dict__:
            self._first_scheduler = modules["scheduler"]

    @property
    def noise_schedule(self):
        """DDPM's forward process on the checkpoint's betas, which the caching pass noises with as the trainer
        does: from the checkpoint's own ``scheduler/`` config where the pipeline was loaded from a folder that
        has one (whatever sampler was passed or swapped in), else from the first scheduler it was built with."""
        if "_noise_schedule" not in self.__dict__:
            from diffusers import DDPMScheduler

            source = getattr(self.config, "_name_or_path", None)
            own = source and (Path(source) / "scheduler" / "scheduler_config.json").is_file()
            self._noise_schedule = (DDPMScheduler.from_pretrained(source, subfolder="scheduler") if own
                                    else forward_process(self._first_scheduler))
        return self._noise_schedule

    @classmethod
    def from_modules(cls, scheduler, **modules):
        """The pipeline over modules already built (the trainer's, the benchmarks' random ones): no copies."""
        return cls(**modules, scheduler=scheduler, **cls.EXTRA_COMPONENTS)

    @property
    def eager_unet(self):
        """The U-Net module itself, also after ``compile`` (when ``self.unet`` is its compiled wrapper): what the
        adapters are installed on, and what the caching pass runs (eagerly: it ends by raising)."""
        return getattr(self.unet, "_orig_mod", self.unet)

    def compile(self, mode: str | None = None, backend: str = "inductor") -> None:
        """``torch.compile`` of the sampling loop's U-Net, adapters included, at fixed shapes: one graph per
        layout (guidance and its rows per image, images per prompt, references per cache; the base model without a
        cache is one more), which every step and every later call with that layout reuses, whatever the prompt,
        seed, step count or cache. Up to ``RECOMPILE_LIMIT`` layouts (dynamo's own limit, 8, would leave the next
        ones eager). ``mode``: torch.compile's ("reduce-overhead" and "max-autotune" replay the U-Net's call as a
        CUDA graph). The U-Net's output is copied, one latent per row and step: a CUDA graph's is overwritten by its
        next replay, and a scheduler may keep it longer. The caching pass and attention maps run on the U-Net
        itself (``eager_unet``); ``load_adapters`` installs on it, and adapters of the same layers and fusion
        reuse the graphs (their weights are inputs; CUDA graphs are recorded again). The VAE stays eager: it
        decodes once per image, the U-Net once a step."""
        self.unet = torch.compile(self.eager_unet, mode=mode, backend=backend, dynamic=False,
                                  recompile_limit=RECOMPILE_LIMIT)
        self.unet.register_forward_hook(_own_output)

    def base_identity(self) -> BaseIdentity:
        return BaseIdentity.of(self.unet.config, self.base_name or getattr(self.config, "_name_or_path", None))

    def load_adapters(self, path: str | Path, allow_other_base: bool = False) -> dict[str, str]:
        """Installs the adapters saved by the trainer (their layers come from the file) and loads their weights.
        ``path``: the file, a folder holding ``adapters.safetensors`` (a run's --out, an export), or a Hugging Face
        repo id ("org/name[@revision]", through the huggingface_hub cache).
        Adapters of another base (family, text width or U-Net architecture, as the file records them) or
        resolution are refused unless ``allow_other_base``."""
        given, path = path, locate_adapters(path)
        meta = adapter_metadata(path)
        _, state = read_safetensors(path, "adapter file", "train it again with training/train.py")
        if not allow_other_base:
            self._check_base(path, meta)
        unet = self.eager_unet
        if getattr(unet, "dreamcache_layers", None) is not None:  # adapters loaded before: replaced
            remove_adapters(unet)
        install_adapters(unet, tuple(json.loads(meta["layers"])), meta["fusion"])
        load_adapter_state(unet, state)
        for proc in adapter_modules(unet).values():  # adapters in the U-Net's inference dtype and device
            proc.to(device=unet.device, dtype=unet.dtype)
        self.adapters_metadata = {**meta, "adapters": pinned(given, path), "adapters_sha256": file_sha256(path)}
        return self.adapters_metadata

    def _check_base(self, path: str | Path, meta: dict[str, str]) -> None:
        anyway = "or pass allow_other_base=True (--allow-other-base) to try them on this one"
        trained, here = BaseIdentity.from_metadata(meta), self.base_identity()
        differ = trained.differences(here) if trained is not None else []  # older files: the resolution alone
        if differ:
            words = {"family": "family", "text_width": "text width", "unet": "U-Net architecture"}
            raise ValueError(f"{path} holds adapters trained on {trained}; this pipeline's base is {here}, another "
                             f"{', '.join(words[k] for k in differ)}. Load them on the base they were trained on "
                             f"(--base {trained.checkpoint or meta.get('base')}), {anyway}.")
        resolution = int(meta.get("resolution") or self.resolution)  # the trainer records it; other writers may not
        if resolution != self.resolution:
            raise ValueError(f"{path} was trained at {resolution} px on {meta.get('base', 'another base')}; this base "
                             f"model works at {self.resolution} px. Use the base the adapters were trained on, {anyway}.")

    def use_installed_adapters(self, label: str, recipe: dict[str, str] | None = None) -> None:
        """For adapters already on ``self.unet`` (the trainer's): ``label`` stands in for the file's hash and
        ``recipe`` for the file's caching metadata (cache_timestep, cache_prompt)."""
        if not adapter_modules(self.eager_unet):
            raise RuntimeError("the U-Net has no DreamCache adapters installed")
        self.adapters_metadata = {**(recipe or {}), "adapters_sha256": label, "fusion": self.unet.dreamcache_fusion}

    @property
    def resolution(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    def null_condition(self) -> Condition:
        """One unconditional row: what the base's own guidance uses for "no text" (text dropout in training,
        the paper's empty caching prompt)."""
        raise NotImplementedError

    @torch.no_grad()
    def cache_reference(self, image: Image.Image | list[Image.Image], seed: int = 0, subject: str | None = None,
                        caption: str | None = None, names: list[str] | None = None) -> ReferenceCache:
        """Caches references that are already the subject on white (``dreamcache personalize`` segments them):
        each resized to the model's resolution, VAE mean, noised to the timestep the adapters were trained with
        (t=1 unless their metadata says otherwise) with the noise of ``seed``, one U-Net pass with the prompt
        they were trained with (the empty one unless their ``cache_prompt`` template asks for the reference's
        ``subject`` phrase, "a dog", or its ``caption``, by default the subject). Several images of one subject
        give one cache holding all their tokens: the same as caching each alone and ``ReferenceCache.concat``,
        bit for bit. ``names`` (default reference-0, ...) go into the cache's ``references`` record."""
        images = [image] if isinstance(image, Image.Image) else list(image)
        if not images:
            raise ValueError("no reference image to cache")
        names = list(names) if names is not None else [f"reference-{i}" for i in range(len(images))]
        if len(names) != len(images):
            raise ValueError(f"{len(names)} names for {len(images)} references")
        self._require_adapters()
        prompt = cache_prompt(self.adapters_metadata.get("cache_prompt", CACHE_PROMPT), subject,
                              subject if caption is None else caption)
        condition = self.null_condition() if prompt == "" else self.encode([prompt])  # one for every reference
        caches = [self._cache_one(im, seed, prompt, condition, name) for im, name in zip(images, names)]
        return caches[0] if len(caches) == 1 else ReferenceCache.concat(caches)

    def _cache_one(self, image: Image.Image, seed: int, prompt: str, condition: Condition,
                   name: str) -> ReferenceCache:
        device, size = self._execution_device, self.resolution
        latents = self.encode_image(to_tensor(image, size)[None].to(device))
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
        layers = self.unet.dreamcache_layers
        timestep = int(self.adapters_metadata.get("cache_timestep", REFERENCE_TIMESTEP))
        # Kept in fp16, the precision the cache file stores: a cache used straight away and one saved and loaded
        # again generate the same images.
        features = {k: v.to(CACHE_DTYPE) for k, v in
                    reference_features(self.eager_unet, layers, self.noise_schedule, latents, noise, condition, timestep).items()}
        meta = {k: self.adapters_metadata[k] for k in ("base", "adapters", "adapters_sha256") if k in self.adapters_metadata}
        return ReferenceCache(features, {**meta, "layers": json.dumps(list(layers)), "resolution": str(size),
                                         "seed": str(seed), "cache_timestep": str(timestep), "cache_prompt": prompt,
                                         "references": json.dumps([{"name": name, "sha256": image_sha256(image)}])})

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] -> the VAE's mean latents, scaled (the adapters' reference latents)."""
        return self.scale_latents(self.vae.encode(images.to(self.vae.dtype)).latent_dist.mean)

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the U-Net's latent space, the inverse of the stock pipeline's decoding (the trainer's
        targets and references go through it too)."""
        return z * self.vae.config.scaling_factor

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
                 image_guidance_scale: float = IMAGE_SCALE, num_inference_steps: int = STEPS, attention=None,
                 **kwargs):
        """The stock pipeline's ``__call__`` with the paper's defaults (50 steps, scale 7.5), and every other
        argument of it (callbacks, ``guidance_rescale``, ``timesteps``/``sigmas``, ``latents``, ``generator``,
        ``output_type``, ...). Without ``cache`` the adapters stay inactive: the base model, bit for bit. With
        it, ``guidance`` picks joint (``guidance_scale``) or combined (``image_guidance_scale``, and
        ``guidance_scale`` as the text scale, > 1). ``attention``: an ``attention.AttentionMaps`` that records
        where each image looks in the reference (the step callback advances its step count)."""
        kwargs.update(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        if cache is None:
            return super().__call__(prompt, **kwargs)
        if guidance not in GUIDANCE:
            raise ValueError(f"guidance must be one of {', '.join(GUIDANCE)}, not {guidance!r}")
        if guidance == "combined" and not guidance_scale > 1:
            raise ValueError(f"combined guidance needs a text scale (guidance_scale) > 1, got {guidance_scale}: the "
                             "stock loop guides only then; use joint guidance for lower scales")
        self.check_cache(cache)
        unet = self.unet
        features = {layer: f.to(self._execution_device, unet.dtype) for layer, f in cache.features.items()
                    if layer in unet.dreamcache_layers}  # (1, K x M, C) each, shared by every row
        if attention is not None:
            attention.references = max(1, len(cache.references))
            kwargs["callback_on_step_end"] = chain_step_end(attention.advance, kwargs.get("callback_on_step_end"))
            unet = self.eager_unet  # the maps are recorded by Python code at every adapter: not for a graph
        with GuidedUNet(unet, features, guidance, image_guidance_scale, guidance_scale,
                        lambda: self.do_classifier_free_guidance, attention), self._sampling_with(unet):
            return super().__call__(prompt, **kwargs)

    @contextmanager
    def _sampling_with(self, unet):
        """The stock loop calls ``self.unet``: ``unet`` (the eager U-Net of a compiled pipeline) for one call."""
        own = self.unet
        if unet is own:
            yield
            return
        self.unet = unet
        try:
            yield
        finally:
            self.unet = own


def chain_step_end(first, then=None):
    """A ``callback_on_step_end`` that calls ``first``, then the caller's own callback if there is one."""
    def step_end(pipe, step, timestep, callback_kwargs):
        callback_kwargs = first(pipe, step, timestep, callback_kwargs)
        return then(pipe, step, timestep, callback_kwargs) if then is not None else callback_kwargs
    return step_end


class DreamCachePipeline(DreamCacheMixin, StableDiffusionPipeline):
    """SD 1.x/2.x: ``StableDiffusionPipeline`` plus ``load_adapters``, ``cache_reference`` and ``cache=``.
    Without a cache it is the stock pipeline bit for bit."""

    EXTRA_COMPONENTS = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def encode(self, prompts: list[str], n: int = 1) -> Condition:
        return Condition(self.encode_prompt(prompts, self._execution_device, n, False)[0])

    def null_condition(self) -> Condition:
        return self.encode([""])  # the stock unconditional row without a negative prompt


class DreamCacheXLPipeline(DreamCacheMixin, StableDiffusionXLPipeline):
    """SDXL: ``StableDiffusionXLPipeline`` plus the same three. Prompts go through both text encoders, and
    every row carries the pooled text embedding and the size/crop ids (original = target = the image size,
    no crop) as the stock pipeline makes them; without a cache it is the stock pipeline bit for bit."""

    def _time_ids(self, rows: int, dtype: torch.dtype, size: tuple[int, int] | None) -> torch.Tensor:
        size = size or (self.resolution, self.resolution)
        ids = self._get_add_time_ids(size, (0, 0), size, dtype=dtype,
                                     text_encoder_projection_dim=self.text_encoder_2.config.projection_dim)
        return ids.to(self._execution_device).repeat(rows, 1)

    def encode(self, prompts: list[str], n: int = 1, size: tuple[int, int] | None = None) -> Condition:
        embeds, _, pooled, _ = self.encode_prompt(prompts, device=self._execution_device, num_images_per_prompt=n,
                                                  do_classifier_free_guidance=False)
        return Condition(embeds, {"text_embeds": pooled, "time_ids": self._time_ids(len(embeds), embeds.dtype, size)})

    def null_condition(self) -> Condition:
        # The stock unconditional row: zeros where the checkpoint says so (SDXL's force_zeros_for_empty_prompt).
        _, null, _, null_pooled = self.encode_prompt([""], device=self._execution_device, num_images_per_prompt=1,
                                                     do_classifier_free_guidance=True)
        return Condition(null, {"text_embeds": null_pooled, "time_ids": self._time_ids(1, null.dtype, None)})

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        upcast = self.vae.dtype == torch.float16 and self.vae.config.force_upcast  # SDXL's VAE overflows in fp16
        dtype = self.vae.dtype
        if upcast:
            self.vae.to(torch.float32)
        try:
            return self.scale_latents(self.vae.encode(images.to(self.vae.dtype)).latent_dist.mean).to(dtype)
        finally:
            if upcast:
                self.vae.to(dtype)

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """With the VAE's latents_mean/std where it has them: the inverse of the stock pipeline's decoding."""
        mean, std = getattr(self.vae.config, "latents_mean", None), getattr(self.vae.config, "latents_std", None)
        if mean is None or std is None:
            return z * self.vae.config.scaling_factor
        mean, std = (torch.tensor(v).view(1, -1, 1, 1).to(z) for v in (mean, std))
        return (z - mean) * self.vae.config.scaling_factor / std


PIPELINES = {"sd": DreamCachePipeline, "sdxl": DreamCacheXLPipeline}  # BaseSpec.family -> pipeline class


def load_pipeline(base: str, adapters: str | Path | None = None, device: str | None = None,
                  dtype: torch.dtype | None = None, sampler: str = "ddim",
                  allow_other_base: bool = False) -> DreamCacheMixin:
    """The base model (``sd15``, ``sd21``, ``sdxl``, a hub id, a local folder or ``tiny:sd15``) as the DreamCache
    pipeline of its family (``DreamCachePipeline``, ``DreamCacheXLPipeline``),
    with the adapters loaded when a file is given. fp16 on GPU, fp32 on CPU, unless ``dtype`` says otherwise.
    ``sampler``: "ddim" (the paper's: DDIM, eta 0 unless a call says otherwise) or "model" (the checkpoint's
    own scheduler). ``allow_other_base``: load adapters trained on another base anyway (``load_adapters``)."""
    device = device or default_device()
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    spec = base_spec(base)
    cls = PIPELINES[spec.family]
    pipe = cls.from_pretrained(spec.path(), dtype=dtype, **cls.EXTRA_COMPONENTS)
    if sampler == "ddim":
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    elif sampler != "model":
        raise ValueError(f"sampler must be 'ddim' or 'model', not {sampler!r}")
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    pipe.base_name = base
    if adapters is not None:
        pipe.load_adapters(adapters, allow_other_base=allow_other_base)
    return pipe
