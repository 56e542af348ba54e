"""The driver: makes or resumes a dataset at ``--out``. It checks the models and the folder, holds the run lock,
freezes (or reloads) the caption plan, and feeds the plan's candidates through the sample stages into the one
writer, in plan order, under the watchdog; then writes ``dataset.json``.

``run(cfg, out)`` is the whole job; ``pipeline/run.py`` is its command line.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from contextlib import closing
from importlib import metadata
from typing import Any

import prompts
from dreamcache.errors import PipelineError
from dreamcache.models import check_available
from dreamcache.store import Store
from manifests.card import write_card
from manifests.index import Index, now
from manifests.lock import RunLock, claim
from manifests.schema import DamagedManifest, read_index, read_manifests
from pipeline import simulate, stages
from pipeline.config import PipelineConfig
from pipeline.connect import init_ray
from pipeline.graphs import caption_on_ray, samples_on_ray
from pipeline.plan import commit_plan, existing_plan, load_plan
from pipeline.pools import provision, request_pools
from pipeline.progress import DropGuard, Progress, final_report
from pipeline.reorder import Reorder, Watchdog, watched
from pipeline.writer import ShardWriter, recover

log = logging.getLogger("pipeline")
PACKAGES = ("torch", "transformers", "diffusers", "ray", "webdataset", "numpy", "pillow", "vllm")


def check_models(cfg: PipelineConfig) -> None:
    import importlib.util

    if cfg.captions.backend == "transformers" and cfg.captions.constrained and not importlib.util.find_spec("xgrammar"):
        raise PipelineError("captions.constrained needs xgrammar for the transformers backend (the caption workers "
                            "would fail to start): pip install 'dreamcache[constrained]', or --set "
                            "captions.constrained=false")
    if cfg.targets.fp8 and not importlib.util.find_spec("torchao"):
        raise PipelineError("targets.fp8 needs torchao (the SDXL workers would fail to start): pip install "
                            "'dreamcache[fp8]', or --set targets.fp8=false")
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
        provisioned = provision(tuple(s.pool_name for s in stages.active(cfg)), cfg, embedded=embedded)
        reorder = Reorder(start)
        try:
            _feed(plan, start, provisioned, reorder, writer, progress, guard, lock)
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
    try:  # README.md: the dataset card, from what dataset.json now says (a user's own README.md stays)
        if write_card(store, final) is None:
            log.warning("%s is not a dataset card this toolkit wrote: left as it is", store.url("README.md"))
    except Exception as e:  # noqa: BLE001 - the card describes the dataset; it must not fail a finished run
        log.warning("the dataset card was not written (%s: %s)", type(e).__name__, e)
    print(final_report(final, cfg.size, store.uri, time.monotonic() - started), flush=True)
    return final


def _feed(plan, start: int, cfg: PipelineConfig, reorder: Reorder, writer: ShardWriter, progress: Progress,
          guard: DropGuard, lock: RunLock) -> None:
    """The plan's candidates from ``start`` through the sample stages into the writer, in plan order. The
    batches are waited for under the watchdog (``watched``): a stall raises Stalled in this thread. ``cfg``: the
    run's config with its pools as provisioned."""
    watchdog = Watchdog(reorder, cfg.resources.stall_s)
    for pending in plan.rows(start):  # one chunk of the plan at a time: memory bounded by a chunk
        with closing(watched(samples_on_ray(pending, cfg), watchdog)) as batches:
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
