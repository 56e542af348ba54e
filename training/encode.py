"""The target latent cache: every committed sample's target, VAE-encoded once, so training skips that encode.

    python -m training.encode DATA                      # SD 1.5 (the trainer's default base)
    python -m training.encode s3://bucket/ds --base sd21 --batch-size 32

Writes DATA/latents/<base>-<resolution>/<shard>.safetensors per committed shard: ``mean`` and ``std`` of the
VAE's latent distribution of each target (fp16, (N, 4, h, w)) in the order of ``keys`` (metadata), with the
base, resolution and the VAE's config hash. Each file is written atomically; a rerun skips shards already
done, so an interrupted encode resumes. The trainer uses the cache when every shard has its file and the
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


def cache_name(base: str, resolution: int) -> str:
    """The cache folder of a base model at a resolution: 'sd15-512', 'tiny-sd21-32', 'my-model-512'."""
    return f"{re.sub(r'[^a-z0-9]+', '-', Path(base).name.lower()).strip('-') or 'base'}-{resolution}"


def vae_hash(vae) -> str:
    """The VAE's architecture and scaling (its config, less the bookkeeping fields such as where it was loaded)."""
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def expected_metadata(base: str, resolution: int, vae) -> dict[str, str]:
    return {"format": FORMAT, "base": base, "resolution": str(resolution), "vae": vae_hash(vae)}


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


def find_cache(data: str, base: str, resolution: int, vae, urls: list[str]) -> tuple[str | None, str]:
    """(the cache folder's URL when every shard has its file, written for this base, resolution and VAE; else
    None, and why), for the trainer's log."""
    from dreamcache.store import Store

    store, folder = Store(data), f"{LATENTS}/{cache_name(base, resolution)}"
    hint = f"encoding targets on the fly (python -m training.encode {data} --base {base} writes one)"
    missing = stale(store, folder, urls, expected_metadata(base, resolution, vae))
    if len(missing) == len(urls):
        return None, f"none for {base} at {resolution} px with this VAE; {hint}"
    if missing:
        return None, f"{store.url(folder)} covers {len(urls) - len(missing)} of {len(urls)} shards; {hint}"
    return store.url(folder), f"using {store.url(folder)} ({len(urls)} shards): targets are not VAE-encoded"


@torch.no_grad()
def encode_shard(url: str, vae, resolution: int, batch_size: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(keys, mean, std) of every sample of one shard whose target decodes, a batch of targets in memory at a
    time; the others are left out (the trainer skips a sample without a latent and counts it)."""
    import fsspec

    from manifests.schema import tar_members
    from dreamcache.images import to_tensor
    from training.data import decode_target

    with fsspec.open(url, "rb") as f:
        members = tar_members(f.read())
    keys, means, stds, batch = [], [], [], []

    def flush():
        if batch:
            dist = vae.encode(torch.stack([x for _, x in batch]).to(vae.device, vae.dtype)).latent_dist
            keys.extend(k for k, _ in batch)
            means.append(dist.mean.to("cpu", torch.float16))
            stds.append(dist.std.to("cpu", torch.float16))
            batch.clear()

    for key in sorted(members):
        try:
            image = decode_target(members[key].get("target.jpg"), resolution)
        except Exception as e:  # noqa: BLE001 - a corrupt target: no latent, the trainer skips the sample
            print(f"  {shard_name(url)}/{key}: target not decodable ({type(e).__name__}); left out", file=sys.stderr)
            continue
        batch.append((key, to_tensor(image, resolution)))
        if len(batch) == batch_size:
            flush()
    flush()
    if not keys:
        return [], torch.empty(0), torch.empty(0)
    return keys, torch.cat(means), torch.cat(stds)


def encode(data: str, base: str, batch_size: int, device: str) -> int:
    from safetensors.torch import save

    from dreamcache.store import Store
    from training.data import shard_urls

    urls = shard_urls(data)
    vae, resolution = load_vae(base, device)
    store, folder = Store(data), f"{LATENTS}/{cache_name(base, resolution)}"
    meta = expected_metadata(base, resolution, vae)
    todo = stale(store, folder, urls, meta)  # missing, or written for another VAE: (re)encoded
    print(f"{len(urls)} shards, {len(urls) - len(todo)} already encoded; writing {store.url(folder)}", flush=True)
    started = time.monotonic()
    for n, url in enumerate(todo, 1):
        keys, mean, std = encode_shard(url, vae, resolution, batch_size)
        with store.open_atomic(folder, shard_name(url) + ".safetensors") as f:
            f.write(save({"mean": mean.contiguous(), "std": std.contiguous()}, metadata={**meta, "keys": json.dumps(keys)}))
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
    args = p.parse_args(argv)
    quiet_model_loading()
    try:
        shard_urls(args.data)  # a dataset, before the VAE loads
        check_available(checkpoint(args.base), None, f"base model ({args.base})", "--base")
        return encode(args.data, args.base, args.batch_size, args.device)
    except (FileNotFoundError, ValueError, PipelineError) as e:
        return fail(e)


if __name__ == "__main__":
    sys.exit(main())
