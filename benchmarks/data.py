"""Data cases: dedup scaling, the training loader's throughput, the Ray pipeline against a plain loop."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, clock


def case_dedup(sizes: list[int]) -> dict:
    rows = []
    for n in sizes:  # each size in a fresh process: its own peak RSS
        out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dedup.py"), "--sizes", str(n)],
                             check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    res = {"runs": rows}
    if len(rows) >= 2:
        res["time_scaling"] = round(rows[-1]["seconds"] / rows[0]["seconds"], 2)
        res["size_scaling"] = round(rows[-1]["captions"] / rows[0]["captions"], 2)
    return res


def synthetic_dataset(folder: Path, samples: int, size: int = 1024, ref_size: int = 512, per_shard: int = 32,
                      content: str = "noise", photos: list[Path] | None = None) -> str:
    """A dataset folder in the pipeline's format (USTAR shards and their manifests) at the paper profile's sizes
    (1024 px targets, 512 px references).
    ``content``: "noise" (every pixel random: the JPEG decoder's worst case), "smooth" (low-frequency colour
    fields with a little grain) or "photo" (``photos``, real photographs, resized)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    photo_index = iter(range(10**9))

    def jpeg(arr):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=95)
        return buf.getvalue()

    def image(n):
        if content == "photo":
            with Image.open(photos[next(photo_index) % len(photos)]) as im:
                return np.asarray(im.convert("RGB").resize((n, n), Image.Resampling.LANCZOS))
        if content == "noise":
            return rng.integers(0, 255, (n, n, 3), dtype=np.uint8)
        coarse = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((n, n), Image.Resampling.BICUBIC)
        grain = rng.normal(0, 4, (n, n, 3))
        return np.clip(np.asarray(coarse, np.float32) + grain, 0, 255).astype(np.uint8)

    from manifests.schema import Manifest, SampleRecord, manifest_name, shard_name

    (folder / "shards").mkdir(parents=True)
    (folder / "manifests").mkdir()
    for s in range(0, samples, per_shard):
        path = folder / "shards" / shard_name(s // per_shard)
        records = []
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(s, min(s + per_shard, samples)):
                key = f"s0-{i:08d}"
                target = image(size)
                mask = np.zeros((ref_size, ref_size), np.uint8)
                mask[ref_size // 4: 3 * ref_size // 4, ref_size // 4: 3 * ref_size // 4] = 255
                ref = np.where(mask[..., None] > 0, image(ref_size), 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(mask).resize((size, size)).save(buf, format="PNG")
                members = {"txt": b"a red cup on a table", "json": json.dumps({"key": key, "subject": "cup"}).encode(),
                           "target.jpg": jpeg(target), "reference.jpg": jpeg(ref), "mask.png": buf.getvalue()}
                for suffix, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                records.append(SampleRecord(key=key, index=i, caption="a red cup on a table", subject="cup",
                                            category="cup", seed=i, members={k: len(v) for k, v in members.items()}))
        manifest = Manifest(shard=path.name, sha256="0" * 64, bytes=path.stat().st_size, count=len(records),
                            candidates=(s, s + len(records)), samples=records)
        (folder / "manifests" / manifest_name(s // per_shard)).write_bytes(manifest.to_json())
    return str(folder)


def case_loader(samples: int, trainer_samples_per_s: float | None) -> dict:
    """Decoded and augmented samples/s of one loader process (one core): shards of 1024 px targets and 512 px
    references (the paper profile's) to 512 px tensors, for noise, smooth and (with the DreamBooth images at
    $DREAMBOOTH, default ../shared/datasets/dreambooth) photographic content."""
    from training.data import DataConfig, TrainingSet
    from training.shards import SampleIndex

    out = {"resolution": 512, "target_px": 1024, "reference_px": 512, "samples": samples}
    photos = sorted(Path(os.environ.get("DREAMBOOTH", ROOT.parent / "shared" / "datasets" / "dreambooth")).glob("*/*.jpg"))
    for content in ("noise", "smooth", "photo") if photos else ("noise", "smooth"):
        with tempfile.TemporaryDirectory() as tmp:
            data = synthetic_dataset(Path(tmp) / "ds", samples, content=content, photos=photos)
            dataset = TrainingSet(SampleIndex.from_store(data), DataConfig(resolution=512), seed=0)
            dataset[0]  # warm-up: the reader and the order
            seconds = clock(lambda d=dataset: [d[p] for p in range(1, samples)])
        out[f"samples_per_s_per_core_{content}"] = round((samples - 1) / seconds, 1)
    if trainer_samples_per_s:  # what the measured training step consumes
        out["trainer_consumes_samples_per_s"] = trainer_samples_per_s
        out["loader_cores_needed"] = round(trainer_samples_per_s / out["samples_per_s_per_core_noise"], 4)
    return out


def case_pipeline(sizes: list[int]) -> dict:
    """The Ray pipeline (pipeline/run.py, tiny profile) against a plain loop calling the same stage classes on
    the same planned captions, models loaded in both. Ray's time includes starting Ray and the driver; with
    two sizes, the difference between them is the marginal cost per sample, start-up cancelled out."""
    runs = [_pipeline_once(n) for n in sizes]
    out = {"runs": runs, "ratio": runs[-1]["ratio"]}
    if len(runs) == 2:
        a, b = runs
        extra = b["samples"] - a["samples"]
        out["marginal_ray_s_per_sample"] = round((b["ray_s"] - a["ray_s"]) / extra, 3)
        out["marginal_loop_s_per_sample"] = round((b["plain_loop_s"] - a["plain_loop_s"]) / extra, 3)
        if out["marginal_loop_s_per_sample"] > 0:
            out["marginal_ratio"] = round(out["marginal_ray_s_per_sample"] / out["marginal_loop_s_per_sample"], 2)
    return out


def _pipeline_once(size: int) -> dict:
    import numpy as np

    from dreamcache.store import Store
    from pipeline import stages
    from pipeline.config import build_config
    from pipeline.plan import existing_plan, load_plan

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ds"
        cmd = [sys.executable, str(ROOT / "pipeline" / "run.py"), "--size", str(size), "--profile", "tiny",
               "--out", str(out), "--shard-size", "16"]
        env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        ray_s = time.perf_counter() - start
        cfg = build_config("tiny", {"size": size, "shards.shard_size": 16})
        store = Store(str(out))
        plan = [r for rows in load_plan(store, existing_plan(store, cfg)).rows() for r in rows]
        consumed = json.loads((out / "dataset.json").read_text())["totals"]["candidates_consumed"]
    rows = [{**r, "status": "ok", "error": ""} for r in plan[:consumed]]
    start = time.perf_counter()  # the loop pays for its model loads too, as the Ray actors do
    chain = [stages.implementation(cfg, s)(stages.section(cfg, s), cfg.shards) for s in stages.active(cfg)]
    kept = 0
    for i in range(0, len(rows), cfg.targets.batch_size):
        chunk = rows[i:i + cfg.targets.batch_size]
        batch = {k: np.array([r[k] for r in chunk], dtype=object) for k in chunk[0]}
        for stage in chain:
            batch = stage(batch)
        kept += int((batch["status"] == "ok").sum())
    loop_s = time.perf_counter() - start
    return {"samples": size, "candidates": consumed, "ray_s": round(ray_s, 2), "plain_loop_s": round(loop_s, 2),
            "ray_samples_per_s": round(size / ray_s, 2), "loop_samples_per_s": round(kept / loop_s, 2),
            "ratio": round(ray_s / loop_s, 2)}

