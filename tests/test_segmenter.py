"""The grounded segmenter: its device-side post-processing against the transformers processors' own, and the
compiled path, whose shapes never depend on the subject phrases or on how many boxes are found."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from dreamcache.segmenter import GroundedSegmenter, SubjectTooLong
from pipeline.config import build_config
from pipeline.segment import SegmentStage

# Short and long phrases, several words, odd spacing and a trailing period: Grounding DINO's text differs in
# length for each (padding=True would give every batch its own length).
PHRASES = ["cup", "red ceramic teapot", "a very old wooden rocking chair with a cushion", "Dog.",
           "  blue glass vase  ", "a small brass bell on a string", "hat", "two apples"]
TOO_LONG = " ".join(["teapot"] * 40)  # more tokens than segment.max_text_tokens (32)


def photo(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """Smooth random colours (upsampled noise), like a generated target."""
    small = np.random.default_rng(seed).integers(0, 255, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def _find_with_the_processors(stage, images, subjects):
    """The un-padded reference path: Grounding DINO's and SAM's own post-processing on the host, as the
    transformers documentation runs them (text padded to the batch's longest, labels decoded, boxes rescaled by
    the SAM processor, SAM on one image at a time, masks upsampled on the host)."""
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
    """A detector whose text-token logits are lowered for the images at ``lowered`` (rows of the call; the tiny
    detector's boxes all score 1.0), so that a threshold of 0.5 finds a box in the others only."""

    def __init__(self, detector, lowered=()):
        self.detector, self.lowered = detector, list(lowered)

    def __call__(self, **inputs):
        out = self.detector(**inputs)
        out.logits[self.lowered] -= 100.0
        return out


def assert_same(ours, theirs):
    assert [f is None for f in ours] == [f is None for f in theirs]
    for a, b in zip(ours, theirs):
        if a is None:
            continue
        assert a[0].shape == b[0].shape and a[0].dtype == bool
        assert (a[0] != b[0]).mean() < 1e-3  # the same mask, up to a pixel or two at its edge
        assert a[1] == pytest.approx(b[1], abs=1e-4) and a[3] == pytest.approx(b[3], abs=1e-5)
        assert a[2] == pytest.approx(b[2], abs=1e-3)


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_segmenter_finds_what_the_processors_post_processing_finds(threshold):
    """The stage picks the box and upsamples the masks on the device, in batches, its text padded to
    max_text_tokens and SAM run on every row; the result is the transformers processors' own post-processing,
    one image at a time. At 0.5 two of the four images have no box."""
    stage = SegmentStage(build_config("tiny", {"segment.box_threshold": threshold}).segment)
    stage.detector = Unsure(stage.detector, [0, 2])
    images = [photo(i) for i in range(4)]
    images[1] = images[1].resize((64, 48))  # a batch of several sizes: DINO pads, SAM resizes each its own way
    subjects = ["red ceramic teapot", "teapot", "a wooden table.", PHRASES[2]]
    ours, theirs = stage.find(images, subjects), _find_with_the_processors(stage, images, subjects)
    assert [f is None for f in ours] == ([False] * 4 if threshold == 0 else [True, False, True, False])
    assert_same(ours, theirs)


@pytest.fixture(scope="module")
def eager_and_compiled(tiny_dir):
    """Two segmenters over the same tiny weights, batch 4: one eager, one compiled on this CPU. The compiled
    one uses dynamo's ``eager`` backend: recompiles are decided by dynamo's guards, before any backend runs,
    so it counts graphs and recompiles as inductor would, without minutes of code generation."""
    import torch._dynamo

    cfg = build_config("tiny", {"segment.batch_size": 4}).segment
    eager, compiled = SegmentStage(cfg), SegmentStage(cfg)
    compiled.compile(backend="eager")
    torch._dynamo.reset()
    yield eager, compiled
    torch._dynamo.reset()


def test_the_compiled_segmenter_keeps_one_graph_across_phrases_and_box_counts(eager_and_compiled):
    """Phrases of 1 to 9 words, batches where every image, some or none has a box, a last short batch and a row
    dropped for its long phrase: after the first call, no recompile (dynamo raises on one) and no new graph. The
    compiled results equal the eager segmenter's and the un-padded reference path's on the real rows."""
    from torch._dynamo.utils import counters

    eager, compiled = eager_and_compiled
    for stage in (eager, compiled):
        stage.detector = Unsure(stage.detector)
    images = [photo(10 + i) for i in range(8)]
    compiled.find(images[:4], ["cup"] * 4)  # compiles, once per graph
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    cases = [  # (images, phrases, rows of each batch whose logits are lowered, threshold, which rows find a box)
        (images[:4], PHRASES[:4], [], 0.0, [True] * 4),
        (images[4:], PHRASES[4:], [1, 2], 0.5, [True, False, False, True]),
        (images[:4], PHRASES[2:6], [], 1.01, [False] * 4),
        (images[5:], PHRASES[5:], [0], 0.5, [False, True, True]),  # the last, short batch
        (images[:1], PHRASES[2:3], [], 0.0, [True]),
        (images[:6], PHRASES[:6], [0], 0.5, [False, True, True, True, False, True]),  # two batches, one short
    ]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for ims, phrases, lowered, threshold, want in cases:
            for stage in (eager, compiled):
                stage.cfg = replace(stage.cfg, box_threshold=threshold)
                stage.detector.lowered = lowered
            ours = compiled.find(ims, phrases)
            assert [f is not None for f in ours] == want
            assert_same(ours, eager.find(ims, phrases))
            # The reference path runs each batch of four alone (the rows Unsure lowers are a batch's rows).
            theirs = [r for s in range(0, len(ims), 4) for r in _find_with_the_processors(eager, ims[s:s + 4],
                                                                                             phrases[s:s + 4])]
            assert_same(ours, theirs)
        compiled.cfg = replace(compiled.cfg, box_threshold=0.0)
        compiled.detector.lowered = []
        rows = [{"key": f"k{i}", "target": _jpeg(im), "subject": s, "status": "ok"}
                for i, (im, s) in enumerate(zip(images[:3], ["cup", TOO_LONG, PHRASES[2]]))]
        out = compiled({k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]})
    assert list(out["status"]) == ["ok", "segment:subject_too_long", "ok"]
    assert "tokens" in out["error"][1] and "segment.max_text_tokens=32" in out["error"][1]
    assert counters["stats"]["unique_graphs"] == graphs  # no graph was added by any phrase or box count


def _jpeg(image: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_the_text_bound_is_checked_against_the_detector_and_a_longer_phrase_is_refused():
    """max_text_tokens above what the detector reads (the tiny one: 256, its max_text_len) fails at start-up;
    a phrase longer than the bound is an error that says what to do (personalize's --subject), never truncated."""
    with pytest.raises(ValueError, match="max_text_tokens=300 .* at most 256"):
        GroundedSegmenter(replace(build_config("tiny").segment, max_text_tokens=300))
    with pytest.raises(ValueError, match="segment.max_text_tokens must be >= 4"):
        build_config("tiny", {"segment.max_text_tokens": 3})
    segmenter = GroundedSegmenter(build_config("tiny").segment)
    with pytest.raises(SubjectTooLong, match=r"is \d+ Grounding DINO tokens, more than the 32 .* fewer words"):
        segmenter.cutout(photo(0), TOO_LONG, 64)
    assert segmenter.cutout(photo(0), "teapot", 64)[0].size == (64, 64)


def test_only_the_pipeline_on_a_gpu_compiles_the_segmenter_unless_asked():
    """Compiling takes minutes: worth it over a dataset, not for `dreamcache personalize`'s few images. The
    config's ``compile`` applies on a GPU only; ``compile()`` compiles on any device when asked. Compiled, every
    call is padded to batch_size images (the answer is still one per image); eager, it is not."""
    from dreamcache.segmenter import grounding_config

    assert build_config("paper").segment.compile and not grounding_config().compile
    stage = SegmentStage(build_config("tiny", {"segment.compile": True}).segment)
    assert not stage.compiled
    seen, locate = [], stage._locate
    stage._locate = lambda det, sam, n: seen.append((len(sam["pixel_values"]), det["input_ids"].shape[1])) or locate(
        det, sam, n)
    assert len(stage.find([photo(0)], ["teapot"])) == 1
    stage.compiled = True  # as compile() leaves it, without compiling here
    assert len(stage.find([photo(0)], ["teapot"])) == 1
    assert seen == [(1, 32), (stage.cfg.batch_size, 32)]  # the text always holds max_text_tokens


def test_phrases_counted_in_one_thread_leave_another_threads_batches_padded():
    """The detector's tokenizer holds its padding and truncation as settings of one shared object: counting a
    phrase's tokens (``find`` does, first) while another call pads its batch must not unpad it. Two calls at once
    are the pipeline actor's default (two calls in flight): each find gives what it gives alone."""
    import threading

    from dreamcache.segmenter import grounding_config, make_segmenter

    seg = make_segmenter(grounding_config("tiny", "grounded"))
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)) for i in range(2)]
    phrases = ["red teapot", "a small brass bell on a string"]
    alone = seg.find(images, phrases)
    errors, done = [], threading.Event()

    def counting():
        while not done.is_set():
            try:
                assert seg.text_tokens(["a very old wooden rocking chair with a cushion", "hat"])[1] < 8
            except Exception as e:  # noqa: BLE001 - any failure of the other thread is the test's
                errors.append(e)

    other = threading.Thread(target=counting)
    other.start()
    try:
        for _ in range(20):
            got = seg.find(images, phrases)
            assert [None if g is None else g[2] for g in got] == [None if a is None else a[2] for a in alone]
    finally:
        done.set()
        other.join()
    assert not errors, errors[:1]
