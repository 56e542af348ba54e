"""``make proof``: the toolkit's own jobs in the small world, end to end, and the table that says whether the
adapters carry identity.

    python -m world.proof [--base world/base-model] [--out proof] [--size 1200] [--steps 500]

1. ``pipeline/run.py`` writes the triplets (world/pipeline.yaml: the world's captions, its base as the target
   generator, references keyed out of the flat background).
2. ``training/train.py`` trains the adapters on those shards, on the frozen world base.
3. The held-out subjects (never in any training data) are written as a benchmark in the DreamBooth layout:
   one reference each (the subject centred on white), one prompt per context, class-only ("a circle on the
   left, on a gray background"). ``dreamcache evaluate`` generates DreamCache's images from them;
   ``dreamcache personalize`` and ``generate`` make one more, as a user would.
4. The base model alone draws the same prompts with the same seeds, once with the class-only prompt and once
   with the identity spelled out ("a red plain circle ..."): the floor and the ceiling.
5. The judge (world/judge.py) reads every image; the table has one row per setting, identity accuracy first.

Every step's output stays in ``--out``; run it again and the pipeline and trainer refuse to overwrite: pass a
new ``--out`` or delete it (``--fresh``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from world.judge import read
from world.scene import WHERE, Subject, contexts, held_out_subjects, reference_scene, render

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "world" / "base-model"  # the committed fixture (python -m world.base world/base-model)
ROWS = ("base, class prompt", "DreamCache", "base, identity in prompt")
PAPER = "the paper's: concat, t=1, empty prompt"  # the ablation table's first row: the proof's DreamCache row
ABLATIONS = {  # each changes one of the paper's choices (its Table S3, Table 6 and Table 4), trained as the proof's
    "caching at t=500": ["cache_timestep=500"],
    "caching prompt: the subject phrase": ['cache_prompt="{subject}"'],  # as evaluate fills it ("circle")
    "spatial sum": ["fusion=spatial_sum"],
    "textual sum": ["fusion=textual_sum"],
    "decoupled": ["fusion=decoupled"],
}
MARKER = ".world-proof"  # what --fresh looks for before deleting --out
GUIDANCE = 5.0  # the text scale: the base's (classifier-free guidance) and DreamCache's alike
IMAGE_SCALE = 2.0  # DreamCache's image scale under combined guidance (BENCHMARKS.md, "The small world": the sweep)
STEPS = 25  # DDIM steps


def subject_name(s: Subject) -> str:
    return f"{s.colour}_{s.pattern}_{s.shape}"


def prompt_templates() -> list[str]:
    """One class-only prompt per context, with {} where the class noun goes."""
    return [f"a {{}} {WHERE[p]}, on a {b} background" for p, b in contexts()]


def write_benchmark(folder: Path) -> None:
    """The held-out subjects in the DreamBooth dataset's layout (dreamcache/evaluate.py reads it): a folder of
    reference images per subject and prompts_and_classes.txt with the class nouns and the prompt lists."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["subject_name,class"]
    for s in held_out_subjects():
        (folder / subject_name(s)).mkdir(exist_ok=True)
        render(reference_scene(s)).save(folder / subject_name(s) / "00.png")
        lines.append(f"{subject_name(s)},{s.shape}")
    prompts = ",\n".join(f"'{t.replace('{}', '{0} {1}')}'.format(unique_token, class_token)"
                         for t in prompt_templates())
    lines += ["", "Object Prompts", "prompt_list = [", prompts, "]", "", "Live Subject Prompts", "prompt_list = [",
              prompts, "]", ""]
    (folder / "prompts_and_classes.txt").write_text("\n".join(lines))


def run(cmd: list[str], what: str) -> float:
    print(f"\n== {what}\n$ {' '.join(cmd)}", flush=True)
    start = time.monotonic()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.monotonic() - start


def base_images(base: str, out: Path, identity: bool, images_per_prompt: int, seed: int) -> None:
    """The base model alone on every held-out subject's prompts, with evaluate's seeds: class-only prompts, or
    with the identity spelled out. Written as OUT/<subject>/<prompt>-<i>.png, as evaluate writes its images."""
    from dreamcache.evaluate import image_seed
    from dreamcache.generation import load_pipeline
    from dreamcache.images import save_image

    pipe = load_pipeline(base, device="cpu")
    for s in held_out_subjects():
        noun = f"{s.identity} {s.shape}" if identity else s.shape
        prompts = [t.format(noun) for t in prompt_templates()]
        gens = [torch.Generator().manual_seed(image_seed(seed, subject_name(s), j, i))  # evaluate's, per image
                for j in range(len(prompts)) for i in range(images_per_prompt)]
        images = pipe(prompts, guidance_scale=GUIDANCE, num_inference_steps=STEPS,
                      num_images_per_prompt=images_per_prompt, generator=gens).images  # prompt-major, as gens
        for n, image in enumerate(images):
            save_image(image, out / subject_name(s) / f"{n // images_per_prompt:02d}-{n % images_per_prompt}.png")


def judge(folder: Path, images_per_prompt: int) -> dict[str, float]:
    """Accuracy of what the judge reads in each held-out subject's images against what was asked: identity
    (colour and pattern), context (position and background), and each part alone."""
    right: dict[str, int] = {k: 0 for k in ("identity", "context", "colour", "pattern", "position", "background",
                                            "shape")}
    n = 0
    for s in held_out_subjects():
        for j, (position, background) in enumerate(contexts()):
            for i in range(images_per_prompt):
                r = read(Image.open(folder / subject_name(s) / f"{j:02d}-{i}.png"))
                hits = {"colour": r.colour == s.colour, "pattern": r.pattern == s.pattern,
                        "position": r.position == position, "background": r.background == background,
                        "shape": r.shape == s.shape}
                hits["identity"] = hits["colour"] and hits["pattern"]
                hits["context"] = hits["position"] and hits["background"]
                for k, v in hits.items():
                    right[k] += v
                n += 1
    return {**{k: v / n for k, v in right.items()}, "images": n}


def table(results: dict[str, dict[str, float]]) -> str:
    cols = ("identity", "colour", "pattern", "context", "position", "background", "shape")
    lines = ["| setting | " + " | ".join(cols) + " | images |", "|---|" + "---:|" * (len(cols) + 1)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + f" | {r['images']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m world.proof", description=__doc__.split("\n")[0])
    p.add_argument("--base", default=str(BASE), help="the small world's base (python -m world.base)")
    p.add_argument("--out", type=Path, default=Path("proof"))
    p.add_argument("--fresh", action="store_true", help="delete --out first")
    p.add_argument("--size", type=int, default=1200, help="training triplets the pipeline writes")
    p.add_argument("--steps", type=int, default=500, help="adapter training steps")
    p.add_argument("--batch", type=int, default=32, help="adapter training batch")
    p.add_argument("--lr", type=float, default=1e-3, help="adapter learning rate")
    p.add_argument("--guidance", choices=("joint", "combined"), default="combined",
                   help=f"DreamCache's guidance; the text scale is {GUIDANCE} for every row")
    p.add_argument("--image-scale", type=float, default=IMAGE_SCALE, help="combined guidance's image scale")
    p.add_argument("--data", type=Path, help="train on this dataset (pipeline/run.py's, with world/pipeline.yaml): "
                   "no pipeline run")
    p.add_argument("--images-per-prompt", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adapters", help="evaluate these adapters: no pipeline, no training")
    p.add_argument("--judge-only", action="store_true", help="judge the images already in --out again")
    p.add_argument("--train-set", action="append", default=[], metavar="FIELD=VALUE",
                   help="more training/train.py settings (--set), e.g. fusion=spatial_sum")
    p.add_argument("--dreamcache-only", action="store_true",
                   help="DreamCache's row alone: no base-model rows, no personalize/generate (a guidance sweep)")
    p.add_argument("--ablations", action="store_true",
                   help=f"after a proof in --out (same flags): train and judge {', '.join(ABLATIONS)} on its "
                        "dataset, into OUT/ablations/")
    args = p.parse_args(argv)
    out = args.out.resolve()
    if args.judge_only:
        report(args, out, json.loads((out / "proof.json").read_text())["seconds"])
        return 0
    if args.ablations:
        return ablations(args, out)
    if args.fresh and out.exists():
        if any(out.iterdir()) and not (out / MARKER).exists():
            print(f"error: --fresh deletes only a folder this command made; {out} has no {MARKER}", file=sys.stderr)
            return 2
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by python -m world.proof\n")
    base = str(Path(args.base).resolve())
    if not (Path(base) / "model_index.json").is_file():
        print(f"error: no small-world base at {base}: train one with `python -m world.base {args.base}`",
              file=sys.stderr)
        return 2
    times: dict[str, float] = {}
    adapters = str(Path(args.adapters).resolve()) if args.adapters else str(out / "run" / "adapters.safetensors")
    if not args.adapters:
        train_adapters(args, base, out, times)
    evaluate(args, base, out, adapters, times)
    return 0


def dataset_folder(args, out: Path) -> Path:
    return args.data.resolve() if args.data else out / "dataset"


def train_adapters(args, base: str, out: Path, times: dict) -> None:
    if not args.data:
        times["pipeline"] = run([sys.executable, "pipeline/run.py", "--profile", "tiny", "--config",
                                 "world/pipeline.yaml", "--set", f"targets.model=world:{base}", "--size",
                                 str(args.size), "--out", str(dataset_folder(args, out))], "triplets: pipeline/run.py")
    times["training"] = train(args, base, dataset_folder(args, out), out / "run", args.train_set)


def train(args, base: str, data: Path, run_dir: Path, settings: list[str]) -> float:
    """training/train.py on ``data`` into ``run_dir``, with ``settings`` (FIELD=VALUE) over the proof's."""
    cmd = [sys.executable, "training/train.py", "--base", base, "--data", str(data), "--out", str(run_dir),
           "--max-steps", str(args.steps), "--micro-batch", str(args.batch), "--global-batch", str(args.batch),
           "--lr", str(args.lr), "--checkpoint-every", str(args.steps), "--val-samples", "0",
           "--num-workers", "1", "--log-every", "25"]
    for s in settings:
        cmd += ["--set", s]
    return run(cmd, f"adapters: training/train.py {' '.join(settings)}".rstrip())


def dreamcache_images(args, adapters: str, heldout: Path, eval_dir: Path) -> float:
    """``dreamcache evaluate`` on the held-out benchmark: DreamCache's images in EVAL_DIR/images/<subject>/."""
    return run([sys.executable, "-m", "dreamcache", "evaluate", "--profile", "tiny", "--adapters", adapters,
                "--dreambooth", str(heldout), "--out", str(eval_dir), "--segmenter", "key",
                "--images-per-prompt", str(args.images_per_prompt), "--steps", str(STEPS),
                "--seed", str(args.seed), "--device", "cpu", *guidance_flags(args)],
               "DreamCache on the held-out subjects: dreamcache evaluate")


def guidance_flags(args) -> list[str]:
    flags = ["--guidance", args.guidance, "--text-scale", str(GUIDANCE)]
    return flags + (["--image-scale", str(args.image_scale)] if args.guidance == "combined" else [])


def evaluate(args, base: str, out: Path, adapters: str, times: dict) -> None:
    py = sys.executable
    write_benchmark(out / "heldout")
    times["evaluate"] = dreamcache_images(args, adapters, out / "heldout", out / "eval")
    if args.dreamcache_only:
        report(args, out, times)
        return
    first = held_out_subjects()[0]
    ref = out / "heldout" / subject_name(first) / "00.png"
    times["personalize"] = run([py, "-m", "dreamcache", "personalize", "--adapters", adapters, "--reference", str(ref),
                                "--subject", first.shape, "--segmenter", "key", "--out", str(out / "subject.cache"),
                                "--device", "cpu"], "one held-out subject, as a user would: dreamcache personalize")
    prompt = prompt_templates()[4].format(first.shape)
    times["generate"] = run([py, "-m", "dreamcache", "generate", "--cache", str(out / "subject.cache"), "--prompt",
                             prompt, "--n", "4", "--steps", str(STEPS), *guidance_flags(args),
                             "--out", str(out / "subject.png"), "--device", "cpu"], "dreamcache generate")
    print("\n== the base model alone: class-only prompts, then the identity in the prompt", flush=True)
    start = time.monotonic()
    base_images(base, out / "base-class", False, args.images_per_prompt, args.seed)
    base_images(base, out / "base-identity", True, args.images_per_prompt, args.seed)
    times["base images"] = time.monotonic() - start
    report(args, out, times)


def figure(out: Path, prompts: int = 6, scale: int = 3) -> Path:
    """OUT/figure.png: one row per held-out subject, its reference, then the first seed's image of the first
    ``prompts`` prompts for each setting of the table, side by side (a gap between settings)."""
    folders = [out / "base-class", out / "eval" / "images", out / "base-identity"]
    folders = [f for f in folders if f.is_dir()]
    side, gap = 32 * scale, 8
    width = side + gap + len(folders) * (prompts * side + gap)
    sheet = Image.new("RGB", (width, len(held_out_subjects()) * (side + 2)), (255, 255, 255))
    for i, s in enumerate(held_out_subjects()):
        y = i * (side + 2)
        sheet.paste(render(reference_scene(s)).resize((side, side), Image.NEAREST), (0, y))
        for k, folder in enumerate(folders):
            for j in range(prompts):
                image = Image.open(folder / subject_name(s) / f"{j:02d}-0.png").convert("RGB")
                x = side + gap + k * (prompts * side + gap) + j * side
                sheet.paste(image.resize((side, side), Image.NEAREST), (x, y))
    sheet.save(out / "figure.png")
    return out / "figure.png"


SAME = ("steps", "batch", "lr", "guidance", "image_scale", "images_per_prompt", "seed", "train_set")  # as the proof's


def ablations(args, out: Path) -> int:
    """One row per ablation (``ABLATIONS``) beside the proof's own DreamCache row, each trained on the proof's
    dataset with the proof's steps, batch and learning rate and judged on the same held-out subjects and seeds."""
    data, paper = dataset_folder(args, out), out / "eval" / "images"
    if not (data / "dataset.json").is_file() or not paper.is_dir():
        print(f"error: --ablations needs a finished proof in {out} (its dataset and eval/): run "
              f"`python -m world.proof --out {args.out}` first, with the same flags", file=sys.stderr)
        return 2
    made = json.loads((out / "proof.json").read_text())["args"]
    differ = [k for k in SAME if str(getattr(args, k)) != made.get(k)]
    if differ:
        print(f"error: the proof in {out} was made with other {', '.join('--' + k.replace('_', '-') for k in differ)}"
              f" ({', '.join(f'{made.get(k)}' for k in differ)}): give the same, or the rows compare unlike runs",
              file=sys.stderr)
        return 2
    base = str(Path(args.base).resolve())
    results, seconds = {PAPER: judge(paper, args.images_per_prompt)}, {}
    for name, settings in ABLATIONS.items():
        folder = out / "ablations" / "".join(c if c.isalnum() else "-" for c in name)
        done = folder / "done.json"
        if not done.is_file():  # a folder an interrupted run left: started again
            shutil.rmtree(folder, ignore_errors=True)
            took = train(args, base, data, folder / "run", args.train_set + settings)
            took += dreamcache_images(args, str(folder / "run" / "adapters.safetensors"), out / "heldout",
                                      folder / "eval")
            done.write_text(json.dumps({"seconds": took}))
        seconds[name] = json.loads(done.read_text())["seconds"]
        results[name] = judge(folder / "eval" / "images", args.images_per_prompt)
    (out / "ablations.json").write_text(json.dumps({"results": results, "seconds": seconds,
                                                    "settings": ABLATIONS}, indent=1))
    print(f"\nablations, each one change from the paper's choices; DreamCache on the held-out subjects, judged by "
          f"world/judge.py\n\n{table(results)}", flush=True)
    return 0


def leaks(dataset: Path) -> dict[str, int]:
    """The training targets the judge reads as a held-out subject (the base drew another identity than the
    one asked for, and it is one no training data should hold), of all the dataset's targets."""
    import tarfile

    held = {(s.shape, s.colour, s.pattern) for s in held_out_subjects()}
    n = found = 0
    for shard in sorted((dataset / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".target.jpg"):
                    r = read(Image.open(tar.extractfile(member)))
                    found += (r.shape, r.colour, r.pattern) in held
                    n += 1
    return {"targets": n, "read_as_held_out": found}


def report(args, out: Path, times: dict) -> None:
    folders = dict(zip(ROWS, (out / "base-class", out / "eval" / "images", out / "base-identity")))
    if args.dreamcache_only:
        folders = {ROWS[1]: folders[ROWS[1]]}
    results = {row: judge(folder, args.images_per_prompt) for row, folder in folders.items()}
    dataset = dataset_folder(args, out)
    leaked = leaks(dataset) if dataset.is_dir() else None
    settings = {k: str(v) for k, v in vars(args).items()}
    if args.judge_only:  # judged again: the settings stay those the images were made with
        settings = json.loads((out / "proof.json").read_text())["args"]
    made = {"results": results, "seconds": times, "training_targets": leaked, "args": settings}
    (out / "proof.json").write_text(json.dumps(made, indent=1))
    print(f"\nseconds: {json.dumps({k: round(v) for k, v in times.items()})}")
    if leaked:
        print(f"training targets the judge reads as a held-out subject: {leaked['read_as_held_out']} of "
              f"{leaked['targets']}")
    print(f"held-out subjects: {', '.join(s.name for s in held_out_subjects())}; {len(prompt_templates())} "
          f"class-only prompts x {args.images_per_prompt} seeds each; judged by world/judge.py\n")
    if len(results) == len(ROWS):
        print(f"{figure(out)}: each held-out subject's reference, then {', '.join(ROWS)}\n")
    print(table(results))
    print(f"chance: identity 1/12 = {1 / 12:.3f} (6 colours x 2 patterns), context 1/9 = {1 / 9:.3f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
