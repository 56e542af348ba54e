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


def test_sdxl_compiled_in_each_mode_gives_the_eager_images_and_fp8_says_what_it_needs(tiny_dir):
    """compile_sdxl (fused q/k/v, channels-last, the U-Net and VAE decoder compiled; aot_eager: the same kernels)
    gives the eager images; called again it compiles the same modules afresh (the projections fused once). The
    mode reaches torch.compile, which aot_eager ignores: CUDA graphs themselves need a GPU (the GPU benchmark).
    FP8 is refused with what to do where it cannot run (here: no GPU with FP8 units), and on a float16 config."""
    import dataclasses

    import torch

    from pipeline.targets import compile_sdxl, load_sdxl

    cfg = build_config("tiny").targets
    pipe = load_sdxl(cfg, "cpu")

    def images():
        return np.asarray(pipe(prompt=["a teapot", "a red hat"], num_inference_steps=2, height=64, width=64,
                               generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="np").images)

    eager = images()
    for mode in (None, "reduce-overhead"):
        compile_sdxl(pipe, mode, backend="aot_eager")
        assert isinstance(pipe.unet, torch._dynamo.eval_frame.OptimizedModule)
        np.testing.assert_allclose(images(), eager, atol=1e-4, err_msg=str(mode))
    with pytest.raises(RuntimeError, match="targets.fp8 needs .*targets.fp8=false"):
        compile_sdxl(pipe, fp8=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match="targets.fp8 needs"):
        load_sdxl(dataclasses.replace(cfg, fp8=True, dtype="bfloat16"), "cpu")
    with pytest.raises(ValueError, match="targets.fp8 quantizes bf16 weights"):
        dataclasses.replace(cfg, fp8=True, dtype="float16")
    with pytest.raises(ValueError, match="stand-in"):
        dataclasses.replace(cfg, fp8=True, dtype="bfloat16", model="simulate:0.1")


def test_fp8_takes_the_linear_layers_that_run_in_the_transformers_of_sdxl():
    """The layers FP8 takes on the full-size SDXL U-Net (built on the meta device): every linear layer of its
    transformers (projections in and out, attention, feed-forward), not the time and size embeddings' (one vector
    per row) nor anything else; with the projections fused (as compile_sdxl runs it), the fused ones and not the
    separate ones they replace."""
    import torch

    from dreamcache.bases import SDXL
    from pipeline.targets import fp8_layers

    with torch.device("meta"):
        unet = SDXL.build_unet(random_init=True, device="meta")
    linear = {name for name, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    taken = fp8_layers(unet)
    assert taken == {name for name in linear if ".attentions." in name} and len(taken) == 722
    unet.fuse_qkv_projections()
    fused = fp8_layers(unet)
    separate = {n for n in taken if n.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_k", "attn2.to_v"))}
    added = {n for n in fused if n.endswith(("to_qkv", "to_kv"))}
    assert fused == (taken - separate) | added and len(separate) == 350 and len(added) == 140 and len(fused) == 512


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
    ({"segment.max_text_tokens": 5}, "segment:subject_too_long"),  # "[CLS] red ceramic teapot . [SEP]": 6
])
def test_quality_filters_record_their_reason(targets, override, reason):
    cfg = build_config("tiny", override)
    out = SegmentStage(cfg.segment)(targets)
    assert set(out["status"]) == {reason}
    assert all(r == b"" for r in out["reference"])


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
