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

The figures, over the steady state (the middle 80% of the time between the first and the last SDXL batch):
``sdxl_gpu_share``, the SDXL actors' device time (each stand-in logs its intervals) over all the cluster's GPU
time; ``segment_gpu_busy``, the same for segmentation over the GPUs its pool holds; and the writer's rate from
its first to its last full shard, in triplets per second, against the ideal of every GPU on SDXL with
nothing waiting. Prints one JSON object.
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

    from pipeline.run import LOOPBACK, single_machine_ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.setdefault("RAY_num_prestart_python_workers", "0")  # no idle workers per declared CPU
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    single_machine_ray()  # this process and the driver (its environment) resolve the cluster on the loopback
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": 0, "include_dashboard": False,
                                                             "node_ip_address": LOOPBACK})
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
    from pipeline.run import LOOPBACK

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
    """Runs pipeline/run.py against the cluster in ``env``; returns (exit code, {manifest: time it appeared})."""
    cmd = [sys.executable, str(ROOT / "pipeline" / "run.py"), "--size", str(size), "--profile", "tiny", "--out",
           str(out), "--shard-size", str(shard_size), *settings]
    seen: dict[str, float] = {}
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=f, cwd=ROOT, env=env)
        while proc.poll() is None:
            time.sleep(poll)
            for m in (out / "manifests").glob("shard-*.json") if (out / "manifests").is_dir() else ():
                seen.setdefault(m.name, time.monotonic())
            if on_poll is not None:
                on_poll(seen)
    for m in (out / "manifests").glob("shard-*.json") if (out / "manifests").is_dir() else ():
        seen.setdefault(m.name, time.monotonic())
    return proc.returncode, seen


def steady_rate(out: Path, seen: dict[str, float], shard_size: int) -> dict[str, float]:
    """Candidates and triplets per second between the first and the last full shard's commit."""
    ms = {p.name: json.loads(p.read_text()) for p in sorted((out / "manifests").glob("shard-*.json"))}
    full = [n for n in sorted(ms) if ms[n]["count"] == shard_size]
    first, last = full[0], full[-1]
    seconds = seen[last] - seen[first]
    candidates = ms[last]["candidates"][1] - ms[first]["candidates"][1]
    triplets = sum(ms[n]["count"] for n in full[1:])
    return {"seconds": round(seconds, 1), "shards": len(full) - 1, "candidates_per_s": candidates / seconds,
            "triplets_per_s": triplets / seconds}


def busy(trace: Path) -> dict[str, float]:
    """{stage: device seconds} inside the steady window, and the window itself (``window_s``), from the
    stand-ins' interval files."""
    rows = [line.split("\t") for f in trace.glob("*.tsv") for line in f.read_text().splitlines()]
    spans = [(stage, float(a), float(b)) for stage, a, b, _ in rows]
    ends = sorted(b for stage, _, b in spans if stage == "targets")
    first, last = ends[0], ends[-1]
    lo, hi = first + 0.1 * (last - first), last - 0.1 * (last - first)
    out = {"window_s": hi - lo}
    for stage, a, b in spans:
        out[stage] = out.get(stage, 0.0) + max(0.0, min(b, hi) - max(a, lo))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--cpus-per-node", type=int, default=12, help="declared, not real")
    p.add_argument("--segment-actors", type=int, default=4, help="at 0.25 GPU each (default pools: 12 for 64 GPUs)")
    p.add_argument("--scale", type=float, default=0.5, help="stage times x this")
    p.add_argument("--size", type=int, default=8000)
    p.add_argument("--shard-size", type=int, default=250)
    p.add_argument("--out", help="dataset folder (default: temporary)")
    args = p.parse_args(argv)
    gpus = args.nodes * args.gpus_per_node
    target_actors = gpus - math.ceil(args.segment_actors * 0.25)  # the segmentation pool's GPUs, rounded up
    settings = sim_settings(args.scale, args.segment_actors, target_actors)
    tmp = tempfile.mkdtemp(prefix="dreamcache-cluster-")
    trace = Path(tmp) / "trace"
    trace.mkdir()
    os.environ["DREAMCACHE_SIMULATE_TRACE"] = str(trace)  # the workers inherit it from the nodes
    try:
        return _measure(args, Path(tmp), trace, settings, gpus, target_actors, argv)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _measure(args, tmp: Path, trace: Path, settings: list[str], gpus: int, target_actors: int, argv) -> int:
    sdxl_per_candidate = SDXL_S * args.scale / BATCH
    with local_cluster(args.nodes, args.gpus_per_node, args.cpus_per_node) as (_, env):
        out = Path(args.out or tmp / "ds")
        log = tmp / "run.log"
        started = time.monotonic()
        code, seen = run_pipeline(out, args.size, args.shard_size, settings, env, log)
        if code != 0:
            print(log.read_text()[-4000:], file=sys.stderr)
            return code
        wall = time.monotonic() - started
        rate = steady_rate(out, seen, args.shard_size)
    spent = busy(trace)
    keep = 1 - 1 / 20  # the stand-in segmentation drops one sample in 20
    share = spent["targets"] / (gpus * spent["window_s"])
    report = {
        "command": "python -m benchmarks.cluster " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cluster": f"{args.nodes} nodes x {args.gpus_per_node} GPUs (simulated) + a head without GPUs",
        "pools": f"{target_actors} SDXL x 1 GPU, {args.segment_actors} segmentation x 0.25 GPU (2 calls each)",
        "stage_seconds_per_batch_of_8": {"sdxl": round(SDXL_S * args.scale, 3),
                                         "segment_device": round(SEGMENT_DEVICE_S * args.scale, 3),
                                         "segment_host": round(SEGMENT_HOST_S * args.scale, 3)},
        "size": args.size, "machine": f"{os.cpu_count()} CPU cores", "wall_s": round(wall, 1), "steady": {k: round(v, 2) for k, v in rate.items()},
        "sdxl_gpu_share": round(share, 4),
        "sdxl_pool_share": round(target_actors / gpus, 4),
        "segment_gpu_busy": round(spent.get("segment", 0.0) / (args.segment_actors * spent["window_s"]), 4),
        "steady_window_s": round(spent["window_s"], 1),
        "ideal_triplets_per_s": round(gpus / sdxl_per_candidate * keep, 2),
        "triplets_per_s_of_ideal": round(rate["triplets_per_s"] / (gpus / sdxl_per_candidate * keep), 4),
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
