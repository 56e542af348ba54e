"""Writes a DreamCache triplet dataset: captions -> dedup -> SDXL -> Grounding DINO + SAM [-> CLIP] -> shards.

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
from contextlib import closing, contextmanager
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent

import prompts
from dreamcache.config import add_config_options, to_yaml
from dreamcache.errors import PipelineError
from dreamcache.models import check_available
from dreamcache.store import Store, StoreError
from dreamcache.usage import INTERRUPTED, Parser, fail, positive
from manifests.index import Index, now
from manifests.lock import LockLost, RunLock, claim
from manifests.schema import DamagedManifest, read_index, read_manifests
from pipeline import simulate, stages
from pipeline.config import PipelineConfig, ResourceConfig, build_config, parse_override, parse_size
from pipeline.plan import CaptionFailure, commit_plan, existing_plan, load_plan
from pipeline.progress import DropGuard, DropRateExceeded, Progress, final_report
from pipeline.reorder import Reorder, Stalled, Watchdog, watched
from pipeline.writer import ShardWriter, recover

log = logging.getLogger("pipeline")
EXIT_INCOMPLETE = 3
LOOPBACK = "127.0.0.1"  # where an embedded Ray's node lives: reachable from this machine only
PACKAGES = ("torch", "transformers", "diffusers", "ray", "webdataset", "numpy", "pillow", "vllm")


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


def check_models(cfg: PipelineConfig) -> None:
    import importlib.util

    if cfg.captions.backend == "transformers" and cfg.captions.constrained and not importlib.util.find_spec("xgrammar"):
        raise PipelineError("captions.constrained needs xgrammar for the transformers backend (the caption workers "
                            "would fail to start): pip install 'dreamcache[constrained]', or --set "
                            "captions.constrained=false")
    if cfg.captions.backend != "template":
        check_available(cfg.captions.model, cfg.captions.revision, "caption LLM", "--set captions.model")
    for m in stages.models(cfg):
        if simulate.is_simulated(m.ref):  # a stand-in stage (pipeline/simulate.py)
            try:
                simulate.seconds(m.ref)
            except ValueError as e:
                raise PipelineError(f"{m.flag}: {e}") from None
        else:
            check_available(m.ref, m.revision, m.role, m.flag)


# ------------------------------------------------------------------------------------------ Ray graphs

def init_ray(verbose: bool = False) -> bool:
    """Connects to RAY_ADDRESS's cluster or starts an embedded one; returns whether Ray is embedded (this machine
    alone). Quiet unless ``verbose``: no Ray Data progress blocks or INFO logs, and worker output stays in Ray's
    log files (``ray logs``, the dashboard)."""
    import ray

    embedded = not os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return embedded
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token files for an embedded local cluster
    level = logging.INFO if verbose else logging.WARNING
    if os.environ.get("RAY_ADDRESS"):  # a cluster, or the one `ray job submit` runs us on
        log.info("connecting to the Ray cluster at %s", os.environ["RAY_ADDRESS"])
        ray.init(log_to_driver=verbose, logging_level=level)
    else:  # embedded local Ray; workers must import this project even when it is not pip-installed
        log.info("starting an embedded local Ray on %s (set RAY_ADDRESS to use a cluster)", LOOPBACK)
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        # address="local": a new Ray of this run's own. Without it ray.init() joins the newest `ray start` cluster
        # on the machine (/tmp/ray/ray_current_cluster), and waits for ever when that cluster has gone.
        with single_machine_ray():
            ray.init(address="local", runtime_env={"env_vars": {"PYTHONPATH": path}}, include_dashboard=False,
                     log_to_driver=verbose, logging_level=level, _node_ip_address=LOOPBACK)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    # Blocks leave in the order they finish: a late block holds up no other (pipeline/reorder.py puts the rows
    # back in plan order for the writer).
    ctx.execution_options.preserve_order = False
    ctx.enable_progress_bars = verbose
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(level)
    if not verbose:  # its one line saying that progress bars are off
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    return embedded


@contextmanager
def single_machine_ray() -> Iterator[None]:
    """Makes the Ray nodes (and drivers) started inside the block keep to the loopback. Ray replaces a node address
    of 127.0.0.1 with the machine's network address (so that other machines could join) unless it runs as a
    one-machine Ray, as it does on macOS and Windows: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which Ray reads when
    it is imported (and into the constant set here, for a process that imported it before). Both are restored
    after the block: a node, once started, keeps its address, and a later ray.init to a cluster in this process
    resolves addresses as Ray does by default."""
    import ray._private.ray_constants as constants  # ray 2.60's home of that switch

    name = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    env, constant = os.environ.get(name), constants.ENABLE_RAY_CLUSTER
    os.environ[name], constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = constant
        if env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = env


STAGES = {"caption": "captions (LLM)", **{s.pool: s.title for s in stages.SAMPLE_STAGES}}  # pool -> its name


def pool(stage: str, res: ResourceConfig) -> dict[str, float]:
    """One stage's fixed actor pool: actors, GPUs and CPUs per actor, calls in flight per actor."""
    gpus = getattr(res, f"{stage}_gpus")
    return {"actors": getattr(res, f"{stage}_actors"), "gpus": gpus,
            "cpus": res.segment_cpus if stage == "segment" else res.cpus_per_actor,
            "calls": res.segment_calls if stage == "segment" else 1}


def demand(stages: tuple[str, ...], res: ResourceConfig) -> dict[str, float]:
    """GPUs and CPUs that the pools of ``stages`` need together."""
    pools = [pool(s, res) for s in stages]
    return {"GPU": sum(p["actors"] * p["gpus"] for p in pools), "CPU": sum(p["actors"] * p["cpus"] for p in pools)}


def describe(stages: tuple[str, ...], res: ResourceConfig) -> str:
    return ", ".join(f"{p['actors']} {STAGES[s]} x {p['gpus']:g} GPU" if p["gpus"] else
                     f"{p['actors']} {STAGES[s]} x {p['cpus']:g} CPU" for s in stages for p in [pool(s, res)])


def fit_to_machine(stages: tuple[str, ...], res: ResourceConfig, gpus: float, cpus: float) -> ResourceConfig:
    """The pools shrunk to one machine's ``gpus`` and ``cpus`` (an embedded Ray cannot grow): GPU pools keep their
    proportions, CPU pools and the CPUs per actor shrink to the machine. Raises PipelineError when not even one
    actor per GPU stage fits."""
    changes: dict[str, float] = {}
    on_gpu = [s for s in stages if pool(s, res)["gpus"] > 0]
    need = demand(tuple(on_gpu), res)["GPU"]
    left = gpus
    for i, s in enumerate(on_gpu if need > gpus else []):
        p = pool(s, res)
        later = sum(pool(t, res)["gpus"] for t in on_gpu[i + 1:])  # room kept for one actor of each later stage
        share = max(1, math.floor(p["actors"] * gpus / need)) if on_gpu[i + 1:] else p["actors"]
        n = min(share, math.floor((left - later) / p["gpus"] + 1e-9))
        if n < 1:
            raise PipelineError(
                f"the pools ({describe(stages, res)}) do not fit this machine's {gpus:g} GPUs, not even one actor per "
                f"stage. Use --profile tiny, a Ray cluster (RAY_ADDRESS), or smaller shares, e.g. --set "
                f"resources.{s}_gpus={max(0.1, round(min(p['gpus'], gpus) / 2, 2)):g}")
        changes[f"{s}_actors"], left = n, left - n * p["gpus"]
    for s in stages:
        p = pool(s, res)
        if p["gpus"] == 0:
            changes[f"{s}_actors"] = max(1, min(p["actors"], math.floor(cpus / p["cpus"])))
    fitted = replace(res, **changes)
    cpu_need = demand(stages, fitted)["CPU"]
    if cpu_need > cpus:  # fractional CPUs: every actor still gets scheduled
        scale = cpus / cpu_need
        fitted = replace(fitted, cpus_per_actor=fitted.cpus_per_actor * scale, segment_cpus=fitted.segment_cpus * scale)
    return fitted


def provision(stages: tuple[str, ...], cfg: PipelineConfig, *, embedded: bool, cluster=None, request=None,
              clock=time.monotonic, sleep=time.sleep) -> PipelineConfig:
    """Makes sure the Ray cluster can hold the pools of ``stages``; returns the config to run them with.

    An embedded Ray is one machine: pools larger than it are shrunk to fit. A cluster is asked for the pools
    (the autoscaler's ``request_resources``) and waited for, with a line every 30 s, up to ``resources.wait_s``.
    ``cluster`` (the cluster's total resources) and ``request`` default to Ray's.
    """
    if cluster is None:
        import ray

        cluster = ray.cluster_resources
    res = cfg.resources
    have = cluster()
    if embedded:
        fitted = fit_to_machine(stages, res, have.get("GPU", 0.0), have.get("CPU", 1.0))
        if fitted != res:
            log.info("one machine (%g GPUs, %g CPUs): pools %s", have.get("GPU", 0), have.get("CPU", 0),
                     describe(stages, fitted))
        return replace(cfg, resources=fitted)
    need = demand(stages, res)
    (request or request_pools)(stages, res)
    started = last = clock()
    while True:
        have = cluster()
        short = {k: v for k, v in need.items() if have.get(k, 0.0) + 1e-9 < v}
        if not short:
            return cfg
        waited = clock() - started
        state = ", ".join(f"{have.get(k, 0.0):g} of {v:g} {k}s" for k, v in need.items())
        if waited >= res.wait_s:
            raise PipelineError(
                f"the Ray cluster has {state} that the pools need ({describe(stages, res)}) after waiting "
                f"{waited:.0f} s. Check the autoscaler (ray status; max_workers in ray_cluster.yaml), raise --set "
                "resources.wait_s=..., or size the pools to the cluster with --set resources.<stage>_actors=...")
        if clock() - last >= 30 or waited == 0:
            log.info("waiting for the cluster to scale up: %s (%.0f of at most %.0f s)", state, waited, res.wait_s)
            last = clock()
        sleep(min(5.0, max(0.1, res.wait_s - waited)))


def request_pools(stages: tuple[str, ...], res: ResourceConfig) -> None:
    """Asks the autoscaler for one bundle per actor (none to release the request); a no-op without one."""
    from ray.autoscaler.sdk import request_resources

    bundles = []
    for s in stages:
        p = pool(s, res)
        bundles += [{"CPU": p["cpus"], **({"GPU": p["gpus"]} if p["gpus"] else {})}] * p["actors"]
    request_resources(bundles=bundles)


def _pool(stage: str, res: ResourceConfig) -> dict[str, Any]:
    """Ray remote args and the fixed actor pool for one stage."""
    import ray.data

    p = pool(stage, res)
    threads = {"max_concurrent_calls_per_actor": p["calls"], "enable_true_multi_threading": True} if p["calls"] > 1 else {}
    return {"num_gpus": p["gpus"], "num_cpus": p["cpus"], "compute": ray.data.ActorPoolStrategy(size=p["actors"], **threads)}


def caption_on_ray(requests: list[dict[str, Any]], cfg: PipelineConfig) -> list[dict[str, Any]]:
    import ray.data

    from pipeline.captions import CaptionStage

    ds = ray.data.from_items(requests).map_batches(
        CaptionStage, fn_constructor_args=(cfg.captions,), batch_size=cfg.captions.batch_size,
        batch_format="numpy", **_pool("caption", cfg.resources))
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()} for row in ds.take_all()]


def plan_blocks(plan: list[dict[str, Any]], batch_size: int, max_blocks: int = 20_000) -> list:
    """The plan's rows as Arrow tables of a whole number of batches each (the last may be short), so that every
    SDXL call gets a full batch; as fine-grained as one batch per block, at most ``max_blocks`` blocks."""
    import pyarrow as pa

    rows = [{**r, "status": "ok", "error": ""} for r in plan]
    step = batch_size * max(1, math.ceil(len(rows) / (batch_size * max_blocks)))
    return [pa.Table.from_pylist(rows[i:i + step]) for i in range(0, len(rows), step)]


def samples_on_ray(plan: list[dict[str, Any]], cfg: PipelineConfig):
    """The plan's candidates through the active sample stages (SDXL -> segmentation [-> CLIP filter]), each a
    fixed actor pool; blocks come back as they finish (``Reorder`` puts the rows back in plan order)."""
    import ray.data

    chain = stages.active(cfg)
    ds = ray.data.from_arrow(plan_blocks(plan, stages.section(cfg, chain[0]).batch_size))
    for stage in chain:
        part = stages.section(cfg, stage)
        ds = ds.map_batches(stage.implementation(part), fn_constructor_args=(part, cfg.shards),
                            batch_size=part.batch_size, batch_format="numpy", **_pool(stage.pool, cfg.resources))
    last = stages.section(cfg, chain[-1]).batch_size
    return ds.iter_batches(batch_size=last, batch_format="numpy", prefetch_batches=2)


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
    checks (ownership, lock, configuration, committed shards) have passed. A dataset whose committed shards
    already hold ``size`` triplets (or the whole plan) is only indexed: no model is checked, Ray is not started.
    """
    store = Store(out)
    if not _finished(store, cfg):  # read-only: a missing model fails before --out is touched
        check_models(cfg)
    claim(store)
    with RunLock(store, force=break_lock) as lock:
        if lock.previous is not None:
            log.info("taking over from an interrupted run (%s)", lock.previous.describe())
        return _run(cfg, store, verbose, lock)


def _finished(store: Store, cfg: PipelineConfig) -> bool:
    """Whether ``store`` already holds this dataset's samples: ``dataset.json`` says complete, or the committed
    manifests hold ``size`` triplets or consume the whole plan (a run stopped after its last commit, before its
    final ``dataset.json``). Reads only; anything unreadable is left for the run's own checks to report."""
    try:
        index = read_index(store)
        if index and index.get("complete") and index.get("size") == cfg.size:
            return True
        if not store.exists("plan", "plan.json"):
            return False
        manifests = read_manifests(store)
        plan = json.loads(store.read_bytes("plan", "plan.json"))
    except (ValueError, OSError, DamagedManifest):
        return False
    return _exhausted(manifests, cfg.size, plan["candidates"])


def _exhausted(manifests, size: int, candidates: int) -> bool:
    """Whether committed ``manifests`` leave nothing to do: ``size`` triplets, or every plan candidate consumed."""
    return sum(m.count for m in manifests) >= size or bool(manifests and manifests[-1].candidates[1] >= candidates)


def _run(cfg: PipelineConfig, store: Store, verbose: bool, lock: RunLock) -> dict[str, Any]:
    started = time.monotonic()
    found = existing_plan(store, cfg)  # before anything starts: a mismatched --out fails in a second
    manifests = recover(store)
    if manifests and not found:
        raise PipelineError(f"{store.uri} has committed shards but no caption plan (plan/plan.json): it was not "
                            "written by this pipeline or its plan was deleted. Write to a new --out.")
    embedded = True
    if not (found and _exhausted(manifests, cfg.size, found["candidates"])):  # else only the index is left to write
        embedded = init_ray(verbose)
    try:
        return _write(cfg, store, lock, found, manifests, embedded, started)
    finally:
        if not embedded:
            request_pools((), cfg.resources)  # the autoscaler may scale down again


def _write(cfg: PipelineConfig, store: Store, lock: RunLock, found, manifests, embedded: bool,
           started: float) -> dict[str, Any]:
    plan = load_plan(store, found) if found else commit_plan(
        store, cfg, lambda reqs: caption_on_ray(reqs, provision(("caption",), cfg, embedded=embedded)))
    plan_meta = plan.meta
    models = {"captions": {"backend": cfg.captions.backend, "model": cfg.captions.model, "revision": cfg.captions.revision},
              **{m.key: {"model": m.ref, "revision": m.revision} for m in stages.models(cfg)}}
    header = {"created": plan_meta.get("created", now()), "size": cfg.size, "config": cfg.to_dict(),
              "fingerprint": plan_meta["fingerprint"], "prompts_sha256": prompts.fingerprint(cfg.captions.vocabulary or prompts.VOCABULARY),
              "versions": versions(), "models": models, "stages": stages.describe(cfg),
              "plan": {k: v for k, v in plan_meta.items() if k != "drops"}}
    index = Index(header, plan_meta["drops"])
    for m in manifests:
        index.add(m)
    start = manifests[-1].candidates[1] if manifests else 0
    sample_meta = {"models": models, "generation": {"guidance_scale": cfg.targets.guidance_scale,
                                                   "steps": cfg.targets.steps, "resolution": cfg.targets.resolution}}
    writer = ShardWriter(store, index, cfg.size, cfg.shards.shard_size, cfg.segment.reference_format,
                         sample_meta, next_shard=len(manifests), next_candidate=start, check=lock.check, run=lock.id,
                         stages=stages.active(cfg))
    if manifests:
        log.info("resuming: %d samples in %d committed shards, continuing at candidate %d",
                 index.samples, len(manifests), start)
    if not writer.done and start < plan.candidates:
        progress = Progress(cfg.size, index.samples, cfg.progress_interval, out=lambda s: log.info("%s", s))
        guard = DropGuard(cfg.drop_window, cfg.max_drop_rate)
        pools = provision(tuple(s.pool for s in stages.active(cfg)), cfg, embedded=embedded)
        reorder = Reorder(start)
        try:
            _feed(plan, start, pools, reorder, writer, progress, guard, lock)
            if reorder.most_held:
                log.info("blocks finished out of plan order: at most %d rows were held for the writer at once",
                         reorder.most_held)
            writer.commit(final=True)  # the last, partial shard (size reached mid-shard, or the plan ran out)
        except BaseException:
            writer.abort()
            raise
    writer.close()
    status = "complete" if writer.done else (
        f"the caption plan ran out after {index.consumed} candidates with {index.samples} of {cfg.size} triplets "
        f"written; see the drops above. Raise --set overgenerate=... (now {cfg.overgenerate}) in a new --out, "
        "or loosen the segment filters")
    final = index.to_dict(complete=writer.done, status=status)
    lock.check()
    store.write_atomic(json.dumps(final, indent=1).encode(), "dataset.json")
    print(final_report(final, cfg.size, store.uri, time.monotonic() - started), flush=True)
    return final


def _feed(plan, start: int, pools: PipelineConfig, reorder: Reorder, writer: ShardWriter, progress: Progress,
          guard: DropGuard, lock: RunLock) -> None:
    """The plan's candidates from ``start`` through the sample stages into the writer, in plan order. The
    batches are waited for under the watchdog (``watched``): a stall raises Stalled in this thread."""
    watchdog = Watchdog(reorder, pools.resources.stall_s)
    for pending in plan.rows(start):  # one chunk of the plan at a time: memory bounded by a chunk
        with closing(watched(samples_on_ray(pending, pools), watchdog)) as batches:
            for batch in batches:
                lock.check(fresh=False)  # the heartbeat saw another run take --out: stop before writing more
                for row in reorder.push(batch):
                    writer.add(row)
                    progress.update(row, writer.written)
                    guard.update(str(row["status"]), str(row["error"]))
                    if writer.done:
                        return
        end = int(pending[-1]["index"]) + 1
        if reorder.next != end:  # Ray Data finished the chunk without some of its rows
            gap = reorder.missing() or f"{reorder.next}-{end - 1}"
            raise PipelineError(f"candidates {gap} never came back from the sample stages; committed shards are "
                                "kept: run the same command again to redo them")


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
