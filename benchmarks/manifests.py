"""`python -m manifests show` and `verify` on a synthetic dataset of N manifests (default 400 x 1000 samples).

    python benchmarks/manifests.py [--shards 400] [--samples 1000]

Writes the manifests, dataset.json and stand-in tars of the recorded sizes into a temporary folder (the fast
`verify` reads manifests and listings, never tar contents), then times each command end to end as a user
runs it, interpreter start included. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from manifests.index import Index
from manifests.schema import Manifest, SampleRecord, manifest_name, shard_name


def synthesize(out: Path, shards: int, per_shard: int) -> None:
    (out / "shards").mkdir(parents=True)
    (out / "manifests").mkdir()
    index = Index({"size": shards * per_shard, "plan": {"captions": shards * per_shard * 2,
                                                        "candidates": shards * per_shard}}, {})
    members = {"txt": 80, "json": 900, "target.jpg": 250_000, "reference.jpg": 40_000, "mask.png": 6_000}
    for i in range(shards):
        start = i * per_shard
        samples = [SampleRecord(key=f"s0-{start + j:08d}", index=start + j, caption=f"a red ceramic teapot number {j} "
                                "on a wooden kitchen counter, soft natural light", subject="red ceramic teapot",
                                category=f"category-{j % 48}", seed=start + j, members=members,
                                record={"det_score": 0.6, "sam_score": 0.95, "mask_area": 0.2}) for j in range(per_shard)]
        m = Manifest(shard=shard_name(i), sha256="0" * 64, bytes=4096, count=per_shard,
                     candidates=(start, start + per_shard), samples=samples, created="2026-01-01T00:00:00+00:00")
        (out / "shards" / m.shard).write_bytes(b"\0" * 4096)
        (out / "manifests" / manifest_name(i)).write_bytes(m.to_json())
        index.add(m)
    (out / "dataset.json").write_bytes(index.to_json(complete=True, status="complete"))


def timed(*argv: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "manifests", *argv], check=True, cwd=ROOT, capture_output=True)
    return round(time.perf_counter() - t, 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=400)
    p.add_argument("--samples", type=int, default=1000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ds"
        synthesize(out, args.shards, args.samples)
        mb = sum(f.stat().st_size for f in (out / "manifests").iterdir()) / 1e6
        print(json.dumps({"shards": args.shards, "samples": args.shards * args.samples, "manifest_mb": round(mb, 1),
                          "show_s": timed("show", str(out)), "verify_s": timed("verify", str(out))}))


if __name__ == "__main__":
    main()
