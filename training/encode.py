"""The target latent cache: every committed sample's target, VAE-encoded once, so training skips that encode.

    python -m training.encode DATA                      # SD 1.5 (the trainer's default base)
    python -m training.encode s3://bucket/ds --base sd21 --batch-size 32

Writes DATA/latents/<base>-<resolution>/<shard>.safetensors per committed shard: ``mean`` and ``std`` of the
VAE's latent distribution of each target (fp16, (N, 4, h, w)) in the order of ``keys`` (metadata), with the
base, resolution and the VAE's config hash. With ``--reference-views K`` each file also holds ``references``
(fp16, (N, K, 4, h, w)): the VAE mean of K augmentations of each sample's reference, drawn in advance by the
trainer's own augmentation (``training.data.augment_reference``, view k seeded by (key, k)), for
``--reference-latents``. Each file is written atomically; a rerun skips shards already done, so an interrupted
encode resumes. The trainer uses the cache when every shard has its file and the
base, resolution and VAE match (``--no-latents`` to ignore it); it samples the latent from the stored
distribution with the same per-sample draw as without the cache. On a GPU the VAE runs in bf16 (the trainer
encodes in bf16 too); with the cache, a 512 px sample costs about 1.1 TFLOP less to train (BENCHMARKS.md).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

import torch

from training.data import safetensors_metadata
from training.shards import shard_name

LATENTS = "latents"
FORMAT = "dreamcache-latents/2"  # /2: targets decoded as the loader decodes them (JPEG draft scaling)


def cache_folder(data: str, base: str, resolution: int):
    """(the dataset's store, the cache's folder in it) for a base at a resolution."""
    from dreamcache.store import Store

    return Store(data), f"{LATENTS}/{cache_name(base, resolution)}"


def cache_name(base: str, resolution: int) -> str:
    """The cache folder of a base model at a resolution: 'sd15-512', 'tiny-sd21-32', 'my-model-512'."""
    return f"{re.sub(r'[^a-z0-9]+', '-', Path(base).name.lower()).strip('-') or 'base'}-{resolution}"


def vae_hash(vae) -> str:
    """The VAE's architecture and scaling (its config, less the bookkeeping fields such as where it was loaded)."""
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def expected_metadata(base: str, resolution: int, vae, reference_views: int = 0) -> dict[str, str]:
    """What a cache file must record to serve: with ``reference_views``, also that many pre-drawn views of each
    reference, drawn by the augmentation as it is now (its settings' hash)."""
    meta = {"format": FORMAT, "base": base, "resolution": str(resolution), "vae": vae_hash(vae)}
    if reference_views:
        meta.update(reference_views=str(reference_views), augmentation=augmentation_hash(resolution))
    return meta


def augmentation_hash(resolution: int) -> str:
    """The reference augmentation's settings (``DataConfig``'s, less the loader's own fields)."""
    from dataclasses import asdict

    from training.data import DataConfig

    settings = {k: v for k, v in asdict(DataConfig(resolution=resolution)).items()
                if k not in ("max_unreadable", "latents", "views", "reference_views")}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def reference_view(reference, key: str, k: int, resolution: int):
    """View ``k`` of a sample's reference as the cache holds it (before encoding): the trainer's augmentation,
    drawn from (key, k)."""
    import random

    from dreamcache.images import to_tensor
    from dreamcache.seeds import derive_seed
    from training.data import DataConfig, augment_reference

    rng = random.Random(derive_seed("reference-view", key, k))
    return to_tensor(augment_reference(reference, rng, DataConfig(resolution=resolution)), resolution)


def load_vae(base: str, device: str):
    """(the base's VAE, frozen, bf16 on a GPU as in the trainer; the base's resolution), without the U-Net."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from dreamcache.bases import native_resolution, resolve_base

    path = resolve_base(base)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae").to(device).requires_grad_(False).eval()
    if device.startswith("cuda"):
        vae.to(torch.bfloat16)
    return vae, native_resolution(UNet2DConditionModel.load_config(path, subfolder="unet")["sample_size"], vae)


def stale(store, folder: str, urls: list[str], want: dict[str, str]) -> list[str]:
    """The shards whose cache file is missing or was written for another base, resolution or VAE (each file's
    header is read, not the file)."""
    have = set(store.list(folder, ".safetensors"))
    out = []
    for url in urls:
        name = shard_name(url) + ".safetensors"
        if name not in have:
            out.append(url)
            continue
        with store.fs.open(store.path(folder, name), "rb") as f:
            meta = safetensors_metadata(f)
        if any(meta.get(k) != v for k, v in want.items()):
            out.append(url)
    return out


def listed(data: str, base: str, resolution: int, urls: list[str]) -> tuple[str, list[str]]:
    """(this copy of the dataset's cache folder URL, the shards without a file in it): one listing, no header
    read (rank 0 reads the headers for every rank: ``find_cache``)."""
    store, folder = cache_folder(data, base, resolution)
    have = set(store.list(folder, ".safetensors"))
    return store.url(folder), [url for url in urls if shard_name(url) + ".safetensors" not in have]


def reference_views(data: str, base: str, resolution: int, vae, urls: list[str]) -> int:
    """The pre-drawn reference views every shard's cache file holds for this base, resolution, VAE and the
    augmentation as it is now; ValueError saying how to write them when any file lacks them."""
    store, folder = cache_folder(data, base, resolution)
    first = f"{store.path(folder, shard_name(urls[0]))}.safetensors"
    try:
        with store.fs.open(first, "rb") as f:
            views = int(safetensors_metadata(f).get("reference_views", 0))
    except FileNotFoundError:
        views = 0
    missing = stale(store, folder, urls, expected_metadata(base, resolution, vae, views)) if views else urls
    if missing:
        raise ValueError(f"--reference-latents: {len(missing)} of {len(urls)} shards have no pre-drawn reference "
                         f"views in {store.url(folder)} for {base} at {resolution} px with this augmentation; write "
                         f"them with: python -m training.encode {data} --base {base} --reference-views K")
    return views


def find_cache(data: str, base: str, resolution: int, vae, urls: list[str]) -> tuple[str | None, str]:
    """(the cache folder's URL when every shard has its file, written for this base, resolution and VAE; else
    None, and why), for the trainer's log."""
    store, folder = cache_folder(data, base, resolution)
    hint = f"encoding targets on the fly (python -m training.encode {data} --base {base} writes one)"
    missing = stale(store, folder, urls, expected_metadata(base, resolution, vae))
    if len(missing) == len(urls):
        return None, f"none for {base} at {resolution} px with this VAE; {hint}"
    if missing:
        return None, f"{store.url(folder)} covers {len(urls) - len(missing)} of {len(urls)} shards; {hint}"
    return store.url(folder), f"using {store.url(folder)} ({len(urls)} shards): targets are not VAE-encoded"


@torch.no_grad()
def encode_shard(url: str, vae, resolution: int, batch_size: int,
                 views: int = 0) -> tuple[list[str], dict[str, torch.Tensor]]:
    """(keys, {"mean", "std", and with ``views`` "references"}) of every sample of one shard whose target (and
    reference) decodes, a batch of samples in memory at a time; the others are left out (the trainer skips a
    sample without a latent and counts it)."""
    import io

    import fsspec
    from PIL import Image

    from manifests.schema import tar_members
    from dreamcache.images import on_white, to_tensor
    from training.data import decode_target

    with fsspec.open(url, "rb") as f:
        members = tar_members(f.read())
    keys, out, batch = [], {"mean": [], "std": [], "references": []}, []

    def encode(images: list[torch.Tensor]):
        return vae.encode(torch.stack(images).to(vae.device, vae.dtype)).latent_dist

    def flush():
        if batch:
            dist = encode([x for _, x, _ in batch])
            keys.extend(k for k, _, _ in batch)
            out["mean"].append(dist.mean.to("cpu", torch.float16))
            out["std"].append(dist.std.to("cpu", torch.float16))
            if views:  # (n, K, 4, h, w): each sample's views together, encoded batch_size at a time
                flat = [v for _, _, vs in batch for v in vs]
                means = torch.cat([encode(flat[i:i + batch_size]).mean.to("cpu", torch.float16)
                                   for i in range(0, len(flat), batch_size)])
                out["references"].append(means.reshape(len(batch), views, *means.shape[1:]))
            batch.clear()

    for key in sorted(members):
        try:
            image = decode_target(members[key].get("target.jpg"), resolution)
            refs = []
            if views:
                data = next(v for s, v in members[key].items() if s.startswith("reference."))
                reference = on_white(Image.open(io.BytesIO(data)))
                refs = [reference_view(reference, key, k, resolution) for k in range(views)]
        except Exception as e:  # noqa: BLE001 - a corrupt sample: no latent, the trainer skips it
            print(f"  {shard_name(url)}/{key}: not decodable ({type(e).__name__}); left out", file=sys.stderr)
            continue
        batch.append((key, to_tensor(image, resolution), refs))
        if len(batch) == batch_size:
            flush()
    flush()
    return keys, {name: torch.cat(parts) for name, parts in out.items() if parts}


def encode(data: str, base: str, batch_size: int, device: str, views: int = 0) -> int:
    from safetensors.torch import save

    from training.data import shard_urls

    urls = shard_urls(data)
    vae, resolution = load_vae(base, device)
    store, folder = cache_folder(data, base, resolution)
    meta = expected_metadata(base, resolution, vae, views)
    todo = stale(store, folder, urls, meta)  # missing, or written for another VAE or views: (re)encoded
    what = f"targets and {views} reference view(s) per sample" if views else "targets"
    print(f"{len(urls)} shards, {len(urls) - len(todo)} already encoded; writing {what} to {store.url(folder)}",
          flush=True)
    started = time.monotonic()
    for n, url in enumerate(todo, 1):
        keys, tensors = encode_shard(url, vae, resolution, batch_size, views)
        if not keys:
            tensors = {"mean": torch.empty(0), "std": torch.empty(0)}
        with store.open_atomic(folder, shard_name(url) + ".safetensors") as f:
            f.write(save({k: v.contiguous() for k, v in tensors.items()}, metadata={**meta, "keys": json.dumps(keys)}))
        rate = n / (time.monotonic() - started)
        print(f"{n}/{len(todo)} {shard_name(url)}: {len(keys)} latents ({rate:.2f} shards/s, "
              f"about {(len(todo) - n) / rate / 60:.0f} min left)", flush=True)
    print(f"done: {store.url(folder)} (the trainer uses it for --base {base})", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from dreamcache.errors import PipelineError
    from dreamcache.models import check_available, default_device, quiet_model_loading
    from dreamcache.usage import Parser, fail, positive
    from training.data import shard_urls
    from dreamcache.bases import checkpoint

    p = Parser(prog="python -m training.encode", description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="a dataset folder or fsspec URL written by pipeline/run.py")
    p.add_argument("--base", default="sd15", help="the base model the adapters will train on (default sd15)")
    p.add_argument("--batch-size", type=positive, default=16)
    p.add_argument("--device", default=default_device())
    p.add_argument("--reference-views", type=int, default=0, metavar="K",
                   help="also K augmentations of each reference, drawn now and encoded, for the trainer's "
                        "--reference-latents (default 0: targets only)")
    args = p.parse_args(argv)
    if args.reference_views < 0:
        return fail(ValueError(f"--reference-views must be >= 0, got {args.reference_views}"))
    quiet_model_loading()
    try:
        shard_urls(args.data)  # a dataset, before the VAE loads
        check_available(checkpoint(args.base), None, f"base model ({args.base})", "--base")
        return encode(args.data, args.base, args.batch_size, args.device, args.reference_views)
    except (FileNotFoundError, ValueError, PipelineError) as e:
        return fail(e)


if __name__ == "__main__":
    sys.exit(main())
