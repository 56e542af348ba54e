"""dreamcache personalize | generate | evaluate | app

    dreamcache personalize --adapters runs/sd15/adapters.safetensors --reference dog.jpg --subject dog --out dog.cache
    dreamcache personalize --adapters A --reference a.jpg --reference b.jpg --subject dog --out dog.cache
    dreamcache generate --cache dog.cache --prompt "a dog in the snow" --out dog.png --n 4
    dreamcache generate --cache dog.cache --prompts prompts.txt --out dog-images/      # one prompt per line
    dreamcache evaluate --adapters runs/sd15/adapters.safetensors --dreambooth datasets/dreambooth --out eval/sd15
    dreamcache app --adapters runs/sd15 --dreambooth datasets/dreambooth     # a web app on http://127.0.0.1:7860

``--profile tiny`` swaps every model the command loads for the tiny random ones (segmenter, DINO, CLIP);
the base model always comes from the adapter file unless ``--base`` says otherwise, and adapters trained on
another base are refused unless ``--allow-other-base``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dreamcache.commands import AppConfig, CommandConfig, EvalConfig, GenerateConfig, PersonalizeConfig
from dreamcache.config import add_config_options, add_flags, given, layers, resolve, to_yaml
from dreamcache.usage import INTERRUPTED, Parser, fail

COMMANDS = {"personalize": PersonalizeConfig, "generate": GenerateConfig, "evaluate": EvalConfig, "app": AppConfig}


def _parser() -> tuple[argparse.ArgumentParser, dict[str, dict[str, str]]]:
    """The parser, and each command's {config field: flag}: every flag is a field of the command's config
    (dreamcache/commands.py)."""
    p = Parser(prog="dreamcache", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    flags = {}
    for name, schema in COMMANDS.items():
        q = sub.add_parser(name, help=schema.__doc__.splitlines()[0].rstrip("."), description=schema.__doc__)
        add_config_options(q, "steps=30" if name != "personalize" else "seed=1")
        flags[name] = add_flags(q, schema)
    return p, flags


def personalize(cfg: PersonalizeConfig) -> int:
    from dreamcache.generation import file_sha256
    from dreamcache.images import open_image, save_image
    from dreamcache.segmenter import grounding_config, make_segmenter
    from dreamcache.studio import cache_subject, open_pipeline

    images = [open_image(path) for path in cfg.reference]  # transparency on white, like the training references
    _check_out(cfg.out)
    pipe = open_pipeline(cfg, cfg.adapters)
    segmenter = make_segmenter(grounding_config(cfg.profile, cfg.segmenter)) if cfg.segment else None
    names = [str(p) for p in cfg.reference]
    cache, images, coverage = cache_subject(pipe, segmenter, images, cfg.subject, cfg.seed, cfg.caption, names)
    for path, share in zip(cfg.reference, coverage if segmenter is not None else []):
        what = repr(cfg.subject) if cfg.subject else "the subject"
        print(f"segmented {what} in {path} ({cfg.segmenter}): mask covers {share:.1%} of the image")
    records = cache.references
    for record, path in zip(records, cfg.reference):  # and which file each reference came from
        record["file_sha256"] = file_sha256(path)
    cache.metadata["references"] = json.dumps(records)
    cache.save(cfg.out)
    saved = [Path(cfg.out).with_suffix(".reference.png" if i == 0 else f".reference-{i}.png")
             for i in range(len(images))]
    for image, path in zip(images, saved):
        save_image(image, path)
    values = sum(v.numel() for v in cache.features.values())
    print(f"wrote {cfg.out}: {len(images)} reference(s), {len(cache.features)} layers, {values:,} values "
          f"(references as cached: {', '.join(map(str, saved))})")
    return 0


def generate(cfg: GenerateConfig) -> int:
    """One prompt into --out, or every line of --prompts into the folder --out: the models and the cache are
    loaded once, and a prompt's images are those ``--prompt`` alone gives with the same seed."""
    import time

    from dreamcache.attention import AttentionMaps
    from dreamcache.commands import attention_region, attention_steps
    from dreamcache.generation import ReferenceCache
    from dreamcache.images import save_image
    from dreamcache.store import write_file_atomic
    from dreamcache.studio import open_pipeline, sample, slug

    prompts = [cfg.prompt] if cfg.prompts is None else read_prompts(cfg.prompts)
    cache = ReferenceCache.load(cfg.cache)
    adapters = cfg.adapters or cache.metadata.get("adapters")
    if not adapters:
        raise ValueError(f"{cfg.cache} does not say which adapters made it; pass --adapters")
    if cfg.prompts is None:
        _check_out(cfg.out)
    elif Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise ValueError(f"--out {cfg.out} is a file; with --prompts, --out is the folder the images go to")
    else:
        _check_out(str(Path(cfg.out) / "x.png"))  # a folder that can be made where it points
    pipe = open_pipeline(cfg, adapters)
    if cfg.prompts is not None:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
    references = cached_references(cfg.cache, len(cache.references)) if cfg.attention_maps else []
    width = max(3, len(str(len(prompts) - 1)))  # file names sort in prompt order
    index = []  # with --prompts: OUT/metadata.jsonl, one line per image (an imagefolder for `datasets`)
    started = time.monotonic()
    for i, prompt in enumerate(prompts):
        maps = AttentionMaps(attention_steps(cfg.attention_steps), attention_region(cfg.attention_region)) \
            if cfg.attention_maps else None
        images = sample(pipe, prompt, cache, cfg, maps)
        out = Path(cfg.out) if cfg.prompts is None else Path(cfg.out) / f"{i:0{width}d}-{slug(prompt)}.png"
        if maps is not None:
            written = maps.save(cfg.attention_maps, images, references, stem=out.stem)
            print(f"attention maps: {len(written)} in {cfg.attention_maps} ({len(maps.layers())} layers)")
        paths = [out] if cfg.n == 1 else [out.with_name(f"{out.stem}-{k}{out.suffix or '.png'}") for k in range(cfg.n)]
        for k, (image, path) in enumerate(zip(images, paths)):
            save_image(image, path)
            index.append({"file_name": path.name, "prompt": prompt, "seed": cfg.seed + k})
        done = (i + 1) * cfg.n / max(time.monotonic() - started, 1e-9) * 60
        where = "wrote " + ", ".join(map(str, paths))
        print(where if len(prompts) == 1 else f"[{i + 1}/{len(prompts)}] {prompt!r}: {where} ({done:.1f} images/min)",
              flush=True)
    if cfg.prompts is not None:
        write_file_atomic(Path(cfg.out) / "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in index).encode())
    return 0


def cached_references(cache: str, count: int):
    """The cut-outs ``personalize`` cached, saved beside the cache (NAME.reference.png, NAME.reference-1.png, ...);
    a white square for any that is missing."""
    from PIL import Image

    paths = [Path(cache).with_suffix(".reference.png" if k == 0 else f".reference-{k}.png") for k in range(max(1, count))]
    return [Image.open(p).convert("RGB") if p.is_file() else Image.new("RGB", (64, 64), "white") for p in paths]


def read_prompts(path: str) -> list[str]:
    """The prompts of a --prompts file: one per line; blank lines and lines starting with # are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"--prompts {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:  # a folder, no permission
        raise ValueError(f"--prompts {path} cannot be read ({e.strerror or e}): give a text file") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompt (one per line; # starts a comment)")
    return prompts


def evaluate(cfg: EvalConfig) -> int:
    from dreamcache.evaluate import evaluate as run

    results = run(cfg)
    print((Path(cfg.out) / "results.md").read_text())
    print(f"wrote {cfg.out}/results.json ({results['overall']['images']} images)")
    return 0


def app(cfg: AppConfig) -> int:
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise ValueError("dreamcache app needs Gradio: pip install 'dreamcache[app]'")
    from dreamcache.app import serve

    serve(cfg)
    return 0


def _check_out(out: str) -> None:
    """An output path must be writable where it points: not a folder, its parent not a file."""
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"--out {out}: {parent} is a file, not a folder")


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, CommandConfig]:
    """(flags, the command's config): its defaults < --config < --set < its flags. Raises ValueError (a
    ConfigError names the flag) for what the config refuses."""
    parser, flags = _parser()
    args = parser.parse_args(argv)
    schema = COMMANDS[args.command]
    return args, resolve(schema, *layers(args), given(args, flags[args.command]), flags=flags[args.command])


def main(argv: list[str] | None = None) -> int:
    from dreamcache.errors import PipelineError
    from dreamcache.models import quiet_model_loading

    try:
        args, cfg = parse(argv)
    except ValueError as e:  # ConfigError included
        return fail(e)
    if args.print_config:
        print(to_yaml(cfg))
        return 0
    quiet_model_loading()
    try:
        return {"personalize": personalize, "generate": generate, "evaluate": evaluate, "app": app}[args.command](cfg)
    except (FileNotFoundError, ValueError, PipelineError) as e:
        return fail(e)
    except KeyboardInterrupt:
        print("interrupted; nothing half-written was left behind" + (
            " (evaluate resumes where it stopped: run the same command)" if args.command == "evaluate" else ""),
              file=sys.stderr, flush=True)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
