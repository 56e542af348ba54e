"""The shard writer's throughput with real-size triplets, into a local folder and into an S3 endpoint.

    python -m benchmarks.writer                       # local folder and a local S3 API (moto_server)
    python -m benchmarks.writer --s3-url s3://BUCKET/prefix   # a real bucket (credentials from the environment)

Feeds rows to ``ShardWriter`` exactly as the pipeline's driver loop does (plan order, one ``add`` per row, the
final commit waiting for every publication) and times the whole run. A triplet is what the paper profile
writes: the 1024 px target as JPEG (quality 95), the 512 px reference cut-out on white as JPEG, the 1024 px
mask as PNG, the caption and the sample's json. The images are DreamBooth photographs scaled to 1024 px (real
photographs compress like SDXL outputs; noise would not), or smooth synthetic images without the folder.
The local S3 API runs in its own process (``moto_server``), so it does not share this interpreter's GIL.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dreamcache.store import Store
from manifests.index import Index
from pipeline.writer import ShardWriter

DREAMBOOTH = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "dreambooth"


def triplets(n: int, folder: Path = DREAMBOOTH) -> list[dict[str, bytes]]:
    """``n`` distinct (target, reference, mask) payloads at the paper profile's sizes."""
    photos = sorted(folder.glob("*/*.jpg"))[:n] if folder.is_dir() else []
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        if photos:
            image = Image.open(photos[i % len(photos)]).convert("RGB").resize((1024, 1024), Image.Resampling.BICUBIC)
        else:  # smooth colour fields with some texture
            base = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            image = Image.fromarray(base).resize((1024, 1024), Image.Resampling.BICUBIC)
        mask = Image.new("L", (1024, 1024), 0)
        ImageDraw.Draw(mask).ellipse((256 + 8 * i % 64, 200, 768, 900), fill=255)
        reference = Image.composite(image, Image.new("RGB", image.size, "white"), mask).crop((128, 128, 896, 896))
        out.append({"target": _encode(image, "JPEG", quality=95),
                    "reference": _encode(reference.resize((512, 512), Image.Resampling.LANCZOS), "JPEG", quality=95),
                    "mask": _encode(mask, "PNG")})
    return out


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rows(samples: int, payloads: list[dict[str, bytes]]):
    for i in range(samples):
        p = payloads[i % len(payloads)]
        yield {"key": f"s0-{i:08d}", "index": i, "status": "ok", "error": "", "seed": i, "subject": "dog",
               "category": "dog", "caption": f"a photo of a small brown dog number {i} sitting on a wooden porch",
               "det_score": 0.61, "sam_score": 0.97, "mask_area": 0.21, "box": "100.5,80.25,700.0,900.0",
               "crop": "0,0,1024,1024", **p}


def run(store: Store, samples: int, shard_size: int, payloads: list[dict[str, bytes]]) -> dict:
    meta = {"models": {"targets": {"model": "stabilityai/stable-diffusion-xl-base-1.0"}},
            "generation": {"guidance_scale": 3.5, "steps": 25, "resolution": 1024}}
    writer = ShardWriter(store, Index({"size": samples}, {}), samples, shard_size, "jpg", meta, 0, 0)
    start = time.perf_counter()
    try:
        for row in rows(samples, payloads):
            writer.add(row)
        writer.commit(final=True)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    seconds = time.perf_counter() - start
    total = sum(store.sizes("shards").values())
    return {"samples": samples, "shard_size": shard_size, "seconds": round(seconds, 2),
            "triplets_per_s": round(samples / seconds, 1), "mb_per_s": round(total / seconds / 1e6, 1),
            "mb_per_triplet": round(total / samples / 1e6, 3)}


def moto_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=3000)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--payloads", type=int, default=24, help="distinct triplets cycled through")
    p.add_argument("--local-dir", help="folder to write into (default: a temporary folder)")
    p.add_argument("--s3-url", help="an s3:// prefix to write into (default: a local S3 API, moto_server)")
    p.add_argument("--skip-s3", action="store_true")
    args = p.parse_args(argv)
    payloads = triplets(args.payloads)
    report: dict = {"command": "python -m benchmarks.writer " + " ".join(argv or sys.argv[1:]),
                    "cpu": os.cpu_count(), "payloads": "dreambooth" if DREAMBOOTH.is_dir() else "synthetic"}
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(args.local_dir or tmp) / f"writer-{uuid.uuid4().hex[:8]}"
        report["local"] = run(Store(str(local)), args.samples, args.shard_size, payloads)
        shutil.rmtree(local, ignore_errors=True)
    if not args.skip_s3:
        server = None
        if args.s3_url:
            url = args.s3_url.rstrip("/") + f"/writer-{uuid.uuid4().hex[:8]}"
        else:
            import fsspec
            import s3fs

            server, endpoint = moto_server()
            os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                               "AWS_DEFAULT_REGION": "us-east-1"})
            fsspec.config.conf["s3"] = {"endpoint_url": endpoint}
            s3fs.S3FileSystem(endpoint_url=endpoint).mkdir("writer-bench")
            url = "s3://writer-bench/ds"
        try:
            report["s3"] = {**run(Store(url), args.samples, args.shard_size, payloads),
                            "endpoint": args.s3_url or "moto_server on this machine"}
        finally:
            if server is not None:
                server.terminate()
                server.wait()
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
