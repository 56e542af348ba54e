"""dreamcache personalize | generate | evaluate

    dreamcache personalize --adapters runs/sd15/adapters.safetensors --reference dog.jpg --subject dog --out dog.cache
    dreamcache generate --cache dog.cache --prompt "a dog in the snow" --out dog.png --n 4
    dreamcache evaluate --adapters runs/sd15/adapters.safetensors --dreambooth datasets/dreambooth --out eval/sd15

``--profile tiny`` swaps every model the command loads for the tiny random ones (segmenter, DINO, CLIP);
the base model always comes from the adapter file unless ``--base`` says otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dreamcache.evaluate import EvalConfig
from dreamcache.sampling import DEFAULT_GUIDANCE, GUIDANCE, IMAGE_SCALE, PRESETS, STEPS, TEXT_SCALE
from dreamcache.usage import INTERRUPTED, Parser, fail, non_negative, positive, positive_float

TINY_METRICS = {"dino": "tiny:dino", "clip": "tiny:clip"}


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="dreamcache", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(q):
        q.add_argument("--profile", choices=["paper", "tiny"], default="paper",
                       help="tiny: the tiny random segmenter/DINO/CLIP (the base model comes from the adapters)")
        q.add_argument("--base", default=None, help="base model (sd15, sd21, a hub id or folder); default: the "
                                                    "one the adapters were trained on")
        q.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")

    q = sub.add_parser("personalize", help="segment a reference and cache its features once")
    common(q)
    q.add_argument("--adapters", required=True, help="adapters.safetensors written by training/train.py")
    q.add_argument("--reference", required=True, help="an image of the subject")
    q.add_argument("--subject", default=None, help="what to segment, e.g. 'dog' (Grounding DINO's text prompt)")
    q.add_argument("--no-segment", action="store_true", help="the reference is already the subject on white")
    q.add_argument("--caption", default=None, help="the reference's description, for adapters trained with "
                   "--cache-prompt '{caption}' (default: 'a SUBJECT')")
    q.add_argument("--out", required=True, help="where to write the feature cache (.safetensors)")
    q.add_argument("--seed", type=non_negative, default=0, help="seed of the t=1 noise")

    q = sub.add_parser("generate", help="images from a prompt and a feature cache")
    common(q)
    q.add_argument("--cache", required=True, help="a cache written by `dreamcache personalize`")
    q.add_argument("--adapters", default=None, help="default: the adapter file the cache was made with")
    q.add_argument("--prompt", required=True)
    q.add_argument("--out", required=True, help="PNG path; with --n > 1, NAME-0.png, NAME-1.png, ...")
    q.add_argument("--n", type=positive, default=1, help="images to generate")
    q.add_argument("--seed", type=non_negative, default=0)
    q.add_argument("--steps", type=positive, default=STEPS, help=f"sampling steps (paper: {STEPS})")
    q.add_argument("--guidance", choices=GUIDANCE, default=DEFAULT_GUIDANCE, help="paper S4")
    q.add_argument("--text-scale", type=positive_float, default=TEXT_SCALE,
                   help=f"joint scale, or s_T of combined (paper: {TEXT_SCALE})")
    q.add_argument("--image-scale", type=positive_float, default=IMAGE_SCALE, help="s_I of combined guidance")

    q = sub.add_parser("evaluate", help="the DreamBooth protocol: DINO, CLIP-I, CLIP-T and masked DINO/CLIP-I")
    common(q)
    q.add_argument("--adapters", required=True)
    q.add_argument("--dreambooth", required=True, help="the DreamBooth dataset folder")
    q.add_argument("--out", default="eval", help="images, caches, results.json/.md and grids go here")
    q.add_argument("--subjects", nargs="+", default=None, help="subject names, or one number N for the first N")
    q.add_argument("--prompts", type=positive, default=None, help="the first N prompts per subject (default: all 25)")
    q.add_argument("--images-per-prompt", type=positive, default=4)
    q.add_argument("--steps", type=positive, default=STEPS, help=f"DDIM steps, eta 0 (paper: {STEPS})")
    q.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_GUIDANCE,
                   help="joint: joint guidance, text scale 7.5 (default); official: what the official evaluation "
                        "ran, combined guidance with text scale 7.5 and image scale 0.4")
    q.add_argument("--guidance", choices=GUIDANCE, default=None, help="overrides the preset")
    q.add_argument("--text-scale", type=positive_float, default=None, help="overrides the preset")
    q.add_argument("--image-scale", type=positive_float, default=None, help="overrides the preset")
    q.add_argument("--compare", choices=["all", "reference"], default="all",
                   help="real images for DINO/CLIP-I: all of the subject's, or only the reference")
    q.add_argument("--seed", type=non_negative, default=0)
    q.add_argument("--dino", default=None, help="default: facebook/dino-vits16")
    q.add_argument("--clip", default=None, help="default: openai/clip-vit-base-patch32")
    return p


def personalize(args) -> int:
    from dreamcache.generation import adapter_metadata, load_pipeline, noun_phrase
    from dreamcache.images import open_image, save_image
    from dreamcache.segmenter import GroundedSegmenter, grounding_config

    if not args.no_segment and not args.subject:
        raise ValueError("--subject is required to segment the reference (e.g. --subject dog); "
                         "pass --no-segment if the reference is already the subject on white")
    image = open_image(args.reference)  # transparency goes on white, like the training references
    _check_out(args.out)
    base = args.base or adapter_metadata(args.adapters)["base"]
    _check_base(base)
    pipe = load_pipeline(base, args.adapters, device=args.device)
    if not args.no_segment:
        image, mask = GroundedSegmenter(grounding_config(args.profile)).cutout(image, args.subject, pipe.resolution)
        print(f"segmented {args.subject!r}: mask covers {mask.mean():.1%} of the image")
    subject = noun_phrase(args.subject) if args.subject else None
    cache = pipe.cache_reference(image, seed=args.seed, subject=subject, caption=args.caption)
    cache.save(args.out)
    save_image(image, Path(args.out).with_suffix(".reference.png"))
    values = sum(v.numel() for v in cache.features.values())
    print(f"wrote {args.out}: {len(cache.features)} layers, {values:,} values "
          f"(reference as cached: {Path(args.out).with_suffix('.reference.png')})")
    return 0


def generate(args) -> int:
    import torch

    from dreamcache.generation import ReferenceCache, adapter_metadata, load_pipeline
    from dreamcache.images import save_image

    cache = ReferenceCache.load(args.cache)
    adapters = args.adapters or cache.metadata.get("adapters")
    if not adapters:
        raise ValueError(f"{args.cache} does not say which adapters made it; pass --adapters")
    _check_out(args.out)
    base = args.base or adapter_metadata(adapters)["base"]
    _check_base(base)
    pipe = load_pipeline(base, adapters, device=args.device)
    gens = [torch.Generator().manual_seed(args.seed + i) for i in range(args.n)]
    images = pipe(args.prompt, cache=cache, guidance=args.guidance, guidance_scale=args.text_scale,
                  image_guidance_scale=args.image_scale, num_inference_steps=args.steps,
                  num_images_per_prompt=args.n, generator=gens).images
    out = Path(args.out)
    paths = [out] if args.n == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(args.n)]
    for image, path in zip(images, paths):
        save_image(image, path)
    print("wrote " + ", ".join(map(str, paths)))
    return 0


def guidance_settings(args) -> dict:
    """The preset's guidance, text_scale and image_scale, with the flags given on the command line on top."""
    chosen = {"guidance": args.guidance, "text_scale": args.text_scale, "image_scale": args.image_scale}
    return {**PRESETS[args.preset], **{k: v for k, v in chosen.items() if v is not None}}


def evaluate(args) -> int:
    from dreamcache.evaluate import evaluate as run

    subjects = args.subjects
    if subjects and len(subjects) == 1 and subjects[0].isdigit():
        subjects = int(subjects[0])
    elif subjects:
        subjects = tuple(subjects)
    tiny = TINY_METRICS if args.profile == "tiny" else {}
    cfg = EvalConfig(adapters=args.adapters, dreambooth=args.dreambooth, out=args.out, base=args.base,
                     subjects=subjects, prompts=args.prompts, images_per_prompt=args.images_per_prompt,
                     steps=args.steps, preset=args.preset, **guidance_settings(args), compare=args.compare,
                     seed=args.seed,
                     dino=args.dino or tiny.get("dino", EvalConfig.dino),
                     clip=args.clip or tiny.get("clip", EvalConfig.clip), profile=args.profile)
    results = run(cfg)
    print((Path(cfg.out) / "results.md").read_text())
    o = results["overall"]
    print(f"wrote {cfg.out}/results.json ({o['images']} images)")
    return 0


def _check_out(out: str) -> None:
    """An output path must be writable where it points: not a folder, its parent not a file."""
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"--out {out}: {parent} is a file, not a folder")


def _check_base(base: str) -> None:
    from dreamcache.bases import base_spec, checkpoint
    from dreamcache.models import check_available

    check_available(checkpoint(base), None, f"base model ({base})", "--base")
    base_spec(base)  # a checkpoint of a family the toolkit knows


def main(argv: list[str] | None = None) -> int:
    from dreamcache.errors import PipelineError
    from dreamcache.models import quiet_model_loading

    args = _parser().parse_args(argv)
    quiet_model_loading()
    try:
        return {"personalize": personalize, "generate": generate, "evaluate": evaluate}[args.command](args)
    except (FileNotFoundError, ValueError, PipelineError) as e:
        return fail(e)
    except KeyboardInterrupt:
        print("interrupted; nothing half-written was left behind" + (
            " (evaluate resumes where it stopped: run the same command)" if args.command == "evaluate" else ""),
              file=sys.stderr, flush=True)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
