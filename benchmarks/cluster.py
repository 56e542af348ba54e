"""The pipeline on a simulated multi-node GPU cluster: how much of the GPUs' time goes to SDXL.

    python -m benchmarks.cluster                     # 3 nodes x 8 GPUs, H100 stage times at half scale
    python -m benchmarks.cluster --nodes 8 --size 20000 --scale 1.0

A local Ray cluster (``ray.cluster_utils.Cluster``: a head without GPUs and worker nodes declaring GPUs they
do not have, every node on this machine's loopback, 127.0.0.1) runs the real ``pipeline/run.py`` as ``ray job
submit`` would: its graph, fixed pools, writer and commit protocol, with the stand-in stages of
``pipeline/simulate.py``. Their time per batch of 8 is the H100
measurement (BENCHMARKS.md, GPU figures) times ``--scale``: SDXL 7.84 s eager; segmentation 0.50 s on the
device and 1.44 s on the host, with 2 calls per actor. Targets are 256 px, so that this machine's CPUs are not
what limits the run (the writer's throughput with real-size triplets is ``benchmarks/writer.py``).

Every figure is taken over one window, the steady state: from the first commit after every actor has finished
a batch of its own to the last commit before the first SDXL actor runs out of work (``steady``).
``sdxl_gpu_share`` is the SDXL actors' device time in it (each stand-in logs its intervals) over all the
cluster's GPU time; ``segment_gpu_busy`` the same for segmentation over the GPUs its pool holds;
``triplets_per_s`` the triplets committed in it, also against the ideal of every GPU on SDXL with nothing
waiting (``triplets_per_s_of_ideal``, which equals the SDXL share when the writer keeps up). ``--repeat`` runs
(3) on the same cluster give each figure's mean and spread. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SDXL_S, SEGMENT_DEVICE_S, SEGMENT_HOST_S = 7.84, 0.50, 1.44  # H100, per batch of 8 (benchmarks/reports/h100.json)
BATCH = 8


@contextmanager
def local_cluster(nodes: int, gpus: int, cpus: int):
    """A head (no GPU) and ``nodes`` worker nodes declaring ``gpus`` GPUs and ``cpus`` CPUs each, all on the
    loopback; yields (cluster, the environment a driver needs to join it)."""
    from ray.cluster_utils import Cluster

    from pipeline.connect import LOOPBACK, single_machine_ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.setdefault("RAY_num_prestart_python_workers", "0")  # no idle workers per declared CPU
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    with single_machine_ray():  # this process and the driver (its environment) resolve the cluster on the loopback
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": 0,
                                                                 "include_dashboard": False, "node_ip_address": LOOPBACK})
        try:
            for _ in range(nodes):
                add_worker(cluster, gpus, cpus)
            cluster.wait_for_nodes()
            yield cluster, {**os.environ, "RAY_ADDRESS": cluster.address}
        finally:
            cluster.shutdown()


def add_worker(cluster, gpus: int, cpus: int):
    """One more worker node on the loopback, declaring ``gpus`` GPUs and ``cpus`` CPUs (as the autoscaler adds
    a node)."""
    from pipeline.connect import LOOPBACK

    return cluster.add_node(num_cpus=cpus, num_gpus=gpus, node_ip_address=LOOPBACK)


def sim_settings(scale: float, segment_actors: int, target_actors: int, resolution: int = 256) -> list[str]:
    """``--set`` overrides for a run on stand-in stages: SDXL actors at 1 GPU, segmentation at a quarter."""
    sets = {"captions.backend": "template", "targets.model": f"simulate:{SDXL_S * scale:.3f}",
            "targets.resolution": resolution, "targets.batch_size": BATCH, "segment.batch_size": BATCH,
            "segment.detector": f"simulate:{SEGMENT_DEVICE_S * scale:.3f},{SEGMENT_HOST_S * scale:.3f}",
            "segment.reference_size": 128, "resources.target_actors": target_actors, "resources.target_gpus": 1,
            "resources.segment_actors": segment_actors, "resources.segment_gpus": 0.25,
            "resources.segment_calls": 2, "resources.segment_cpus": 1, "resources.wait_s": 600,
            "progress_interval": 10}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def run_pipeline(out: Path, size: int, shard_size: int, settings: list[str], env: dict, log: Path,
                 poll: float = 0.2, on_poll=None) -> tuple[int, dict[str, float]]:
    """Runs pipeline/run.py against the cluster in ``env``; returns (exit code, {manifest: wall-clock time it
    appeared}), on the stand-ins' clock (``time.time``), to within ``poll``."""
    cmd = [sys.executable, str(ROOT / "pipeline" / "run.py"), "--size", str(size), "--profile", "tiny", "--out",
           str(out), "--shard-size", str(shard_size), *settings]
    seen: dict[str, float] = {}

    def look() -> None:
        for m in (out / "manifests").glob("shard-*.json") if (out / "manifests").is_dir() else ():
            seen.setdefault(m.name, time.time())

    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=f, cwd=ROOT, env=env)
        while proc.poll() is None:
            time.sleep(poll)
            look()
            if on_poll is not None:
                on_poll(seen)
    look()
    return proc.returncode, seen


def actor_spans(trace: Path) -> list[tuple[str, list[tuple[float, float]]]]:
    """(stage, its device intervals in order) per stand-in actor (one trace file each)."""
    out = []
    for f in sorted(trace.glob("*.tsv")):
        rows = [line.split("\t") for line in f.read_text().splitlines() if line]
        if rows:
            out.append((rows[0][0], sorted((float(a), float(b)) for _, a, b, _ in rows)))
    return out


def steady(out: Path, seen: dict[str, float], trace: Path) -> dict[str, float]:
    """Every figure over one window, the steady state: from the first commit after every actor (SDXL and
    segmentation) has finished a batch of its own, to the last commit before the first SDXL actor runs out of
    work. Before it, actors that start minutes apart on a busy machine are still joining; after it, the plan
    drains. Returns the window, the triplets committed in it, and each stage's device seconds in it."""
    actors = actor_spans(trace)
    everyone_in = max(spans[0][1] for _, spans in actors)
    first_done = min(spans[-1][1] for stage, spans in actors if stage == "targets")
    ms = {p.name: json.loads(p.read_text()) for p in sorted((out / "manifests").glob("shard-*.json"))}
    commits = sorted((t, n) for n, t in seen.items() if everyone_in <= t <= first_done)
    if len(commits) < 3:
        raise RuntimeError(f"only {len(commits)} shard(s) committed while every actor was busy: raise --size "
                           "(or lower --shard-size) for a steady window")
    (lo, _), (hi, _) = commits[0], commits[-1]
    busy: dict[str, float] = {}
    for stage, spans in actors:
        busy[stage] = busy.get(stage, 0.0) + sum(max(0.0, min(b, hi) - max(a, lo)) for a, b in spans)
    return {"window_s": hi - lo, "shards": len(commits) - 1,
            "triplets": sum(ms[n]["count"] for _, n in commits[1:]), "busy": busy,
            "actors": {stage: sum(s == stage for s, _ in actors) for stage, _ in actors}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--cpus-per-node", type=int, default=12, help="declared, not real")
    p.add_argument("--segment-actors", type=int, default=4, help="at 0.25 GPU each (default pools: 12 for 64 GPUs)")
    p.add_argument("--scale", type=float, default=0.5, help="stage times x this")
    p.add_argument("--size", type=int, default=8000)
    p.add_argument("--shard-size", type=int, default=250)
    p.add_argument("--repeat", type=int, default=3, help="runs on the same cluster; the report gives each and their spread")
    args = p.parse_args(argv)
    gpus = args.nodes * args.gpus_per_node
    target_actors = gpus - math.ceil(args.segment_actors * 0.25)  # the segmentation pool's GPUs, rounded up
    settings = sim_settings(args.scale, args.segment_actors, target_actors)
    tmp = Path(tempfile.mkdtemp(prefix="dreamcache-cluster-"))
    try:
        return _measure(args, tmp, settings, gpus, target_actors, argv)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _measure(args, tmp: Path, settings: list[str], gpus: int, target_actors: int, argv) -> int:
    keep = 1 - 1 / 20  # the stand-in segmentation drops one sample in 20
    ideal = gpus / (SDXL_S * args.scale / BATCH) * keep  # triplets/s with every GPU on SDXL, nothing waiting
    runs = []
    os.environ["DREAMCACHE_SIMULATE_TRACE"] = str(tmp / "trace")  # the workers inherit it from the nodes
    with local_cluster(args.nodes, args.gpus_per_node, args.cpus_per_node) as (_, env):
        for i in range(args.repeat):
            trace, out, log = tmp / "trace", tmp / f"ds-{i}", tmp / f"run-{i}.log"
            shutil.rmtree(trace, ignore_errors=True)
            trace.mkdir()
            started = time.monotonic()
            code, seen = run_pipeline(out, args.size, args.shard_size, settings, env, log)
            index = out / "dataset.json"
            if code != 0 and not (index.exists() and json.loads(index.read_text()).get("complete")):
                print(log.read_text()[-4000:], file=sys.stderr)
                return code
            # A driver that dies after its dataset is complete (seen once: Ray Data's executor thread aborting in
            # an ObjectRefGenerator's __del__ as the process exits) still made every figure; its exit is reported.
            wall = time.monotonic() - started
            s = steady(out, seen, trace)
            rate = s["triplets"] / s["window_s"]
            runs.append({"wall_s": round(wall, 1), "driver_exit": code, "steady_window_s": round(s["window_s"], 1),
                         "steady_shards": s["shards"],
                         "sdxl_gpu_share": round(s["busy"]["targets"] / (gpus * s["window_s"]), 4),
                         "segment_gpu_busy": round(s["busy"].get("segment", 0.0) / (args.segment_actors * s["window_s"]), 4),
                         "triplets_per_s": round(rate, 2), "triplets_per_s_of_ideal": round(rate / ideal, 4)})
            print(json.dumps({"run": i + 1, **runs[-1]}), file=sys.stderr, flush=True)
    figures = ("sdxl_gpu_share", "triplets_per_s_of_ideal", "triplets_per_s", "segment_gpu_busy")
    report = {
        "command": "python -m benchmarks.cluster " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cluster": f"{args.nodes} nodes x {args.gpus_per_node} GPUs (simulated) + a head without GPUs",
        "pools": f"{target_actors} SDXL x 1 GPU, {args.segment_actors} segmentation x 0.25 GPU (2 calls each)",
        "stage_seconds_per_batch_of_8": {"sdxl": round(SDXL_S * args.scale, 3),
                                         "segment_device": round(SEGMENT_DEVICE_S * args.scale, 3),
                                         "segment_host": round(SEGMENT_HOST_S * args.scale, 3)},
        "size": args.size, "machine": f"{os.cpu_count()} CPU cores",
        "sdxl_pool_share": round(target_actors / gpus, 4), "ideal_triplets_per_s": round(ideal, 2),
        # Over the runs: the mean, and the spread (max - min) that says how well the figure reruns.
        **{name: {"mean": round(sum(r[name] for r in runs) / len(runs), 4),
                  "spread": round(max(r[name] for r in runs) - min(r[name] for r in runs), 4)} for name in figures},
        "runs": runs,
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
