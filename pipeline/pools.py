"""The stages' actor pools, from the config: what each pool is, what they need together, shrinking them to one
machine, asking a cluster's autoscaler for them, and the arguments Ray Data builds them from.

A pool is named as its sizes are in ``ResourceConfig``: ``resources.<name>_actors`` and ``<name>_gpus``
(``caption``, and each sample stage's ``Stage.pool_name``). Pools are fixed, sized for 8 x 8 H100 by default,
never read off the cluster as it happens to be when the job starts (ARCHITECTURE.md, "Fixed pools").
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Any

from dreamcache.errors import PipelineError
from pipeline import stages
from pipeline.config import PipelineConfig, ResourceConfig

log = logging.getLogger("pipeline")
TITLES = {"caption": "captions (LLM)", **{s.pool_name: s.title for s in stages.SAMPLE_STAGES}}  # pool -> in messages


@dataclass(frozen=True)
class Pool:
    """One stage's fixed actor pool."""

    actors: int
    gpus: float  # per actor
    cpus: float  # per actor
    calls: int  # calls in flight per actor (threads: segmentation overlaps its host and device work)


def stage_pool(name: str, res: ResourceConfig) -> Pool:
    """The pool ``name`` as ``res`` sizes it."""
    segment = name == "segment"
    return Pool(actors=getattr(res, f"{name}_actors"), gpus=getattr(res, f"{name}_gpus"),
                cpus=res.segment_cpus if segment else res.cpus_per_actor, calls=res.segment_calls if segment else 1)


def demand(pools: tuple[str, ...], res: ResourceConfig) -> dict[str, float]:
    """GPUs and CPUs that ``pools`` need together: {"GPU": ..., "CPU": ...}."""
    sized = [stage_pool(name, res) for name in pools]
    return {"GPU": sum(p.actors * p.gpus for p in sized), "CPU": sum(p.actors * p.cpus for p in sized)}


def describe_pools(pools: tuple[str, ...], res: ResourceConfig) -> str:
    """"7 SDXL x 1 GPU, 4 segmentation x 0.25 GPU": for messages."""
    return ", ".join(f"{p.actors} {TITLES[name]} x {p.gpus:g} GPU" if p.gpus else
                     f"{p.actors} {TITLES[name]} x {p.cpus:g} CPU" for name in pools for p in [stage_pool(name, res)])


def fit_to_machine(pools: tuple[str, ...], res: ResourceConfig, gpus: float, cpus: float) -> ResourceConfig:
    """The ``pools`` shrunk to one machine's ``gpus`` and ``cpus`` (an embedded Ray cannot grow): GPU pools keep their
    proportions, CPU pools and the CPUs per actor shrink to the machine. Raises PipelineError when not even one
    actor per GPU stage fits."""
    changes: dict[str, float] = {}
    on_gpu = [s for s in pools if stage_pool(s, res).gpus > 0]
    need = demand(tuple(on_gpu), res)["GPU"]
    left = gpus
    for i, s in enumerate(on_gpu if need > gpus else []):
        p = stage_pool(s, res)
        later = sum(stage_pool(t, res).gpus for t in on_gpu[i + 1:])  # room kept for one actor of each later stage
        share = max(1, math.floor(p.actors * gpus / need)) if on_gpu[i + 1:] else p.actors
        n = min(share, math.floor((left - later) / p.gpus + 1e-9))
        if n < 1:
            raise PipelineError(
                f"the pools ({describe_pools(pools, res)}) do not fit this machine's {gpus:g} GPUs, not even one actor "
                f"per stage. Use --profile tiny, a Ray cluster (RAY_ADDRESS), or smaller shares, e.g. --set "
                f"resources.{s}_gpus={max(0.1, round(min(p.gpus, gpus) / 2, 2)):g}")
        changes[f"{s}_actors"], left = n, left - n * p.gpus
    for s in pools:
        p = stage_pool(s, res)
        if p.gpus == 0:
            changes[f"{s}_actors"] = max(1, min(p.actors, math.floor(cpus / p.cpus)))
    fitted = replace(res, **changes)
    cpu_need = demand(pools, fitted)["CPU"]
    if cpu_need > cpus:  # fractional CPUs: every actor still gets scheduled
        scale = cpus / cpu_need
        fitted = replace(fitted, cpus_per_actor=fitted.cpus_per_actor * scale, segment_cpus=fitted.segment_cpus * scale)
    return fitted


def provision(pools: tuple[str, ...], cfg: PipelineConfig, *, embedded: bool, cluster=None, request=None,
              clock=time.monotonic, sleep=time.sleep) -> PipelineConfig:
    """Makes sure the Ray cluster can hold ``pools`` (their names); returns the config to run them with.

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
        fitted = fit_to_machine(pools, res, have.get("GPU", 0.0), have.get("CPU", 1.0))
        if fitted != res:
            log.info("one machine (%g GPUs, %g CPUs): pools %s", have.get("GPU", 0), have.get("CPU", 0),
                     describe_pools(pools, fitted))
        return replace(cfg, resources=fitted)
    need = demand(pools, res)
    (request or request_pools)(pools, res)
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
                f"the Ray cluster has {state} that the pools need ({describe_pools(pools, res)}) after waiting "
                f"{waited:.0f} s. Check the autoscaler (ray status; max_workers in ray_cluster.yaml), raise --set "
                "resources.wait_s=..., or size the pools to the cluster with --set resources.<stage>_actors=...")
        if clock() - last >= 30 or waited == 0:
            log.info("waiting for the cluster to scale up: %s (%.0f of at most %.0f s)", state, waited, res.wait_s)
            last = clock()
        sleep(min(5.0, max(0.1, res.wait_s - waited)))


def request_pools(pools: tuple[str, ...], res: ResourceConfig) -> None:
    """Asks the autoscaler for one bundle per actor (none to release the request); a no-op without one."""
    from ray.autoscaler.sdk import request_resources

    bundles = []
    for name in pools:
        p = stage_pool(name, res)
        bundles += [{"CPU": p.cpus, **({"GPU": p.gpus} if p.gpus else {})}] * p.actors
    request_resources(bundles=bundles)


def ray_arguments(name: str, res: ResourceConfig) -> dict[str, Any]:
    """The keyword arguments of ``map_batches`` that make the pool ``name``: GPUs and CPUs per actor, and the
    fixed-size actor pool (threaded when an actor takes several calls at once)."""
    import ray.data

    p = stage_pool(name, res)
    threads = {"max_concurrent_calls_per_actor": p.calls, "enable_true_multi_threading": True} if p.calls > 1 else {}
    return {"num_gpus": p.gpus, "num_cpus": p.cpus, "compute": ray.data.ActorPoolStrategy(size=p.actors, **threads)}
