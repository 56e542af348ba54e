"""Local Ray clusters stay on this machine's loopback: the embedded Ray and the simulated multi-node cluster
register their nodes at 127.0.0.1, not at the machine's network address."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # starts Ray

NODES = """
import json, ray
print("nodes:", json.dumps(sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])))
print("workers:", json.dumps(ray.get([ray.remote(lambda: ray.util.get_node_ip_address()).remote()])))
"""


def driver(code: str, env: dict) -> list[list[str]]:
    proc = subprocess.run([sys.executable, "-c", code + NODES], capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line.split(":", 1)[1]) for line in proc.stdout.splitlines()
            if line.startswith(("nodes:", "workers:"))]


def test_the_embedded_ray_is_on_the_loopback():
    """pipeline.connect.init_ray without RAY_ADDRESS in a process that imported ray before (a notebook's); a fresh
    process is the next test's."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    code = ("import os, ray\nimport ray._private.ray_constants as constants\nfrom pipeline.connect import init_ray\n"
            "assert init_ray()\n"  # and the switch it set for the node is Ray's default again, for a later ray.init
            "assert constants.ENABLE_RAY_CLUSTER and 'RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER' not in os.environ\n")
    nodes, workers = driver(code, env)
    assert nodes == ["127.0.0.1"] and workers == ["127.0.0.1"]


def test_the_embedded_ray_is_its_own_even_where_a_ray_start_cluster_is_recorded(tmp_path_factory):
    """ray.init() without an address joins the newest `ray start` cluster of the machine (its address in
    RAY_TMPDIR/ray/ray_current_cluster). A record left by a cluster that has gone made every embedded run wait
    for ever; the embedded Ray starts its own, whatever the record says, on the loopback (a fresh process)."""
    import tempfile

    short = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # Ray's socket paths have a length limit
    try:
        os.makedirs(os.path.join(short, "ray"))
        with open(os.path.join(short, "ray", "ray_current_cluster"), "w") as f:
            f.write("127.0.0.1:9")  # nothing listens there: a cluster that has gone
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
        env["RAY_TMPDIR"] = short
        nodes, workers = driver("from pipeline.connect import init_ray\nassert init_ray()\n", env)
        assert nodes == ["127.0.0.1"] and workers == ["127.0.0.1"]
    finally:
        import shutil

        shutil.rmtree(short, ignore_errors=True)


def test_the_simulated_cluster_is_on_the_loopback():
    """benchmarks.cluster.local_cluster (the multi-node simulation of the benchmark and tests/test_cluster_sim.py):
    the head and every worker node, as a driver joining it with RAY_ADDRESS sees them."""
    import ray._private.ray_constants as constants

    from benchmarks.cluster import add_worker, local_cluster

    constant, saved = constants.ENABLE_RAY_CLUSTER, os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    with local_cluster(nodes=1, gpus=1, cpus=1) as (cluster, env):
        add_worker(cluster, gpus=1, cpus=1)  # as the node-loss test adds a replacement
        cluster.wait_for_nodes()
        assert cluster.address.startswith("127.0.0.1:")
        nodes, workers = driver("import ray\nray.init()\n", env)
    assert nodes == ["127.0.0.1"] * 3 and workers == ["127.0.0.1"]
    assert constants.ENABLE_RAY_CLUSTER == constant and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == saved
