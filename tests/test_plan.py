"""The caption plan in chunks: memory bounded by a chunk, not by --size; a killed plan keeps its chunks."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from dreamcache.store import Store
from pipeline.captions import CaptionStage
from pipeline.config import build_config
from pipeline.plan import commit_plan, data_fingerprint, existing_plan

CHUNK = 400


def config(candidates: int, chunk: int = CHUNK):
    """The tiny profile's template captions, a plan of ``candidates`` candidates (overgenerate 1)."""
    return build_config("tiny", {"size": candidates, "overgenerate": 1.0, "plan_chunk": chunk})


class Captions:
    """The caption stage run in this process, as Ray would run it; counts the requests it answers."""

    def __init__(self, cfg, fail_after: int | None = None):
        self.stage, self.requests, self.fail_after = CaptionStage(cfg.captions), 0, fail_after

    def __call__(self, requests):
        if self.fail_after is not None and self.requests >= self.fail_after:
            raise KeyboardInterrupt  # the run is killed while planning
        self.requests += len(requests)
        out = []
        for i in range(0, len(requests), 256):
            part = requests[i:i + 256]
            batch = {k: np.array([r[k] for r in part], dtype=object) for k in part[0]}
            res = self.stage(batch)
            out += [{k: (v[j].item() if hasattr(v[j], "item") else v[j]) for k, v in res.items()}
                    for j in range(len(res["request_id"]))]
        return out


def peak_bytes(cfg, out) -> tuple[int, object]:
    runner = Captions(cfg)
    tracemalloc.start()
    try:
        plan = commit_plan(Store(str(out)), cfg, runner)
        return tracemalloc.get_traced_memory()[1], plan
    finally:
        tracemalloc.stop()


def test_plan_memory_is_bounded_by_a_chunk_not_by_the_size(tmp_path):
    """Eight chunks need about what one chunk needs; before chunks, the whole plan sat in the driver."""
    one, plan_one = peak_bytes(config(CHUNK), tmp_path / "one")
    eight, plan_eight = peak_bytes(config(8 * CHUNK), tmp_path / "eight")
    assert plan_one.candidates == CHUNK and plan_eight.candidates == 8 * CHUNK
    assert len(plan_eight.chunks) == 8
    unchunked, _ = peak_bytes(config(8 * CHUNK, chunk=8 * CHUNK), tmp_path / "unchunked")  # the whole plan at once
    print(f"peak traced memory: {one / 1e6:.1f} MB for 1 chunk, {eight / 1e6:.1f} MB for 8, "
          f"{unchunked / 1e6:.1f} MB for the same 8 as one chunk")  # measured 7.8, 7.1, 53.9
    assert eight < 1.5 * one, (one, eight)
    assert unchunked > 3 * eight  # the measurement sees what the whole plan in memory costs
    keys = [r["key"] for c in plan_eight.rows() for r in c]
    assert keys == [f"s0-{i:08d}" for i in range(8 * CHUNK)]  # global, contiguous, in consumption order
    assert [r["index"] for r in next(plan_eight.rows(CHUNK * 3 + 5))][:2] == [CHUNK * 3 + 5, CHUNK * 3 + 6]


def test_a_plan_killed_between_chunks_resumes_and_equals_an_uninterrupted_one(tmp_path):
    cfg = config(3 * CHUNK)
    whole = commit_plan(Store(str(tmp_path / "whole")), cfg, Captions(cfg))
    probe = Captions(cfg)
    commit_plan(Store(str(tmp_path / "probe")), config(CHUNK), probe)  # what the first chunk asks for
    store = Store(str(tmp_path / "killed"))
    with pytest.raises(KeyboardInterrupt):
        commit_plan(store, cfg, Captions(cfg, fail_after=probe.requests))
    assert existing_plan(store, cfg) is None  # no plan.json: the plan is not complete ...
    assert store.exists("plan", "chunk-000000.json") and not store.exists("plan", "chunk-000001.json")
    again = Captions(cfg)
    resumed = commit_plan(store, cfg, again)  # ... but its first chunk is kept
    assert 0 < again.requests < whole.meta["requests"]
    assert [r for c in resumed.rows() for r in c] == [r for c in whole.rows() for r in c]
    assert {k: v for k, v in resumed.meta.items() if k != "created"} == \
        {k: v for k, v in whole.meta.items() if k != "created"}


def test_a_single_chunk_plan_keeps_its_fingerprint_whatever_the_chunk_size():
    """Datasets made before chunks (or below one chunk) resume: the chunk size only matters above it."""
    assert data_fingerprint(config(CHUNK, chunk=CHUNK)) == data_fingerprint(config(CHUNK, chunk=10 * CHUNK))
    assert data_fingerprint(config(3 * CHUNK, chunk=CHUNK)) != data_fingerprint(config(3 * CHUNK, chunk=2 * CHUNK))


class Prose:
    """A caption model that never writes JSON."""

    def generate(self, requests):
        return [f"Sure! Here are captions about {r['category']}: lovely things in lovely places." for r in requests]


def test_a_failed_captioning_is_not_committed_and_is_retried(tmp_path):
    from pipeline.plan import CaptionFailure

    cfg = config(CHUNK)
    store = Store(str(tmp_path / "ds"))
    failing = Captions(cfg)
    failing.stage.backend = Prose()
    with pytest.raises(CaptionFailure) as e:
        commit_plan(store, cfg, failing)
    message = str(e.value)
    assert "caption stage" in message and "captions:prose=" in message and "Sure! Here are captions" in message
    assert existing_plan(store, cfg) is None and not store.exists("plan", "chunk-000000.json")
    report = json.loads(store.read_bytes("plan", "report-000000.json"))
    assert report["committed"] is False and report["candidates"] == 0
    assert report["drops"]["captions:prose"] == report["requests"] * cfg.captions.captions_per_request
    assert len(report["examples"]["captions:prose"]) == 3  # raw answers, to see what the model wrote
    plan = commit_plan(store, cfg, Captions(cfg))  # the rerun asks again
    assert plan.candidates == CHUNK
    assert json.loads(store.read_bytes("plan", "report-000000.json"))["committed"] is True


@pytest.mark.slow  # starts Ray
def test_a_plan_in_chunks_runs_chunk_by_chunk_and_resumes_across_them(tmp_path):
    """A 63-candidate plan in chunks of 24: a run killed after its first commit resumes across the chunk
    boundaries, running the sample stages once per chunk in one Ray, to the keys of an uninterrupted run (the
    plan's first 48 positions: the tiny profile drops nothing), with shards that span the boundaries."""
    from conftest import SIZE, run_pipeline
    from test_resume import _exists, assert_consistent, kill_when

    chunked = ("--set", "plan_chunk=24")
    out = tmp_path / "killed"
    kill_when(out, _exists("manifests/shard-000000.json"), *chunked)
    proc = run_pipeline(out, *chunked)
    assert proc.stderr.count("starting an embedded local Ray") == 1
    assert sorted(p.name for p in (out / "plan").glob("chunk-*.json")) == [f"chunk-00000{i}.json" for i in range(3)]
    assert json.loads((out / "plan" / "plan.json").read_text())["chunks"] == 3
    assert_consistent(out, [f"s0-{i:08d}" for i in range(SIZE)])
