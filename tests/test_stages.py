import io

import numpy as np
import pytest
from PIL import Image

from pipeline.config import build_config
from dreamcache.segmenter import make_reference, square_crop_box
from pipeline.segment import SegmentStage, touches_border
from pipeline.stage import Drop, Stage
from pipeline.targets import TargetStage


def batch(n, **extra):
    rows = [dict(key=f"k{i}", index=i, caption=f"a red ceramic teapot on a wooden table {i}", subject="red ceramic teapot",
                 seed=1000 + i, status="ok", error="", **extra) for i in range(n)]
    return {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}


class Flaky(Stage):
    name = "flaky"
    columns = {"y": -1}

    def __init__(self):
        self.calls = 0

    def process(self, rows):
        self.calls += 1
        if any(r["key"] in ("k1", "k3") for r in rows):
            raise ValueError("bad pixel")
        return [{"y": int(r["seed"])} if r["key"] != "k4" else Drop("filtered", "by design") for r in rows]


def test_a_stage_that_raises_drops_only_the_bad_rows():
    b = batch(6)
    b["status"][5] = "earlier:no_box"  # already dropped upstream: passed through untouched
    out = Flaky()(b)
    assert list(out["status"]) == ["ok", "flaky:error", "ok", "flaky:error", "flaky:filtered", "earlier:no_box"]
    assert "ValueError: bad pixel" in out["error"][1]
    assert list(out["y"]) == [1000, -1, 1002, -1, -1, -1]
    assert list(out["key"]) == list(b["key"])


def test_reference_is_exactly_white_where_the_mask_is_zero():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 200, (100, 120, 3), dtype=np.uint8)  # no pure white anywhere
    mask = np.zeros((100, 120), bool)
    mask[30:60, 50:95] = True
    mask[40:45, 60:70] = False  # a hole
    ref, box = make_reference(image, mask, margin=0.1, size=64)
    assert ref.shape == (64, 64, 3)
    assert box == square_crop_box(mask, 0.1)
    x0, y0, x1, y1 = box
    assert x1 - x0 == y1 - y0  # square
    m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).crop(box).resize((64, 64), Image.Resampling.NEAREST)) > 0
    assert (ref[~m] == 255).all()
    assert (ref[m] < 255).mean() > 0.9  # the subject survives


def test_border_touch():
    m = np.zeros((10, 10), bool)
    m[3:6, 3:6] = True
    assert not touches_border(m, 2)
    m[0, 4] = True
    assert touches_border(m, 1)


@pytest.fixture(scope="module")
def targets(tiny_dir):
    cfg = build_config("tiny")
    return TargetStage(cfg.targets)(batch(4))


def test_sdxl_stage_is_deterministic_per_sample(targets, tiny_dir):
    cfg = build_config("tiny")
    again = TargetStage(cfg.targets)(batch(4))
    assert list(targets["target"]) == list(again["target"])
    img = Image.open(io.BytesIO(targets["target"][0]))
    assert img.format == "JPEG" and img.size == (cfg.targets.resolution,) * 2
    assert len(set(targets["target"])) == 4  # different seeds, different images


def test_segment_stage_writes_reference_and_single_channel_mask(targets):
    cfg = build_config("tiny", {"segment.reference_format": "png"})
    out = SegmentStage(cfg.segment)(targets)
    assert set(out["status"]) == {"ok"}
    for i in range(4):
        mask = Image.open(io.BytesIO(out["mask"][i]))
        ref = np.asarray(Image.open(io.BytesIO(out["reference"][i])))
        assert mask.mode == "L" and mask.size == (cfg.targets.resolution,) * 2
        assert ref.shape == (cfg.segment.reference_size, cfg.segment.reference_size, 3)
        assert 0 < out["mask_area"][i] <= 1 and len(out["box"][i].split(",")) == 4


@pytest.mark.parametrize("override, reason", [
    ({"segment.box_threshold": 1.01}, "segment:no_box"),
    ({"segment.min_sam_score": 10.0}, "segment:low_sam_score"),
    ({"segment.min_area": 0.999, "segment.max_area": 1.0}, "segment:mask_area"),
])
def test_quality_filters_record_their_reason(targets, override, reason):
    cfg = build_config("tiny", override)
    out = SegmentStage(cfg.segment)(targets)
    assert set(out["status"]) == {reason}
    assert all(r == b"" for r in out["reference"])


def _find_with_the_processors(stage, images, subjects):
    """The reference path: Grounding DINO's and SAM's own post-processing on the host, as the transformers
    documentation runs them (labels decoded, boxes rescaled by the SAM processor, masks upsampled on the host)."""
    import torch

    text = [s.lower().strip().rstrip(".") + "." for s in subjects]
    inputs = stage.det_processor(images=images, text=text, padding=True, return_tensors="pt")
    with torch.inference_mode():
        outputs = stage.detector(**inputs)
    found = stage.det_processor.post_process_grounded_object_detection(
        outputs, inputs["input_ids"], threshold=stage.cfg.box_threshold, target_sizes=[im.size[::-1] for im in images])
    results = []
    for image, f in zip(images, found):
        if len(f["scores"]) == 0:
            results.append(None)
            continue
        k = int(torch.argmax(f["scores"]))
        box = f["boxes"][k].tolist()
        sam_in = stage.sam_processor(images=[image], input_boxes=[[box]], return_tensors="pt")
        with torch.inference_mode():
            out = stage.sam(**sam_in, multimask_output=False)
        mask = stage.sam_processor.post_process_masks(out.pred_masks, sam_in["original_sizes"],
                                                      sam_in["reshaped_input_sizes"])[0][0, 0].numpy()
        results.append((mask, float(out.iou_scores.reshape(-1)[0]), box, float(f["scores"][k])))
    return results


class Unsure:
    """A detector whose text-token logits are lowered for some images (the tiny detector's boxes all score 1.0)."""

    def __init__(self, detector, lowered):
        self.detector, self.lowered = detector, lowered

    def __call__(self, **inputs):
        out = self.detector(**inputs)
        out.logits[self.lowered] -= 100.0
        return out


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_segmenter_finds_what_the_processors_post_processing_finds(targets, threshold):
    """The stage picks the box and upsamples the masks on the device, in batches; the result is the transformers
    processors' own post-processing, one image at a time. At 0.5 two of the four images have no box."""
    cfg = build_config("tiny", {"segment.box_threshold": threshold})
    stage = SegmentStage(cfg.segment)
    stage.detector = Unsure(stage.detector, [0, 2])
    images = [Image.open(io.BytesIO(t)).convert("RGB") for t in targets["target"]]
    images[1] = images[1].resize((64, 48))  # a batch of several sizes: DINO pads, SAM resizes each its own way
    subjects = ["red ceramic teapot", "teapot", "a wooden table.", "cup"]
    ours, theirs = stage.find(images, subjects), _find_with_the_processors(stage, images, subjects)
    assert [f is None for f in ours] == [f is None for f in theirs] == ([False] * 4 if threshold == 0 else
                                                                       [True, False, True, False])
    for a, b in zip(ours, theirs):
        if a is None:
            continue
        assert a[0].shape == b[0].shape and a[0].dtype == bool
        assert (a[0] != b[0]).mean() < 1e-3  # the same mask, up to a pixel or two at its edge
        assert a[1] == pytest.approx(b[1], abs=1e-4) and a[3] == pytest.approx(b[3], abs=1e-5)
        assert a[2] == pytest.approx(b[2], abs=1e-3)


def test_segment_calls_in_threads_give_the_sequential_results(targets):
    """Several calls of one actor at once (resources.segment_calls): host work overlaps, the models take turns,
    and each call gets exactly what it would get alone."""
    from concurrent.futures import ThreadPoolExecutor

    stage = SegmentStage(build_config("tiny", {"segment.batch_size": 2}).segment)
    alone = [stage(targets) for _ in range(3)]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda _: stage(targets), range(3)))
    for a, b in zip(alone, together):
        for column in ("status", "mask", "reference", "sam_score", "box"):
            assert list(a[column]) == list(b[column])


def test_only_the_pipeline_on_a_gpu_compiles_the_segmenter(targets):
    """Compiling takes minutes: worth it over a dataset, not for `dreamcache personalize`'s few images, and
    never on a CPU (where the stage must not pad batches for a compiled shape either)."""
    from dreamcache.segmenter import grounding_config

    assert build_config("paper").segment.compile and not grounding_config().compile
    stage = SegmentStage(build_config("tiny", {"segment.compile": True}).segment)
    assert not stage.compiled
    images = [Image.open(io.BytesIO(targets["target"][0])).convert("RGB")]
    seen, locate = [], stage._locate
    stage._locate = lambda det, sam: seen.append(len(sam["pixel_values"])) or locate(det, sam)
    assert len(stage.find(images, ["teapot"])) == 1 and seen == [1]  # one image in, one through the models
    stage.compiled = True  # as on a GPU: the batch is padded to batch_size, the answer is still one per image
    assert len(stage.find(images, ["teapot"])) == 1 and seen == [1, stage.cfg.batch_size]
