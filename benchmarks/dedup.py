"""Dedup and balance at scale: time and peak memory for N synthetic captions.

    python benchmarks/dedup.py --sizes 100000 400000 [--semantic]

Captions come from the template backend (the same vocabulary the LLM is seeded with), so near duplicates
are common, as with a real LLM at 400k. Each size runs in a fresh process so peak RSS is its own.
Prints one JSON object per size.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one(n: int, semantic: bool) -> dict:
    import numpy as np

    from pipeline.captions import CaptionStage, make_requests
    from pipeline.config import CaptionConfig, DedupConfig
    from pipeline.dedup import dedup_and_balance

    cfg = CaptionConfig(backend="template")
    reqs = make_requests(-(-n // cfg.captions_per_request), seed=0, round_=0, cfg=cfg)
    batch = {k: np.array([r[k] for r in reqs], dtype=object) for k in reqs[0]}
    out = CaptionStage(cfg)(batch)
    rows = [{"caption": c, "subject": s, "category": k}
            for c, s, k in zip(out["caption"][:n], out["subject"][:n], out["category"][:n])]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    plan, drops = dedup_and_balance(rows, plan_size=int(len(rows) * 0.7), cfg=DedupConfig(semantic=semantic))
    seconds = time.perf_counter() - t
    return {"captions": len(rows), "semantic": semantic, "seconds": round(seconds, 2),
            "captions_per_s": round(len(rows) / seconds), "kept": len(plan), "drops": dict(drops),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "rss_before_dedup_mb": round(rss_before)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 400_000])
    p.add_argument("--semantic", action="store_true", help="include the MiniLM semantic dedup")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.semantic)))
        return
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--one", str(n)] + (["--semantic"] if args.semantic else [])
        print(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
