"""Writes a DreamCache triplet dataset: captions -> dedup -> SDXL -> Grounding DINO + SAM [-> CLIP] -> shards.

    python pipeline/run.py --size 400k --out s3://bucket/dreamcache-400k
    ray job submit --working-dir . -- python pipeline/run.py --size 400k --out s3://bucket/dreamcache-400k
    python pipeline/run.py --size 48 --profile tiny --out /tmp/ds --shard-size 16

Running the same command again resumes. This file is the command line; the job is pipeline/driver.py's ``run``,
on the Ray of pipeline/connect.py, with the pools of pipeline/pools.py (the one place that declares resources)
and the graphs of pipeline/graphs.py; the stages themselves are plain callable classes.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from dreamcache.config import add_config_options, to_yaml
from dreamcache.errors import PipelineError
from dreamcache.store import StoreError
from dreamcache.usage import INTERRUPTED, Parser, fail, positive
from manifests.lock import LockLost
from pipeline.config import PipelineConfig, build_config, parse_override, parse_size
from pipeline.driver import run
from pipeline.plan import CaptionFailure
from pipeline.progress import DropRateExceeded
from pipeline.reorder import Stalled

EXIT_INCOMPLETE = 3  # the run stopped before its size and can be resumed (or its plan ran out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="pipeline/run.py", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", required=True, help="triplets to write: 2000, 400k, 1.5M")
    p.add_argument("--out", required=True, help="dataset folder: a local path or an fsspec URL (s3://, gs://, ...)")
    p.add_argument("--profile", default="paper", choices=["paper", "tiny"],
                   help="paper: the real checkpoints; tiny: tiny random models with the real architectures")
    p.add_argument("--shard-size", type=positive, help="samples per shard (default 1000; tiny: 16)")
    p.add_argument("--seed", type=int, help="run seed: same command and seed -> same sample keys (default 0)")
    add_config_options(p, "targets.steps=30")
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's own progress blocks, worker output and model-loading bars")
    p.add_argument("--break-lock", action="store_true",
                   help="take over --out although its lock says another run is writing to it (only when that run "
                        "is certainly gone, e.g. its machine was lost less than 5 minutes ago)")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> PipelineConfig:
    overrides: dict[str, Any] = dict(parse_override(o) for o in args.overrides)
    overrides["size"] = parse_size(args.size)
    if args.shard_size is not None:
        overrides["shards.shard_size"] = args.shard_size
    if args.seed is not None:
        overrides["seed"] = args.seed
    return build_config(args.profile, overrides, args.config)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    try:
        cfg = resolve_config(args)
    except ValueError as e:
        return fail(e)
    if args.print_config:
        print(to_yaml(cfg))
        return 0
    try:
        final = run(cfg, args.out, verbose=args.verbose, break_lock=args.break_lock)
    except (CaptionFailure, DropRateExceeded, Stalled, LockLost) as e:  # not a usage mistake: the run cannot go on
        fail(e)
        return EXIT_INCOMPLETE
    except (PipelineError, StoreError) as e:  # StoreError: --out unusable, not ours, or locked by a live run
        return fail(e)
    except KeyboardInterrupt:
        print(f"interrupted: committed shards are kept; run the same command to resume {args.out}",
              file=sys.stderr, flush=True)
        return INTERRUPTED
    return 0 if final["complete"] else EXIT_INCOMPLETE


if __name__ == "__main__":
    sys.exit(main())
