"""The tiny job end to end, as a user runs it: exact counts, complete samples, white references."""

import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from conftest import ROOT, SHARD, SIZE, dataset_keys, pipeline_cmd, run_pipeline
from manifests.schema import read_manifests
from dreamcache.store import Store

pytestmark = pytest.mark.slow


def test_writes_exactly_size_triplets_in_full_shards(tiny_dataset):
    ms = read_manifests(Store(str(tiny_dataset)))
    assert [m.count for m in ms] == [SHARD] * (SIZE // SHARD)
    assert sorted(os.listdir(tiny_dataset / "shards")) == [m.shard for m in ms]
    index = json.loads((tiny_dataset / "dataset.json").read_text())
    assert index["complete"] and index["status"] == "complete"
    assert index["totals"]["samples"] == sum(m.count for m in ms) == SIZE
    assert index["totals"]["bytes"] == sum(m.bytes for m in ms) == sum(
        (tiny_dataset / "shards" / m.shard).stat().st_size for m in ms)
    assert sum(index["categories"].values()) == SIZE
    assert index["config"]["targets"]["guidance_scale"] == 3.5
    assert {"torch", "ray", "diffusers", "transformers"} <= set(index["versions"])
    import prompts

    assert index["prompts_sha256"] == prompts.fingerprint()
    keys = dataset_keys(tiny_dataset)
    assert len(keys) == len(set(keys)) == SIZE


def test_every_sample_is_complete_and_the_reference_is_white_off_the_mask(tiny_dataset):
    urls = [str(p) for p in sorted((tiny_dataset / "shards").glob("*.tar"))]
    n = 0
    for s in wds.WebDataset(urls, shardshuffle=False):
        assert {"txt", "json", "target.jpg", "reference.png", "mask.png"} <= set(s), s["__key__"]
        meta = json.loads(s["json"])
        caption = s["txt"].decode()
        assert meta["caption"] == caption and meta["subject"] in caption
        target = Image.open(io.BytesIO(s["target.jpg"]))
        mask = Image.open(io.BytesIO(s["mask.png"]))
        ref = np.asarray(Image.open(io.BytesIO(s["reference.png"])).convert("RGB"))
        assert mask.mode == "L" and mask.size == target.size
        # Map the mask onto the reference through the recorded crop: off the mask, pure white.
        size = ref.shape[0]
        m = np.asarray(mask.crop(tuple(meta["crop"])).resize((size, size), Image.Resampling.NEAREST)) > 0
        assert (ref[~m] == 255).all(), s["__key__"]
        assert meta["generation"] == {"guidance_scale": 3.5, "steps": 4, "resolution": 64}
        n += 1
    assert n == SIZE


INJECT = textwrap.dedent("""
    # Loaded at start-up by every Python process of the run (driver and Ray workers alike).
    import pipeline.segment as seg

    _orig = seg.SegmentStage._finish
    BAD = {"s0-00000003", "s0-00000010", "s0-00000020"}

    def _finish(self, image, mask, sam_score, box, det_score):
        if self._current_key in BAD:
            raise RuntimeError("injected failure")
        return _orig(self, image, mask, sam_score, box, det_score)

    _orig_process = seg.SegmentStage.process

    def process(self, rows):
        if len(rows) == 1:
            self._current_key = str(rows[0]["key"])
        elif any(str(r["key"]) in BAD for r in rows):
            raise RuntimeError("injected batch failure")
        return _orig_process(self, rows)

    seg.SegmentStage._finish = _finish
    seg.SegmentStage.process = process
""")


def run_injected(out, code: str, **env):
    """The pipeline with ``code`` loaded at start-up by every one of its Python processes (a sitecustomize)."""
    inject = out.parent / f"{out.name}-inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(code)
    return run_pipeline(out, env={"PYTHONPATH": os.pathsep.join([str(inject), str(ROOT)]), **env})


BROKEN_GPU = textwrap.dedent("""
    # The first SDXL batch of the run meets a dead GPU: an infrastructure error, not a bad sample.
    import os
    import pipeline.targets as targets

    _target_process = targets.TargetStage.process  # names of its own: it is loaded after INJECT, in one module
    BROKEN_GPU_FLAG = os.environ["BROKEN_GPU_FLAG"]

    def broken_gpu_process(self, rows):
        if not os.path.exists(BROKEN_GPU_FLAG):
            open(BROKEN_GPU_FLAG, "w").close()
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return _target_process(self, rows)

    targets.TargetStage.process = broken_gpu_process
""")


def test_bad_samples_are_dropped_and_a_broken_gpu_is_retried_not_dropped(tiny_dataset, tmp_path):
    """One run meets both kinds of failure. A stage that raises on some samples does not stop the run: those
    samples are dropped by name and the plan makes up for them. A broken GPU does not turn its rows into drops:
    the SDXL actor exits, Ray starts another and retries them."""
    out = tmp_path / "flaky"
    run_injected(out, INJECT + BROKEN_GPU, BROKEN_GPU_FLAG=str(tmp_path / "failed-once"))
    assert (tmp_path / "failed-once").exists()  # the GPU failure happened
    ms = read_manifests(Store(str(out)))
    drops = {d.key: f"{d.stage}:{d.reason}" for m in ms for d in m.drops}
    assert drops == {k: "segment:error" for k in ("s0-00000003", "s0-00000010", "s0-00000020")}
    assert all("injected failure" in d.detail for m in ms for d in m.drops)
    keys = [s.key for m in ms for s in m.samples]
    assert len(keys) == SIZE and not set(keys) & set(drops)
    index = json.loads((out / "dataset.json").read_text())
    assert index["complete"] and index["drops"]["segment"] == {"error": 3} and "targets" not in index["drops"]
    # the samples that did not fail are the reference run's, in order, and the plan made up the loss
    ref = dataset_keys(tiny_dataset)
    assert [k for k in ref if k not in drops] == keys[:SIZE - 3]


def test_a_drop_rate_beyond_the_bound_stops_the_run_and_says_why(tmp_path):
    proc = subprocess.run(pipeline_cmd(tmp_path / "ds", "--set", "segment.box_threshold=1.01", "--set",
                                       "drop_window=6", size=8), capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 3, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "segment:no_box dropped 6 of the last 6 candidates" in errors[0]
    assert not list((tmp_path / "ds" / "manifests").glob("*.json"))  # nothing committed from the broken stretch


def test_missing_checkpoint_fails_fast_with_what_to_do(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pipeline" / "run.py"), "--size", "10", "--out", str(tmp_path / "x"),
         "--set", "captions.backend=template"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=ROOT)
    assert proc.returncode == 2
    assert "stabilityai/stable-diffusion-xl-base-1.0" in proc.stderr
    assert "--set targets.model=/path/to/local/copy" in proc.stderr and "--profile tiny" in proc.stderr
    assert not (tmp_path / "x").exists()  # nothing started, nothing written


def test_bad_flags_are_refused_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "pipeline" / "run.py"), "--size", "12q", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "cannot read size '12q'" in proc.stderr


def test_an_unreachable_size_stops_with_a_report(tmp_path):
    """Every candidate fails segmentation: the run says so, counts each drop and exits 3, not 0."""
    out = tmp_path / "none"
    proc = subprocess.run(pipeline_cmd(out, "--set", "segment.box_threshold=1.01", size=8), capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "INCOMPLETE: 0/8 triplets" in proc.stdout and "no_box=11" in proc.stdout
    assert "caption plan ran out" in proc.stdout
    index = json.loads((out / "dataset.json").read_text())
    assert not index["complete"] and index["drops"]["segment"] == {"no_box": 11}
    assert index["totals"]["candidates_consumed"] == 11 and index["totals"]["samples"] == 0
