"""The DreamBooth evaluation (paper sec. 4.1, S2.1).

30 subjects x 25 prompts (the object or live-subject list, the class noun in place of "{unique token}
{class}") x 4 images, one reference image per subject (its first image, segmented onto white and cached).
Scores per generated image, averaged per subject and over all images:

    dino, clip_i     cosine with the subject's real images (DINO ViT-S/16 CLS, CLIP ViT-B/32 image)
    clip_t           cosine with the prompt (CLIP image vs text)
    mdino, mclip_i   the same on subject cut-outs: generated and real images both segmented (class noun)

OUT/images/<subject>/<prompt>-<i>.png are kept, so an interrupted run continues where it stopped, with the
folder's provenance.json (dreamcache/provenance.py): what made them. A rerun with another setup is refused, or
with ``--regenerate`` makes them again; the cut-outs (OUT/references/) and feature caches (OUT/caches/) are
made again whenever what made them differs. OUT/results.json (with every scored folder's provenance),
OUT/results.md and OUT/grids/<subject>.jpg are rewritten at the end of every run.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

from dreamcache import provenance
from dreamcache.commands import EvalConfig
from dreamcache.images import on_white, save_image
from dreamcache.store import write_file_atomic
from dreamcache.seeds import derive_seed

METRICS = ("dino", "clip_i", "clip_t", "mdino", "mclip_i")
LABELS = ("DINO", "CLIP-I", "CLIP-T", "MDINO", "MCLIP-I")
# Paper Table 2: what a faithful run of the released method should land near, per base model.
PAPER = {"SD 1.5": {"dino": 0.713, "clip_i": 0.810, "clip_t": 0.298},
         "SD 2.1": {"dino": 0.767, "clip_i": 0.816, "clip_t": 0.301}}
LIVE = {"cat", "dog"}  # classes that take the live-subject prompt list


@dataclass(frozen=True)
class Subject:
    name: str
    noun: str  # the class noun, e.g. "stuffed animal"
    images: tuple[Path, ...]

    @property
    def live(self) -> bool:
        return self.noun in LIVE


@dataclass(frozen=True)
class Benchmark:
    subjects: tuple[Subject, ...]
    object_prompts: tuple[str, ...]  # with "{}" where the class noun goes
    live_prompts: tuple[str, ...]

    def prompts(self, subject: Subject) -> tuple[str, ...]:
        return tuple(p.format(subject.noun) for p in (self.live_prompts if subject.live else self.object_prompts))


def load_benchmark(root: str | Path) -> Benchmark:
    """Reads ``prompts_and_classes.txt`` and the subject folders of the DreamBooth dataset."""
    root = Path(root)
    spec = root / "prompts_and_classes.txt"
    if not spec.is_file():
        raise FileNotFoundError(f"{root} is not the DreamBooth dataset: {spec.name} is missing")
    text = spec.read_text()
    classes = dict(re.findall(r"^([a-z0-9_]+),([a-z ]+)$", text, flags=re.M))
    classes.pop("subject_name", None)
    lists = [re.findall(r"'(.*?)'\.format\(unique_token, class_token\)", block)
             for block in text.split("prompt_list = [")[1:]]
    if len(lists) != 2 or not all(lists):
        raise ValueError(f"{spec}: expected the object and live-subject prompt lists")
    # Zero-shot methods have no unique token: "a {0} {1} in the snow" -> "a {} in the snow".
    object_prompts, live_prompts = ([p.replace("{0} {1}", "{}") for p in ps] for ps in lists)
    subjects = []
    for name, noun in classes.items():
        images = tuple(sorted(p for p in (root / name).glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")))
        if not images:
            raise FileNotFoundError(f"subject {name}: no images in {root / name}")
        subjects.append(Subject(name, noun, images))
    return Benchmark(tuple(subjects), tuple(object_prompts), tuple(live_prompts))


def image_seed(seed: int, subject: str, prompt: int, index: int) -> int:
    return derive_seed(seed, subject, prompt, index)


def select(bench: Benchmark, subjects: tuple[str, ...] | None) -> list[Subject]:
    """The subjects named, or the first N for one number N, or all."""
    if subjects is None:
        return list(bench.subjects)
    if len(subjects) == 1 and str(subjects[0]).isdigit():
        return list(bench.subjects[:int(subjects[0])])
    by_name = {s.name: s for s in bench.subjects}
    unknown = [s for s in subjects if s not in by_name]
    if unknown:
        raise ValueError(f"unknown subjects {unknown}; the dataset has {', '.join(by_name)}")
    return [by_name[s] for s in subjects]


def images_folder(out: Path, k: int) -> Path:
    """Where the images generated from K references go: images/ for one (as ever), images-kK/ for more."""
    return out / ("images" if k == 1 else f"images-k{k}")


def reference_cutout(out: Path, subject: Subject, i: int) -> Path:
    """The cut-out of the subject's i-th image, as cached: references/<subject>.png, <subject>-1.png, ..."""
    return out / "references" / (f"{subject.name}.png" if i == 0 else f"{subject.name}-{i}.png")


def cutout(segmenter, subject: Subject, i: int, size: int, out: Path) -> Image.Image:
    """The subject's i-th image segmented onto white, kept for resumed runs with its record beside it
    (references/<name>.json: the source file and its hash, the segmenter, the size), and made again when this
    record differs. An image the segmenter finds nothing in is used whole and recorded so for the report."""
    from dreamcache.generation import file_sha256

    path, source = reference_cutout(out, subject, i), subject.images[i]
    record = {"file": f"{subject.name}/{source.name}", "sha256": file_sha256(source),
              "segmenter": segmenter.describe(), "size": size}
    kept = path.with_suffix(".json")
    if not path.exists() or not kept.exists() or {k: v for k, v in json.loads(kept.read_text()).items()
                                                   if k != "segmented"} != record:
        path.parent.mkdir(parents=True, exist_ok=True)
        found = segmenter.cutouts([Image.open(source)], subject.noun, size)[0]
        if found is None:  # keep going: the other 29 subjects are worth their hours of generation
            print(f"warning: no {subject.noun!r} found in {source}; caching it unsegmented", flush=True)
        save_image(found[0] if found else on_white(Image.open(source)), path)
        write_file_atomic(kept, json.dumps({**record, "segmented": found is not None}).encode())  # after the image
    return Image.open(path)


def unsegmented(out: Path, subject: Subject, i: int) -> bool:
    """Whether the subject's i-th cut-out is its image whole (the segmenter found nothing)."""
    kept = reference_cutout(out, subject, i).with_suffix(".json")
    return kept.exists() and not json.loads(kept.read_text())["segmented"]


def setup(cfg: EvalConfig, pipe, segmenter, base: str, subject: Subject, prompts: tuple[str, ...], k: int) -> dict:
    """What makes the images of ``subject`` from its first ``k`` references: everything that changes their pixels,
    recorded as the images folder's provenance.json. The preset is not in it: it is a name for the guidance
    and scales, which are."""
    from dreamcache.adapter import CACHE_PROMPT, REFERENCE_TIMESTEP, cache_prompt
    from dreamcache.generation import file_sha256, noun_phrase

    meta, phrase = pipe.adapters_metadata, noun_phrase(subject.noun)
    caching_prompt = cache_prompt(meta.get("cache_prompt", CACHE_PROMPT), phrase, phrase)
    return {"format": provenance.FORMAT, "adapters": str(cfg.adapters), "adapters_sha256": meta["adapters_sha256"],
            "base": base, "dtype": str(pipe.unet.dtype).removeprefix("torch."),
            "sampler": {"scheduler": type(pipe.scheduler).__name__, "eta": 0.0}, "steps": cfg.steps,
            "guidance": cfg.guidance, "text_scale": cfg.text_scale,
            "image_scale": cfg.image_scale if cfg.guidance == "combined" else None,  # joint guidance has none
            "seed": cfg.seed, "images_per_prompt": cfg.images_per_prompt,
            "references": [{"file": f"{subject.name}/{p.name}", "sha256": file_sha256(p)} for p in subject.images[:k]],
            "segmenter": segmenter.describe(),
            "caching": {"subject": phrase, "prompt": caching_prompt,
                        "timestep": int(meta.get("cache_timestep", REFERENCE_TIMESTEP)), "seed": cfg.seed,
                        "resolution": pipe.resolution},
            "prompts": list(prompts)}


def generate_images(cfg: EvalConfig, pipe, segmenter, subjects: list[Subject], bench: Benchmark, out: Path,
                    k: int = 1, base: str = "") -> list[str]:
    """Caches each subject's first ``k`` images as one reference set and generates the images that are not on
    disk yet, after recording their provenance; a folder whose images another setup made is refused (``evaluate``
    checks every folder first). Returns the references that could not be segmented (cached whole)."""
    from dreamcache.generation import ReferenceCache, noun_phrase

    started, total = time.monotonic(), 0
    for n, subject in enumerate(subjects, 1):
        folder = images_folder(out, k) / subject.name
        prompts = bench.prompts(subject)[:cfg.prompts]
        record = setup(cfg, pipe, segmenter, base or pipe.adapters_metadata.get("base", ""), subject, prompts, k)
        reasons = provenance.stale(folder, record)
        if reasons:
            raise ValueError(provenance.refusal({folder: reasons}))
        todo = [(j, p) for j, p in enumerate(prompts)
                if not all((folder / f"{j:02d}-{i}.png").exists() for i in range(cfg.images_per_prompt))]
        if todo:
            provenance.write(folder, provenance.merged(folder, record))  # before the first image
            references = [cutout(segmenter, subject, i, pipe.resolution, out) for i in range(k)]
            cache_path = out / "caches" / f"{subject.name}{'' if k == 1 else f'-k{k}'}.safetensors"
            cache = ReferenceCache.load(cache_path) if cache_path.exists() else None
            made_for = provenance.digest(record)  # the adapters, the references, the caching seed and recipe
            if (cache is None or cache.metadata.get("adapters_sha256") != pipe.adapters_metadata["adapters_sha256"]
                    or cache.metadata.get("provenance") != made_for):
                cache = pipe.cache_reference(references, seed=cfg.seed, subject=noun_phrase(subject.noun),
                                             names=[str(p) for p in subject.images[:k]])
                cache.metadata["provenance"] = made_for
                cache.save(cache_path)
        for j, prompt in todo:  # the same seeds for every k: the images differ by their references alone
            gens = [torch.Generator().manual_seed(image_seed(cfg.seed, subject.name, j, i))
                    for i in range(cfg.images_per_prompt)]
            images = pipe(prompt, cache=cache, guidance=cfg.guidance, guidance_scale=cfg.text_scale,
                          image_guidance_scale=cfg.image_scale, num_inference_steps=cfg.steps,
                          num_images_per_prompt=cfg.images_per_prompt, generator=gens).images
            for i, image in enumerate(images):
                save_image(image, folder / f"{j:02d}-{i}.png")
            total += len(images)
        print(f"[{n}/{len(subjects)}] {subject.name}, {k} reference(s): {len(todo)} prompt(s) generated, "
              f"{len(prompts) - len(todo)} already on disk ({time.monotonic() - started:.0f}s, "
              f"{total} images this run)", flush=True)
    return [reference_cutout(out, s, i).stem for s in subjects for i in range(k) if unsegmented(out, s, i)]


def real_images(cfg: EvalConfig, subject: Subject, k: int) -> tuple[Path, ...]:
    """The real images generated ones are compared with: all of the subject's, its ``k`` references, or the
    rest (those no evaluated reference set uses, the same for every K of the run)."""
    return {"all": subject.images, "reference": subject.images[:k],
            "rest": subject.images[max(cfg.references):]}[cfg.compare]


def score(cfg: EvalConfig, embedder, segmenter, subjects: list[Subject], bench: Benchmark, out: Path,
          k: int = 1) -> dict:
    """Per-image scores for every image of ``subjects`` generated from ``k`` references, and under ``provenance``
    each scored folder's provenance.json as it stands beside the images."""
    from dreamcache.metrics import pairwise_mean

    records, folders = [], {}
    for subject in subjects:
        prompts = bench.prompts(subject)[:cfg.prompts]
        paths = [(j, i, images_folder(out, k) / subject.name / f"{j:02d}-{i}.png")
                 for j in range(len(prompts)) for i in range(cfg.images_per_prompt)]
        generated = [Image.open(p).convert("RGB") for _, _, p in paths]
        real = [on_white(Image.open(p)) for p in real_images(cfg, subject, k)]
        size = 224  # the metric models' input side; cut-outs are square
        real_cut = [c[0] for c in segmenter.cutouts(real, subject.noun, size) if c is not None]
        gen_cut = segmenter.cutouts(generated, subject.noun, size)
        image = embedder.clip_image(generated)
        sims = {"dino": pairwise_mean(embedder.dino(generated), embedder.dino(real)),
                "clip_i": pairwise_mean(image, embedder.clip_image(real))}
        text = embedder.clip_text(list(prompts))
        clip_t = torch.nn.functional.cosine_similarity(image, text[[j for j, _, _ in paths]], dim=-1)
        masked = [n for n, c in enumerate(gen_cut) if c is not None]
        mdino = mclip = None
        if masked and real_cut:
            cut = [gen_cut[n][0] for n in masked]
            mdino = pairwise_mean(embedder.dino(cut), embedder.dino(real_cut))
            mclip = pairwise_mean(embedder.clip_image(cut), embedder.clip_image(real_cut))
        where = {n: m for m, n in enumerate(masked)}
        folders[str((images_folder(out, k) / subject.name).relative_to(out))] = provenance.read(
            images_folder(out, k) / subject.name)
        for n, (j, i, p) in enumerate(paths):
            rec = {"subject": subject.name, "references": k, "prompt": prompts[j], "prompt_index": j, "image": i,
                   "path": str(p.relative_to(out)), "dino": float(sims["dino"][n]), "clip_i": float(sims["clip_i"][n]),
                   "clip_t": float(clip_t[n]), "mdino": None, "mclip_i": None}
            if mdino is not None and n in where:
                rec["mdino"], rec["mclip_i"] = float(mdino[where[n]]), float(mclip[where[n]])
            records.append(rec)
    return {**summarise(records), "provenance": folders}


def summarise(records: list[dict]) -> dict:
    """Means per subject and over all images (masked metrics over the images where the subject was found)."""
    def means(rows):
        out = {}
        for m in METRICS:
            vals = [r[m] for r in rows if r[m] is not None]
            out[m] = sum(vals) / len(vals) if vals else None
        out["images"] = len(rows)
        out["masked_images"] = sum(r["mdino"] is not None for r in rows)
        return out

    subjects = {}
    for r in records:
        subjects.setdefault(r["subject"], []).append(r)
    return {"overall": means(records), "subjects": {k: means(v) for k, v in subjects.items()}, "images": records}


def write_report(results: dict, cfg: EvalConfig, out: Path) -> None:
    results = {"config": {**asdict(cfg), "sampler": "DDIM, eta 0"}, "paper": PAPER, **results}
    write_file_atomic(out / "results.json", json.dumps(results, indent=1).encode())
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    ks = list(results["references"])
    lines = [f"# DreamBooth evaluation: {Path(cfg.adapters).name}", "",
             f"{cfg.images_per_prompt} image(s) per prompt, {cfg.steps} DDIM steps (eta 0), preset {cfg.preset}: "
             f"{cfg.guidance} guidance "
             f"(text {cfg.text_scale}" + (f", image {cfg.image_scale}" if cfg.guidance == "combined" else "") +
             f"), seed {cfg.seed}, references per subject: {', '.join(ks)} (its first images), real images: "
             f"{cfg.compare}.", ""]
    made = next(iter(results.get("provenance", {}).values()), None)
    if made:
        lines += [f"Images made by adapters sha256 {made['adapters_sha256']} on {made['base']} ({made['dtype']}, "
                  f"{made['sampler']['scheduler']}, eta {made['sampler']['eta']:g}); each images folder's "
                  "provenance.json records its setup (results.json: `provenance`).", ""]
    if len(ks) > 1:  # the overall scores of every reference count, side by side
        lines += ["| references | " + " | ".join(ks) + " |", "|---|" + "---|" * len(ks)]
        for m, label in zip(("images", *METRICS), ("images", *LABELS)):
            lines.append(f"| {label} | " + " | ".join(
                str(r["overall"][m]) if m == "images" else fmt(r["overall"][m]) for r in results["references"].values())
                + " |")
        lines.append("")
    for k, by_k in results["references"].items():
        if len(ks) > 1:
            lines += [f"## {k} reference(s) per subject", ""]
        lines += ["| subject | images | " + " | ".join(LABELS) + " | masked |", "|---|---|---|---|---|---|---|---|"]
        for name, s in list(by_k["subjects"].items()) + [("**overall**", by_k["overall"])]:
            lines.append(f"| {name} | {s['images']} | " + " | ".join(fmt(s[m]) for m in METRICS) +
                         f" | {s['masked_images']} |")
        lines.append("")
    if results.get("unsegmented_references"):
        lines += ["References cached unsegmented (the segmenter found no subject): "
                  + ", ".join(results["unsegmented_references"]) + ".", ""]
    paper = "; ".join(f"{base}: DINO {v['dino']}, CLIP-I {v['clip_i']}, CLIP-T {v['clip_t']}"
                      for base, v in PAPER.items())
    lines += [f"Paper (Table 2, one reference): {paper}.", ""]
    write_file_atomic(out / "results.md", "\n".join(lines).encode())


def write_grids(results: dict, out: Path, cell: int = 128) -> None:
    """grids/<subject>.jpg (grids/<subject>-kK.jpg from K references): the first reference's cut-out, then one
    row per prompt."""
    (out / "grids").mkdir(exist_ok=True)
    by_subject: dict[tuple[str, int], dict[int, list[str]]] = {}
    for r in results["images"]:
        key = (r["subject"], r.get("references", 1))
        by_subject.setdefault(key, {}).setdefault(r["prompt_index"], []).append(r["path"])
    for (subject, k), prompts in by_subject.items():
        cols = 1 + max(len(v) for v in prompts.values())
        grid = Image.new("RGB", (cols * cell, len(prompts) * cell), "white")
        ref = out / "references" / f"{subject}.png"
        for row, j in enumerate(sorted(prompts)):
            if ref.exists():
                grid.paste(Image.open(ref).convert("RGB").resize((cell, cell)), (0, row * cell))
            for col, p in enumerate(prompts[j], 1):
                grid.paste(Image.open(out / p).convert("RGB").resize((cell, cell)), (col * cell, row * cell))
        save_image(grid, out / "grids" / (f"{subject}.jpg" if k == 1 else f"{subject}-k{k}.jpg"), quality=90)


def evaluate(cfg: EvalConfig) -> dict:
    from dreamcache.generation import adapter_metadata, load_pipeline
    from dreamcache.metrics import Embedder
    from dreamcache.segmenter import grounding_config, make_segmenter, segmenter_models
    from dreamcache.bases import base_spec, checkpoint
    from dreamcache.models import check_available

    bench = load_benchmark(cfg.dreambooth)
    subjects = select(bench, cfg.subjects)
    need = max(cfg.references) + (cfg.compare == "rest")  # references, and at least one real image left
    short = [f"{s.name} ({len(s.images)})" for s in subjects if len(s.images) < need]
    if short:
        raise ValueError(f"--references {max(cfg.references)} with real images '{cfg.compare}' needs {need} images "
                         f"per subject; these have fewer: {', '.join(short)}")
    base = cfg.base or adapter_metadata(cfg.adapters)["base"]
    seg = grounding_config(cfg.profile, cfg.segmenter)
    for ref, role, flag in ((checkpoint(base), f"base model ({base})", "--base"), (cfg.dino, "DINO", "--dino"),
                            (cfg.clip, "CLIP", "--clip"), *((r, role, "--profile") for r, _, role in segmenter_models(seg))):
        check_available(ref, None, role, flag)  # every model, before the first one loads
    base_spec(base)  # a checkpoint of a family the toolkit knows
    out = Path(cfg.out)
    segmenter = make_segmenter(seg)
    pipe = load_pipeline(base, cfg.adapters, device=cfg.device, allow_other_base=cfg.allow_other_base)
    cfg.compile_pipeline(pipe)
    # Every images folder against this run's setup, before anything is written: refused, or cleared.
    setups = {images_folder(out, k) / s.name: setup(cfg, pipe, segmenter, base, s, bench.prompts(s)[:cfg.prompts], k)
              for k in cfg.references for s in subjects}
    stale = {folder: reasons for folder, record in setups.items() if (reasons := provenance.stale(folder, record))}
    if stale and not cfg.regenerate:
        raise ValueError(provenance.refusal(stale))
    for folder, reasons in stale.items():
        print(f"{folder}: made with another setup ({'; '.join(reasons)}); deleted its "
              f"{provenance.clear(folder)} image(s) to make them again (--regenerate)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    unsegmented = [name for k in cfg.references
                   for name in generate_images(cfg, pipe, segmenter, subjects, bench, out, k, base)]
    del pipe
    embedder = Embedder(cfg.dino, cfg.clip, device=cfg.device)
    by_k = {k: score(cfg, embedder, segmenter, subjects, bench, out, k) for k in cfg.references}
    first = by_k[cfg.references[0]]  # at the top level, as with one reference count
    results = {"overall": first["overall"], "subjects": first["subjects"],
               "references": {str(k): {"overall": r["overall"], "subjects": r["subjects"]} for k, r in by_k.items()},
               "images": [record for r in by_k.values() for record in r["images"]],
               "unsegmented_references": sorted(set(unsegmented)),
               "provenance": {folder: record for r in by_k.values() for folder, record in r["provenance"].items()}}
    write_report(results, cfg, out)
    write_grids(results, out)
    return results

