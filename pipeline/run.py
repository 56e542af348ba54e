"""Writes a DreamCache triplet dataset: captions -> dedup -> SDXL -> Grounding DINO + SAM -> shards.

    python pipeline/run.py --size 400k --out s3://bucket/dreamcache-400k
    ray job submit --working-dir . -- python pipeline/run.py --size 400k --out s3://bucket/dreamcache-400k
    python pipeline/run.py --size 48 --profile tiny --out /tmp/ds --shard-size 16

Running the same command again resumes. This file builds the Ray Data graphs and is the only place that
declares resources (GPUs, CPUs, actor pool sizes); the stages themselves are plain callable classes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python pipeline/run.py` puts pipeline/ first on sys.path, not the project
    sys.path.insert(0, str(ROOT))

from manifests.index import Index, now  # noqa: E402
import prompts  # noqa: E402
from manifests.lock import RunLock, claim  # noqa: E402
from manifests.schema import read_index  # noqa: E402
from manifests.store import Store, StoreError  # noqa: E402
from manifests.usage import INTERRUPTED, Parser, fail, positive  # noqa: E402
from pipeline.config import PipelineConfig, build_config, parse_override, parse_size  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline.models import check_available  # noqa: E402
from pipeline.plan import CaptionFailure, commit_plan, existing_plan, load_plan  # noqa: E402
from pipeline.progress import DropGuard, DropRateExceeded, Progress, final_report  # noqa: E402
from pipeline.writer import ShardWriter, recover  # noqa: E402

log = logging.getLogger("pipeline")
EXIT_INCOMPLETE = 3
PACKAGES = ("torch", "transformers", "diffusers", "ray", "webdataset", "datasketch", "numpy", "pillow", "vllm")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="pipeline/run.py", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", required=True, help="triplets to write: 2000, 400k, 1.5M")
    p.add_argument("--out", required=True, help="dataset folder: a local path or an fsspec URL (s3://, gs://, ...)")
    p.add_argument("--profile", default="paper", choices=["paper", "tiny"],
                   help="paper: the real checkpoints; tiny: tiny random models with the real architectures")
    p.add_argument("--shard-size", type=positive, help="samples per shard (default 1000; tiny: 16)")
    p.add_argument("--seed", type=int, help="run seed: same command and seed -> same sample keys (default 0)")
    p.add_argument("--config", help="YAML file of config overrides, shaped like PipelineConfig")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one config field, e.g. --set targets.steps=30 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
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


def check_models(cfg: PipelineConfig) -> None:
    import importlib.util

    if cfg.captions.backend == "transformers" and cfg.captions.constrained and not importlib.util.find_spec("xgrammar"):
        raise PipelineError("captions.constrained needs xgrammar for the transformers backend (the caption workers "
                            "would fail to start): pip install 'dreamcache[constrained]', or --set "
                            "captions.constrained=false")
    if cfg.captions.backend != "template":
        check_available(cfg.captions.model, cfg.captions.revision, "caption LLM", "--set captions.model")
    check_available(cfg.targets.model, cfg.targets.revision, "SDXL", "--set targets.model")
    check_available(cfg.segment.detector, cfg.segment.detector_revision, "Grounding DINO", "--set segment.detector")
    check_available(cfg.segment.segmenter, cfg.segment.segmenter_revision, "SAM", "--set segment.segmenter")


# ------------------------------------------------------------------------------------------ Ray graphs

def init_ray(verbose: bool = False) -> None:
    """Connects to RAY_ADDRESS's cluster or starts an embedded one. Quiet unless ``verbose``: no Ray Data
    progress blocks or INFO logs, and worker output stays in Ray's log files (``ray logs``, the dashboard)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token files for an embedded local cluster
    level = logging.INFO if verbose else logging.WARNING
    if os.environ.get("RAY_ADDRESS"):  # a cluster, or the one `ray job submit` runs us on
        log.info("connecting to the Ray cluster at %s", os.environ["RAY_ADDRESS"])
        ray.init(log_to_driver=verbose, logging_level=level)
    else:  # embedded local Ray; workers must import this project even when it is not pip-installed
        log.info("starting an embedded local Ray (set RAY_ADDRESS to use a cluster)")
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": path}}, include_dashboard=False, log_to_driver=verbose,
                 logging_level=level)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the writer consumes the plan in order
    ctx.enable_progress_bars = verbose
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(level)
    if not verbose:  # its one line saying that progress bars are off
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def _pool(gpus_per_actor: float, cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    """Ray remote args and an actor pool sized from the cluster for one stage."""
    import ray
    import ray.data

    res = ray.cluster_resources()
    limit = cfg.resources.max_actors or math.inf
    if gpus_per_actor > 0:
        if res.get("GPU", 0) < gpus_per_actor:
            raise PipelineError(f"the {stage} stage asks for {gpus_per_actor} GPU per actor but the Ray cluster has "
                               f"{res.get('GPU', 0)} GPUs. Run on a GPU cluster, use --profile tiny, or set "
                               f"--set resources.{stage}_gpus=0 to run it on CPU (slow).")
        size = int(min(res["GPU"] // gpus_per_actor, limit))
        return {"num_gpus": gpus_per_actor, "compute": ray.data.ActorPoolStrategy(min_size=1, max_size=size)}
    size = int(max(1, min(res.get("CPU", 1) // cfg.resources.cpus_per_actor, limit)))
    return {"num_cpus": cfg.resources.cpus_per_actor, "compute": ray.data.ActorPoolStrategy(min_size=1, max_size=size)}


def caption_on_ray(requests: list[dict[str, Any]], cfg: PipelineConfig) -> list[dict[str, Any]]:
    import ray.data

    from pipeline.captions import CaptionStage

    ds = ray.data.from_items(requests).map_batches(
        CaptionStage, fn_constructor_args=(cfg.captions,), batch_size=cfg.captions.batch_size,
        batch_format="numpy", **_pool(cfg.resources.caption_gpus, cfg, "caption"))
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()} for row in ds.take_all()]


def samples_on_ray(plan: list[dict[str, Any]], cfg: PipelineConfig):
    """The plan's candidates -> SDXL -> segmentation, streamed back in plan order."""
    import ray.data

    from pipeline.segment import SegmentStage
    from pipeline.targets import TargetStage

    rows = [{**r, "status": "ok", "error": ""} for r in plan]
    blocks = min(max(1, math.ceil(len(rows) / cfg.targets.batch_size)), 20_000)  # fine-grained, bounded overhead
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = ds.map_batches(TargetStage, fn_constructor_args=(cfg.targets, cfg.shards.jpeg_quality),
                        batch_size=cfg.targets.batch_size, batch_format="numpy",
                        **_pool(cfg.resources.target_gpus, cfg, "target"))
    ds = ds.map_batches(SegmentStage, fn_constructor_args=(cfg.segment, cfg.shards.jpeg_quality),
                        batch_size=cfg.segment.batch_size, batch_format="numpy",
                        **_pool(cfg.resources.segment_gpus, cfg, "segment"))
    return ds.iter_batches(batch_size=cfg.segment.batch_size, batch_format="numpy", prefetch_batches=2)


# ------------------------------------------------------------------------------------------ the run

def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def run(cfg: PipelineConfig, out: str, verbose: bool = False, break_lock: bool = False) -> dict[str, Any]:
    """Makes or resumes the dataset at ``out``; returns the final dataset.json.

    Holds ``out``'s run lock throughout; refuses a folder it did not create, and changes nothing before the
    checks (ownership, lock, configuration, committed shards) have passed.
    """
    store = Store(out)
    if not _complete(store, cfg):  # read-only: a missing model fails before --out is touched
        check_models(cfg)
    claim(store)
    with RunLock(store, force=break_lock) as lock:
        if lock.previous is not None:
            log.info("taking over from an interrupted run (%s)", lock.previous.describe())
        return _run(cfg, store, verbose, lock)


def _complete(store: Store, cfg: PipelineConfig) -> bool:
    """Whether ``store`` already holds this dataset, complete (then neither models nor Ray are needed)."""
    try:
        index = read_index(store)
    except (ValueError, OSError):
        return False
    return bool(index and index.get("complete") and index.get("size") == cfg.size)


def _run(cfg: PipelineConfig, store: Store, verbose: bool, lock: RunLock) -> dict[str, Any]:
    started = time.monotonic()
    found = existing_plan(store, cfg)  # before anything starts: a mismatched --out fails in a second
    manifests = recover(store)
    if manifests and not found:
        raise PipelineError(f"{store.uri} has committed shards but no caption plan (plan/plan.json): it was not "
                            "written by this pipeline or its plan was deleted. Write to a new --out.")
    if sum(m.count for m in manifests) < cfg.size:  # a finished dataset needs neither models nor Ray
        init_ray(verbose)
    plan = load_plan(store, found) if found else commit_plan(store, cfg, lambda reqs: caption_on_ray(reqs, cfg))
    plan_meta = plan.meta
    models = {"captions": {"backend": cfg.captions.backend, "model": cfg.captions.model, "revision": cfg.captions.revision},
              "targets": {"model": cfg.targets.model, "revision": cfg.targets.revision},
              "detector": {"model": cfg.segment.detector, "revision": cfg.segment.detector_revision},
              "segmenter": {"model": cfg.segment.segmenter, "revision": cfg.segment.segmenter_revision}}
    header = {"created": plan_meta.get("created", now()), "size": cfg.size, "config": cfg.to_dict(),
              "fingerprint": plan_meta["fingerprint"], "prompts_sha256": prompts.fingerprint(),
              "versions": versions(), "models": models,
              "plan": {k: v for k, v in plan_meta.items() if k != "drops"}}
    index = Index(header, plan_meta["drops"])
    for m in manifests:
        index.add(m)
    start = manifests[-1].candidates[1] if manifests else 0
    sample_meta = {"models": models, "generation": {"guidance_scale": cfg.targets.guidance_scale,
                                                   "steps": cfg.targets.steps, "resolution": cfg.targets.resolution}}
    writer = ShardWriter(store, index, cfg.size, cfg.shards.shard_size, cfg.segment.reference_format,
                         sample_meta, next_shard=len(manifests), next_candidate=start)
    if manifests:
        log.info("resuming: %d samples in %d committed shards, continuing at candidate %d",
                 index.samples, len(manifests), start)
    if not writer.done and start < plan.candidates:
        progress = Progress(cfg.size, index.samples, cfg.progress_interval, out=lambda s: log.info("%s", s))
        guard = DropGuard(cfg.drop_window, cfg.max_drop_rate)
        try:
            for pending in plan.rows(start):  # one chunk of the plan at a time: memory bounded by a chunk
                for batch in samples_on_ray(pending, cfg):
                    lock.check()  # another run took --out: stop before writing more
                    for i in range(len(batch["key"])):
                        writer.add({k: v[i] for k, v in batch.items()})
                        progress.update({"status": batch["status"][i]}, writer.written)
                        guard.update(str(batch["status"][i]), str(batch["error"][i]))
                    if writer.done:
                        break
                if writer.done:
                    break
            lock.check()
            writer.commit(final=True)  # the last, partial shard (size reached mid-shard, or the plan ran out)
        except BaseException:
            writer.abort()
            raise
    status = "complete" if writer.done else (
        f"the caption plan ran out after {index.consumed} candidates with {index.samples} of {cfg.size} triplets "
        f"written; see the drops above. Raise --set overgenerate=... (now {cfg.overgenerate}) in a new --out, "
        "or loosen the segment filters")
    final = index.to_dict(complete=writer.done, status=status)
    store.write_atomic(json.dumps(final, indent=1).encode(), "dataset.json")
    print(final_report(final, cfg.size, store.uri, time.monotonic() - started), flush=True)
    return final


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    try:
        cfg = resolve_config(args)
    except ValueError as e:
        return fail(e)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    try:
        final = run(cfg, args.out, verbose=args.verbose, break_lock=args.break_lock)
    except (CaptionFailure, DropRateExceeded) as e:  # not a usage mistake: the run cannot reach its size
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
