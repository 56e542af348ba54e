"""Actor pools come from the config: fitted to one machine, asked of a cluster's autoscaler and waited for."""

import logging

import pytest

from pipeline.config import ResourceConfig, build_config
from dreamcache.errors import PipelineError
from pipeline.graphs import plan_blocks
from pipeline.pools import Pool, demand, fit_to_machine, provision, stage_pool

SAMPLES = ("target", "segment")


def test_defaults_keep_95_percent_of_an_8x8_h100_cluster_on_sdxl():
    res = build_config("paper").resources
    need = demand(SAMPLES, res)
    assert need["GPU"] == 64 and res.target_actors * res.target_gpus / need["GPU"] >= 0.95
    assert demand(("caption",), res)["GPU"] == 64
    assert stage_pool("segment", res) == Pool(actors=12, gpus=0.25, cpus=2.0, calls=2)


@pytest.mark.parametrize("gpus, target, segment", [(8, 7, 4), (64, 61, 12), (100, 61, 12), (2, 1, 4), (4, 3, 4)])
def test_one_machine_gets_pools_in_proportion(gpus, target, segment):
    fitted = fit_to_machine(SAMPLES, ResourceConfig(), gpus, cpus=192)
    assert (fitted.target_actors, fitted.segment_actors) == (target, segment)
    assert demand(SAMPLES, fitted)["GPU"] <= gpus


def test_one_machine_with_few_cpus_gets_fractional_cpus_per_actor():
    fitted = fit_to_machine(SAMPLES, ResourceConfig(), 8, cpus=8)
    assert demand(SAMPLES, fitted)["CPU"] == pytest.approx(8)
    assert fitted.segment_cpus == pytest.approx(2 * fitted.cpus_per_actor)


def test_a_machine_too_small_for_one_actor_per_stage_is_refused_with_what_to_set():
    with pytest.raises(PipelineError, match=r"resources\.target_gpus=0\.5"):
        fit_to_machine(SAMPLES, ResourceConfig(), 1, cpus=16)
    fitted = fit_to_machine(SAMPLES, ResourceConfig(target_gpus=0.5), 1, cpus=16)
    assert (fitted.target_actors, fitted.segment_actors) == (1, 2)
    with pytest.raises(PipelineError, match="do not fit this machine's 0 GPUs"):
        fit_to_machine(("caption",), ResourceConfig(), 0, cpus=16)


def test_cpu_pools_fit_the_cpus():
    res = build_config("tiny", {"resources.target_actors": 5}).resources
    assert fit_to_machine(SAMPLES, res, 0, cpus=2).target_actors == 2


class Cluster:
    """A cluster that gains 8 GPUs and 192 CPUs every 60 s of the fake clock, up to ``nodes`` nodes."""

    def __init__(self, nodes):
        self.t, self.nodes, self.requests = 0.0, nodes, []

    def resources(self):
        n = min(self.nodes, int(self.t // 60))
        return {"CPU": 8.0 + 192 * n, **({"GPU": 8.0 * n} if n else {})}

    def sleep(self, s):
        self.t += s


def run_provision(cluster, **overrides):
    cfg = build_config("paper", overrides)
    return provision(SAMPLES, cfg, embedded=False, cluster=cluster.resources,
                     request=lambda stages, res: cluster.requests.append(demand(stages, res)),
                     clock=lambda: cluster.t, sleep=cluster.sleep)


def test_a_scaling_cluster_is_asked_for_the_pools_and_waited_for(caplog):
    cluster = Cluster(nodes=8)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        cfg = run_provision(cluster)
    assert cfg.resources == ResourceConfig()  # a cluster gets the configured pools, not a snapshot
    assert cluster.requests == [{"GPU": 64, "CPU": 85}]
    assert 480 <= cluster.t < 490  # until the 8th node is up
    waits = [r.getMessage() for r in caplog.records if "waiting for the cluster" in r.getMessage()]
    assert waits[0].startswith("waiting for the cluster to scale up: 0 of 64 GPUs")
    assert 8 <= len(waits) <= 20  # a line every 30 s, not every poll


def test_a_cluster_that_never_gets_there_stops_the_run_naming_what_is_missing():
    cluster = Cluster(nodes=3)
    with pytest.raises(PipelineError, match=r"24 of 64 GPUs.*after waiting 600 s.*resources\.wait_s"):
        run_provision(cluster, **{"resources.wait_s": 600})
    assert cluster.t == pytest.approx(600)


@pytest.mark.parametrize("rows, batch, blocks", [(100, 8, [8] * 12 + [4]), (16, 8, [8, 8]), (5, 8, [5]),
                                                 (1000, 8, [16] * 62 + [8])])
def test_plan_blocks_hold_whole_batches(rows, batch, blocks):
    plan = [{"key": f"k{i}", "seed": i} for i in range(rows)]
    out = plan_blocks(plan, batch, max_blocks=70 if rows == 1000 else 20_000)
    assert [t.num_rows for t in out] == blocks
    assert [r["key"] for t in out for r in t.to_pylist()] == [r["key"] for r in plan]
