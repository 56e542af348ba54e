"""What each ``dreamcache`` command takes: one frozen dataclass per command, the paper's values as defaults.

The flags (``--images-per-prompt``, ``--no-segment``), ``--config FILE.yaml``, ``--set field=value`` and
``--print-config`` are derived from these classes (dreamcache/config.py), and the Python API takes the same
objects: ``evaluate(EvalConfig(adapters=..., dreambooth=...))``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dreamcache.config import at_least, one_of
from dreamcache.sampling import DEFAULT_GUIDANCE, GUIDANCE, IMAGE_SCALE, PRESETS, STEPS, TEXT_SCALE

PROFILES = ("paper", "tiny")
SEGMENTERS = ("grounded", "key")  # dreamcache/segmenter.py: Grounding DINO + SAM, or the flat backdrop keyed out
COMPARE = ("all", "reference", "rest")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
TINY_METRICS = {"dino": "tiny:dino", "clip": "tiny:clip"}


@dataclass(frozen=True, kw_only=True)
class CommandConfig:
    """The options every command shares."""

    profile: str = field(default="paper", metadata={"choices": PROFILES})  # tiny: tiny random segmenter, DINO, CLIP
    base: str | None = None  # base model (sd15, sd21, sdxl, a hub id or folder); default: the adapters' own
    allow_other_base: bool = False  # load adapters trained on another base or resolution anyway (experiments)
    device: str | None = None  # cuda | cpu (default: cuda when available)

    def __post_init__(self):
        one_of(self, "profile", PROFILES)
        if isinstance(self, Compiled):
            one_of(self, "compile_mode", COMPILE_MODES)


@dataclass(frozen=True, kw_only=True)
class Compiled:
    """The options of the commands that sample many images: the sampling loop's U-Net compiled
    (``DreamCacheMixin.compile``), which pays off over hundreds of images, not a few."""

    compile: bool = False  # torch.compile the U-Net, adapters included, for sampling: minutes to compile, then faster
    # reduce-overhead: the U-Net's call replayed as a CUDA graph; max-autotune: the same, tuned (longer to compile)
    compile_mode: str = field(default="default", metadata={"choices": COMPILE_MODES})  # torch.compile's mode
    compile_backend: str = "inductor"  # torch.compile's backend (aot_eager: the eager kernels, no code generation)

    def compile_pipeline(self, pipe) -> None:
        if self.compile:
            pipe.compile(None if self.compile_mode == "default" else self.compile_mode, self.compile_backend)


@dataclass(frozen=True, kw_only=True)
class PersonalizeConfig(CommandConfig):
    """Segment a reference and cache its features once."""

    adapters: str  # adapters.safetensors written by training/train.py
    reference: tuple[str, ...]  # images of the subject: one, or several (--reference a.jpg --reference b.jpg)
    out: str  # where to write the feature cache (.safetensors)
    subject: str | None = None  # what to segment, e.g. 'dog' (Grounding DINO's text prompt)
    segment: bool = True  # --no-segment: the reference is already the subject on white
    # grounded: Grounding DINO finds --subject, SAM masks it; key: the subject stands on a flat backdrop of one
    # colour, which is keyed out (no model; the small world's references)
    segmenter: str = field(default="grounded", metadata={"choices": SEGMENTERS})
    caption: str | None = None  # for adapters trained with --cache-prompt '{caption}' (default: 'a SUBJECT')
    seed: int = 0  # seed of the caching pass's noise

    def __post_init__(self):
        super().__post_init__()
        at_least(self, 0, "seed")
        one_of(self, "segmenter", SEGMENTERS)
        if self.segment and self.segmenter == "grounded" and not self.subject:
            raise ValueError("--subject is required to segment the reference (e.g. --subject dog); pass --no-segment "
                             "if the reference is already the subject on white")


@dataclass(frozen=True, kw_only=True)
class GenerateConfig(CommandConfig, Compiled):
    """Images from a prompt and a feature cache."""

    cache: str  # a cache written by `dreamcache personalize`
    prompt: str | None = None  # one prompt (or --prompts)
    prompts: str | None = None  # a text file, one prompt per line: every prompt from one load of the models and cache
    out: str  # PNG path; with --n > 1, NAME-0.png, NAME-1.png, ...; with --prompts a folder: 000-SLUG[-i].png
    adapters: str | None = None  # default: the adapter file the cache was made with
    n: int = 1  # images to generate
    seed: int = 0
    steps: int = STEPS  # sampling steps (paper: 50, DDIM, eta 0)
    guidance: str = field(default=DEFAULT_GUIDANCE, metadata={"choices": GUIDANCE})  # paper S4: joint or combined
    text_scale: float = TEXT_SCALE  # joint scale, or s_T of combined (paper: 7.5)
    image_scale: float = IMAGE_SCALE  # s_I of combined guidance
    attention_maps: str | None = None  # a folder: where each image looks in the reference, per adapter layer (PNG)
    attention_steps: str = ""  # the sampling steps the maps average over, START:END (0 first; default: all)
    attention_region: str = ""  # the image region whose attention is mapped, x0,y0,x1,y1 in [0, 1] (default: all)

    def __post_init__(self):
        super().__post_init__()
        attention_steps(self.attention_steps), attention_region(self.attention_region)  # checked here, used later
        if (self.prompt is None) == (self.prompts is None):
            raise ValueError("give --prompt TEXT or --prompts FILE (one prompt per line), one of the two")
        check_sampling(self)


def attention_steps(text: str) -> range | None:
    """--attention-steps START:END as a range (None: every step)."""
    if not text:
        return None
    try:
        start, end = (int(v) for v in text.split(":"))
    except ValueError:
        raise ValueError(f"--attention-steps {text!r}: START:END, sampling steps counted from 0, e.g. 10:40") from None
    if not 0 <= start < end:
        raise ValueError(f"--attention-steps {text!r}: 0 <= START < END")
    return range(start, end)


def attention_region(text: str) -> tuple[float, float, float, float] | None:
    """--attention-region x0,y0,x1,y1 (fractions of the image) as a tuple (None: the whole image)."""
    if not text:
        return None
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--attention-region {text!r}: x0,y0,x1,y1 as fractions of the image, e.g. "
                         "0.25,0.25,0.75,0.75") from None
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ValueError(f"--attention-region {text!r}: 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
    return x0, y0, x1, y1


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How a prompt's images are sampled (``dreamcache generate``'s fields of the same names): ``n`` images from
    seeds ``seed``, ``seed + 1``, ...; joint or combined guidance with its scales; DDIM steps."""

    n: int = 1
    seed: int = 0
    steps: int = STEPS
    guidance: str = DEFAULT_GUIDANCE
    text_scale: float = TEXT_SCALE
    image_scale: float = IMAGE_SCALE

    def __post_init__(self):
        check_sampling(self)


def check_sampling(cfg) -> None:
    """The checks of ``Sampling``'s fields, for any config that has them."""
    at_least(cfg, 1, "n", "steps")
    at_least(cfg, 0, "seed")
    one_of(cfg, "guidance", GUIDANCE)
    for name in ("text_scale", "image_scale"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    check_combined(cfg)


def check_combined(cfg) -> None:
    """Combined guidance runs through the stock loop's classifier-free guidance, which guides only above 1."""
    if cfg.guidance == "combined" and not cfg.text_scale > 1:
        raise ValueError(f"--guidance combined needs --text-scale > 1 (s_T), got {cfg.text_scale}")


@dataclass(frozen=True, kw_only=True)
class EvalConfig(CommandConfig, Compiled):
    """The DreamBooth protocol (paper sec. 4.1): 30 subjects x 25 prompts x 4 images, one reference each."""

    adapters: str  # adapters.safetensors written by training/train.py
    dreambooth: str  # the DreamBooth dataset folder
    out: str = "eval"  # images, caches, results.json/.md and grids go here
    subjects: tuple[str, ...] | None = None  # subject names, or one number N for the first N (default: all 30)
    # reference images per subject, its first K; several (--references 1 3) are evaluated side by side
    references: tuple[int, ...] = (1,)  # K: each subject's first K images (paper: 1)
    prompts: int | None = None  # the first N prompts per subject (default: all 25)
    images_per_prompt: int = 4  # paper
    steps: int = STEPS  # DDIM steps, eta 0 (paper: 50)
    # joint: the paper's joint guidance, text scale 7.5; official: what the official evaluation ran, combined
    # guidance with text scale 7.5 and image scale 0.4
    preset: str = field(default=DEFAULT_GUIDANCE, metadata={"choices": tuple(sorted(PRESETS))})  # the guidance preset
    guidance: str | None = field(default=None, metadata={"choices": GUIDANCE})  # overrides the preset
    text_scale: float | None = None  # overrides the preset
    image_scale: float | None = None  # overrides the preset
    # real images for DINO/CLIP-I: all of the subject's (the paper's, with one reference), only the references,
    # or the rest (the images no evaluated reference set uses: the default with several references)
    compare: str | None = field(default=None, metadata={"choices": COMPARE})  # all | reference | rest
    seed: int = 0
    # how references and generated images are segmented: grounded (Grounding DINO + SAM) or key (a flat backdrop)
    segmenter: str = field(default="grounded", metadata={"choices": SEGMENTERS})
    dino: str | None = None  # default: facebook/dino-vits16 (tiny: tiny:dino)
    clip: str | None = None  # default: openai/clip-vit-base-patch32 (tiny: tiny:clip)
    # images already in --out that another setup made (their provenance.json differs): without --regenerate the
    # run is refused, naming what differs; with it they are deleted and made again
    regenerate: bool = False  # delete and make again the images in --out that another setup made

    def __post_init__(self):
        super().__post_init__()
        at_least(self, 1, "prompts", "images_per_prompt", "steps")
        at_least(self, 0, "seed")
        one_of(self, "preset", PRESETS)
        one_of(self, "segmenter", SEGMENTERS)
        if not self.references or min(self.references) < 1:
            raise ValueError(f"--references must be whole numbers >= 1, got {' '.join(map(str, self.references))}")
        object.__setattr__(self, "references", tuple(dict.fromkeys(self.references)))  # in order, once each
        if self.compare is None:
            object.__setattr__(self, "compare", "all" if self.references == (1,) else "rest")
        one_of(self, "compare", COMPARE)
        from dreamcache.metrics import CLIP, DINO

        metrics = {"dino": DINO, "clip": CLIP} if self.profile == "paper" else TINY_METRICS
        defaults = {**PRESETS[self.preset], **metrics}
        for name, value in defaults.items():  # what the preset and the profile give, where no value was set
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        one_of(self, "guidance", GUIDANCE)
        check_combined(self)


@dataclass(frozen=True, kw_only=True)
class AppConfig(CommandConfig, Compiled):
    """A web app: upload references, see the cut-outs, generate from many prompts beside the base model.

    The models load once; requests queue and run one at a time (one cached call per U-Net). It listens on
    127.0.0.1 unless --host says otherwise (0.0.0.0: every interface, e.g. a cluster node behind a tunnel)."""

    adapters: str  # adapters.safetensors (a file, a folder, or a Hugging Face repo id org/name[@revision])
    dreambooth: str | None = None  # the DreamBooth dataset folder: pick a subject, its images and prompts
    host: str = "127.0.0.1"  # the address to listen on
    port: int = 7860  # the port to listen on (0: any free port)
    segmenter: str = field(default="grounded", metadata={"choices": SEGMENTERS})  # Grounding DINO + SAM, or key
    steps: int = STEPS  # the sampling steps the app starts with (paper: 50)
    max_images: int = 16  # the most images one request may ask for (prompts x images per prompt)

    def __post_init__(self):
        super().__post_init__()
        one_of(self, "segmenter", SEGMENTERS)
        if self.compile and self.compile_mode in ("reduce-overhead", "max-autotune"):
            raise ValueError(f"--compile-mode {self.compile_mode} replays CUDA graphs, which torch records per thread, "
                             "and the app serves requests from a pool of threads: use --compile-mode default or "
                             "max-autotune-no-cudagraphs")
        at_least(self, 0, "port")
        at_least(self, 1, "steps", "max_images")
        if self.port > 65535:
            raise ValueError(f"--port must be <= 65535, got {self.port}")
