"""A run stopped after its last commit, before its final dataset.json: the rerun only indexes, with no model and
no Ray, so it finishes on a machine that cannot reach the checkpoints."""

import json

import numpy as np
import pytest

import pipeline.driver
import pipeline.run
from dreamcache.store import Store
from manifests.index import Index
from manifests.lock import claim
from pipeline.captions import CaptionStage
from pipeline.plan import commit_plan
from pipeline.writer import ShardWriter

SIZE, SHARD = 5, 2
# Checkpoints that do not exist here: a model check fails on them in a second (exit 2).
NOWHERE = ("--set", "captions.model=/nowhere/llama", "--set", "targets.model=/nowhere/sdxl",
           "--set", "segment.detector=/nowhere/grounding-dino", "--set", "segment.segmenter=/nowhere/sam")


@pytest.fixture(autouse=True)
def own_logging():
    """main() points the root logger at this test's captured stderr; the next test gets the handlers back."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def argv(out):
    return ["--size", str(SIZE), "--profile", "tiny", "--out", str(out), "--shard-size", str(SHARD), *NOWHERE]


def template_captions(cfg):
    """The caption stage's template backend, in this process (no Ray)."""
    stage = CaptionStage(cfg.captions)

    def run(requests):
        out = stage({k: np.array([r[k] for r in requests], dtype=object) for k in requests[0]})
        return [{k: v[i] for k, v in out.items()} for i in range(len(out["n"]))]

    return run


def interrupted_dataset(out, kept):
    """What a run leaves when killed between its last manifest and its final dataset.json: the plan, every shard
    committed, dataset.json from the last commit rewritten as a run in progress. ``kept(index)``: whether the
    segmentation kept that candidate."""
    cfg = pipeline.run.resolve_config(pipeline.run.parse_args(argv(out)))
    store = Store(str(out))
    claim(store)
    plan = commit_plan(store, cfg, template_captions(cfg))
    writer = ShardWriter(store, Index({"size": SIZE}, {}), SIZE, SHARD, "png", {}, next_shard=0, next_candidate=0)
    for r in (r for rows in plan.rows() for r in rows):
        writer.add({**r, "status": "ok" if kept(r["index"]) else "segment:no_box", "error": "",
                    "det_score": 0.5, "sam_score": 0.9, "mask_area": 0.2, "box": "1,2,3,4", "crop": "0,0,8,8",
                    "target": b"T", "reference": b"R", "mask": b"M"})
    writer.commit(final=True)
    writer.close()
    index = json.loads(store.read_bytes("dataset.json"))
    store.write_atomic(json.dumps({**index, "complete": False, "status": "running"}).encode(), "dataset.json")
    return store, plan.candidates


@pytest.mark.parametrize("case", ["size reached", "plan ran out"])
def test_a_committed_dataset_is_indexed_without_models_or_ray(tmp_path, monkeypatch, capsys, case):
    kept = (lambda i: True) if case == "size reached" else (lambda i: i < 2)  # then 2 triplets, plan consumed
    store, candidates = interrupted_dataset(tmp_path / "ds", kept)
    before = {n: store.read_bytes("shards", n) for n in store.list("shards")}

    def no_ray(verbose=False):
        raise AssertionError("Ray was started to rewrite an index")

    monkeypatch.setattr(pipeline.driver, "init_ray", no_ray)
    code = pipeline.run.main(argv(tmp_path / "ds"))
    index = json.loads(store.read_bytes("dataset.json"))
    if case == "size reached":
        assert code == 0, capsys.readouterr().err[-2000:]
        assert index["complete"] and index["status"] == "complete" and index["totals"]["samples"] == SIZE
    else:
        assert code == 3  # stopped short, as the run that wrote it would have said
        assert not index["complete"] and "caption plan ran out" in index["status"]
        assert index["totals"]["samples"] == 2 and index["totals"]["candidates_consumed"] == candidates
    assert {n: store.read_bytes("shards", n) for n in store.list("shards")} == before  # nothing redone
    assert not store.exists("lock.json")


def test_an_unfinished_dataset_still_checks_its_models_first(tmp_path, capsys):
    """The shortcut is only for a finished dataset: with a shard still to write, the missing checkpoint is the
    error, before anything is changed."""
    store, _ = interrupted_dataset(tmp_path / "ds", lambda i: True)
    store.remove("manifests", "shard-000002.json")  # the last shard was never committed
    code = pipeline.run.main(argv(tmp_path / "ds"))
    assert code == 2 and "/nowhere/" in capsys.readouterr().err
    assert store.exists("shards", "shard-000002.tar")  # not even recovery ran
