"""A sample stage is one class in pipeline/stages.py: the graph, the model check, the record, the fingerprint and
the funnel follow the list. Proven by the optional caption-target agreement filter (CLIP score, ``clip:low_score``)
on a tiny CLIP."""

import json
import tarfile

import numpy as np
import pytest

from conftest import run_pipeline
from pipeline import stages
from pipeline.clip_filter import ClipFilterStage
from pipeline.config import build_config
from pipeline.plan import data_fingerprint
from pipeline.segment import SegmentStage
from pipeline.targets import TargetStage


def test_the_stage_list_is_the_pipeline():
    off, on = build_config("tiny"), build_config("tiny", {"clip.enabled": True})
    assert stages.active(off) == [TargetStage, SegmentStage] and stages.active(on) == [TargetStage, SegmentStage,
                                                                                      ClipFilterStage]
    assert [m.key for m in stages.models(on)] == ["targets", "detector", "segmenter", "clip"]
    assert [s["funnel"] for s in stages.describe(on)][-1] == "caption-target agreement"
    sim = build_config("tiny", {"targets.model": "simulate:0.1", "segment.detector": "simulate:0.1"})
    assert [stages.implementation(sim, s).__name__ for s in stages.active(sim)] == [
        "SimulatedTargets", "SimulatedSegment"]
    assert [(m.key, m.ref, m.revision) for m in stages.models(sim)] == [  # the stand-in does SAM's work too
        ("targets", "simulate:0.1", None), ("detector", "simulate:0.1", None)]
    pinned = build_config("tiny", {"targets.model": "simulate:0.1", "targets.revision": "abc"})
    assert [(m.key, m.revision) for m in stages.models(pinned)][0] == ("targets", "abc")
    world = build_config("tiny", {"targets.model": "world:world/base-model", "segment.method": "key",
                                  "segment.detector": "simulate:0.1"})
    assert [stages.implementation(world, s).__name__ for s in stages.active(world)] == ["WorldTargets",
                                                                                        "KeyedSegmentStage"]
    assert [m.key for m in stages.models(world)] == ["targets"]  # the keying segmenter loads no model


def test_datasets_written_before_the_registry_keep_their_fingerprint():
    """The fingerprints of the default paper and tiny configs as they were before optional stages existed: a
    resume of such a dataset must not be refused as "a different configuration"."""
    assert data_fingerprint(build_config("paper", {"size": 400_000})) == "c32b9937f098b92a"
    assert data_fingerprint(build_config("tiny", {"size": 48, "shards.shard_size": 16})) == "b8fc248ddc940ab1"
    off = build_config("tiny", {"size": 48, "clip.threshold": 0.5})  # an unused stage's setting changes nothing
    assert data_fingerprint(off) == data_fingerprint(build_config("tiny", {"size": 48}))
    on = build_config("tiny", {"size": 48, "clip.enabled": True})
    assert data_fingerprint(on) != data_fingerprint(off)
    assert data_fingerprint(on) != data_fingerprint(build_config("tiny", {"size": 48, "clip.enabled": True,
                                                                          "clip.threshold": 0.5}))
    assert data_fingerprint(on) == data_fingerprint(build_config("tiny", {"size": 48, "clip.enabled": True,
                                                                          "clip.batch_size": 3}))
    # How the targets' U-Net runs: compiled in any mode is the same computation; FP8 is another one.
    tiny = data_fingerprint(build_config("tiny", {"size": 48}))
    assert data_fingerprint(build_config("tiny", {"size": 48, "targets.compile": True,
                                                  "targets.compile_mode": "reduce-overhead"})) == tiny
    assert data_fingerprint(build_config("tiny", {"size": 48, "targets.fp8": False})) == tiny
    bf16 = {"size": 48, "targets.dtype": "bfloat16"}
    assert data_fingerprint(build_config("tiny", {**bf16, "targets.fp8": True})) != data_fingerprint(
        build_config("tiny", bf16))
    with pytest.raises(ValueError, match="targets.compile_mode must be one of"):
        build_config("tiny", {"targets.compile_mode": "fastest"})


def batch(n: int, targets: list[bytes]) -> dict:
    rows = [dict(key=f"k{i}", index=i, caption=f"a red ceramic teapot on a wooden table {i}", subject="red teapot",
                 seed=i, status="ok", error="", target=targets[i]) for i in range(n)]
    return {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}


@pytest.fixture(scope="module")
def targets(tiny_dir):
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(4):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
        out.append(buf.getvalue())
    return out


def test_the_clip_filter_scores_each_target_against_its_caption_and_drops_the_low_ones(targets):
    import io

    from PIL import Image

    from dreamcache.metrics import Clip

    cfg = build_config("tiny", {"clip.enabled": True, "clip.threshold": -1.0}).clip
    b = batch(4, targets)
    b["status"][3] = "segment:no_box"  # dropped upstream: passed through, not scored
    out = ClipFilterStage(cfg)(b)
    clip = Clip("tiny:clip", device="cpu")
    want = clip.score([Image.open(io.BytesIO(t)) for t in targets[:3]], list(b["caption"][:3]))
    np.testing.assert_allclose(out["clip_score"][:3], want.numpy(), atol=1e-5)
    assert list(out["status"]) == ["ok", "ok", "ok", "segment:no_box"] and np.isnan(out["clip_score"][3])
    cut = float(np.median(out["clip_score"][:3]))  # a threshold between the scores: the lower ones go
    strict = ClipFilterStage(build_config("tiny", {"clip.enabled": True, "clip.threshold": cut}).clip, clip=clip)
    kept = strict(batch(3, targets))
    assert ["ok" if s >= cut else "clip:low_score" for s in out["clip_score"][:3]] == list(kept["status"])
    assert "clip:low_score" in list(kept["status"]) and "< " in kept["error"][list(kept["status"]).index("clip:low_score")]


@pytest.mark.slow
def test_the_clip_filter_is_one_setting_and_its_score_reaches_the_json_manifest_and_funnel(tmp_path, capsys):
    from manifests.__main__ import main as manifests_main

    out = tmp_path / "ds"
    run_pipeline(out, "--set", "clip.enabled=true", "--set", "clip.threshold=-1", size=16)
    index = json.loads((out / "dataset.json").read_text())
    assert [s["name"] for s in index["stages"]] == ["targets", "segment", "clip"]
    assert index["models"]["clip"]["model"] == "tiny:clip" and index["totals"]["samples"] == 16
    manifest = json.loads((out / "manifests" / "shard-000000.json").read_text())
    sample = manifest["samples"][0]
    assert {"det_score", "sam_score", "mask_area", "clip_score"} <= set(sample)
    with tarfile.open(out / "shards" / "shard-000000.tar") as tar:
        record = json.loads(tar.extractfile(f"{sample['key']}.json").read())
    assert record["clip_score"] == sample["clip_score"] and -1 <= record["clip_score"] <= 1
    assert record["models"]["clip"]["model"] == "tiny:clip"
    assert manifests_main(["show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "caption-target agreement" in shown and "segmented triplets" in shown


def test_manifests_of_earlier_runs_read_and_write_back_the_same():
    from manifests.schema import Manifest

    old = {"shard": "shard-000000.tar", "sha256": "0" * 64, "bytes": 10, "count": 1, "candidates": [0, 2],
           "samples": [{"key": "s0-00000000", "index": 0, "caption": "a cup", "subject": "cup", "category": "cup",
                        "seed": 7, "det_score": 0.5, "sam_score": 0.9, "mask_area": 0.2, "members": {"txt": 5}}],
           "drops": [{"key": "s0-00000001", "index": 1, "stage": "segment", "reason": "no_box", "detail": ""}],
           "created": "2026-01-01T00:00:00+00:00", "format": "dreamcache-shard/1"}
    m = Manifest.from_json(json.dumps(old))
    assert m.samples[0].record == {"det_score": 0.5, "sam_score": 0.9, "mask_area": 0.2}
    assert json.loads(m.to_json()) == old
