"""The pipeline on a local multi-node Ray cluster with simulated GPUs and stand-in stages: a node is lost."""

import json
import subprocess
import sys
import time

import pytest

from benchmarks.cluster import add_worker, local_cluster, run_pipeline, sim_settings
from conftest import ROOT, dataset_keys
from manifests.schema import read_index
from dreamcache.store import Store
from pipeline.plan import load_plan
from pipeline.simulate import DROP_EVERY

pytestmark = pytest.mark.slow


def expected_keys(out, size):
    """What an uninterrupted run writes: the first ``size`` plan candidates that the stand-in segmentation
    keeps (its drops depend only on the seed), in plan order."""
    store = Store(str(out))
    plan = load_plan(store, json.loads(store.read_bytes("plan", "plan.json")))
    kept = [r["key"] for rows in plan.rows() for r in rows if int(r["seed"]) % DROP_EVERY]
    return kept[:size]


def test_a_lost_node_is_survived_with_the_keys_of_an_uninterrupted_run(tmp_path):
    """Two worker nodes of 2 GPUs: 3 SDXL actors and a segmentation actor. After the first commit one worker
    node is removed, killing its actors and the blocks it held; a replacement joins a few seconds later, as
    the autoscaler's would. The run completes with the keys an uninterrupted run writes, in order."""
    settings = sim_settings(scale=0.2, segment_actors=1, target_actors=3)
    size, shard = 240, 20
    events = {}
    with local_cluster(nodes=2, gpus=2, cpus=8) as (cluster, env):
        victim = sorted(cluster.worker_nodes, key=lambda n: n.unique_id)[-1]

        def lose_a_node(seen):
            if seen and "removed" not in events:
                cluster.remove_node(victim, allow_graceful=False)
                events["removed"] = (time.monotonic(), len(seen))
            elif "removed" in events and "added" not in events and time.monotonic() - events["removed"][0] > 5:
                add_worker(cluster, gpus=2, cpus=8)
                events["added"] = time.monotonic()

        out = tmp_path / "lost-a-node"
        code, seen = run_pipeline(out, size, shard, settings, env, tmp_path / "lost.log", on_poll=lose_a_node)
        log = (tmp_path / "lost.log").read_text()
        assert code == 0, log[-3000:]
    assert "removed" in events and "added" in events
    assert events["removed"][1] < len(seen) / 2  # the node went while most of the run was still to do
    assert "will be retried" in log  # the lost node's tasks were retried elsewhere ...
    assert "rows were held for the writer" in log  # ... while later blocks went on to the writer
    assert dataset_keys(out) == expected_keys(out, size)
    assert read_index(Store(str(out)))["complete"]
    check = subprocess.run([sys.executable, "-m", "manifests", "verify", str(out), "--checksums"],
                           capture_output=True, text=True, cwd=ROOT)
    assert check.returncode == 0, check.stdout + check.stderr
