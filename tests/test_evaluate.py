"""The DreamBooth evaluation: the protocol's prompts, the metric arithmetic, masking, and a tiny end-to-end run."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from dreamcache.evaluate import EvalConfig, load_benchmark, score, summarise
from dreamcache.metrics import Embedder, cosine_matrix, pairwise_mean

REAL = Path(os.environ.get("DREAMBOOTH_DIR", ROOT.parent / "shared" / "datasets" / "dreambooth"))

SPEC = """Classes

subject_name,class
backpack,backpack
cat,cat
bear_plushie,stuffed animal

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} in the snow'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} wearing a red hat'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]
"""


def photo(seed: int, size: int = 96) -> Image.Image:
    """A coloured square on a textured background."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 80, (size, size, 3)).astype(np.uint8)
    arr[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = rng.integers(100, 255, 3)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def dreambooth(tmp_path_factory) -> Path:
    """The real DreamBooth folder when it is there, else a small one in the same layout and file format."""
    if (REAL / "prompts_and_classes.txt").exists():
        return REAL
    root = tmp_path_factory.mktemp("dreambooth")
    (root / "prompts_and_classes.txt").write_text(SPEC)
    for n, name in enumerate(["backpack", "cat", "bear_plushie"]):
        (root / name).mkdir()
        for i in range(4):  # as few as the real subjects have
            photo(10 * n + i).save(root / name / f"{i:02d}.jpg")
    return root


def test_prompts_carry_the_class_noun_and_live_subjects_get_their_list(dreambooth):
    bench = load_benchmark(dreambooth)
    by_name = {s.name: s for s in bench.subjects}
    assert bench.prompts(by_name["backpack"])[0] == "a backpack in the jungle"
    assert "a stuffed animal in the snow" in bench.prompts(by_name["bear_plushie"])
    assert "a cat wearing a red hat" in bench.prompts(by_name["cat"])
    assert not any("wearing" in p for p in bench.prompts(by_name["backpack"]))
    assert not any("{" in p or "unique" in p for s in bench.subjects for p in bench.prompts(s))


@pytest.mark.skipif(not (REAL / "prompts_and_classes.txt").exists(), reason=f"DreamBooth dataset not at {REAL}")
def test_the_real_benchmark_has_30_subjects_and_25_prompts_each():
    bench = load_benchmark(REAL)
    assert len(bench.subjects) == 30
    assert all(len(bench.prompts(s)) == 25 for s in bench.subjects)
    live = sorted(s.name for s in bench.subjects if s.live)
    assert live == ["cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]


def test_cosine_arithmetic_against_hand_computed_values():
    a = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    b = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    # by hand: cos([1,0],[0,2]) = 0, cos([1,0],[1,1]) = 1/sqrt2, cos([3,4],[0,2]) = 0.8, cos([3,4],[1,1]) = 7/(5 sqrt2)
    want = torch.tensor([[0.0, 1 / 2**0.5], [0.8, 7 / (5 * 2**0.5)]])
    torch.testing.assert_close(cosine_matrix(a, b), want)
    torch.testing.assert_close(pairwise_mean(a, b), want.mean(dim=1))


def test_summary_means_skip_images_without_a_mask():
    rows = [{"subject": "a", "dino": 0.2, "clip_i": 0.4, "clip_t": 0.1, "mdino": 0.5, "mclip_i": 0.7},
            {"subject": "a", "dino": 0.4, "clip_i": 0.6, "clip_t": 0.3, "mdino": None, "mclip_i": None},
            {"subject": "b", "dino": 0.9, "clip_i": 0.8, "clip_t": 0.2, "mdino": 0.1, "mclip_i": 0.3}]
    s = summarise(rows)
    assert s["subjects"]["a"]["dino"] == pytest.approx(0.3) and s["subjects"]["a"]["mdino"] == pytest.approx(0.5)
    assert s["overall"]["dino"] == pytest.approx(0.5) and s["overall"]["mclip_i"] == pytest.approx(0.5)
    assert s["overall"]["masked_images"] == 2 and s["overall"]["images"] == 3


class CentreSegmenter:
    """Stands in for Grounding DINO + SAM: the subject is always the central square."""

    def describe(self):
        return {"stand-in": "centre square"}

    def cutouts(self, images, subject, size):
        from dreamcache.segmenter import make_reference

        out = []
        for im in images:
            arr = np.asarray(im.convert("RGB"))
            h, w = arr.shape[:2]
            mask = np.zeros((h, w), bool)
            mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = True
            out.append((Image.fromarray(make_reference(arr, mask, 0.1, size)[0]), mask))
        return out


@pytest.fixture(scope="module")
def embedder():
    return Embedder("tiny:dino", "tiny:clip", device="cpu")


def test_scores_are_the_embedding_cosines_and_masked_scores_see_only_the_subject(dreambooth, embedder, tmp_path):
    bench = load_benchmark(dreambooth)
    subject = next(s for s in bench.subjects if s.name == "backpack")
    cfg = EvalConfig(adapters="-", dreambooth=str(dreambooth), out=str(tmp_path), subjects=("backpack",), prompts=1,
                     images_per_prompt=2, compare="reference")
    folder = tmp_path / "images" / "backpack"
    folder.mkdir(parents=True)
    for i in range(2):
        photo(100 + i).save(folder / f"00-{i}.png")
    first = score(cfg, embedder, CentreSegmenter(), [subject], bench, tmp_path)["images"]

    gen = [Image.open(folder / f"00-{i}.png").convert("RGB") for i in range(2)]
    real = [Image.open(subject.images[0]).convert("RGB")]
    dino = pairwise_mean(embedder.dino(gen), embedder.dino(real))
    clip_t = torch.nn.functional.cosine_similarity(embedder.clip_image(gen),
                                                   embedder.clip_text(["a backpack in the jungle"]))
    assert [r["prompt"] for r in first] == ["a backpack in the jungle"] * 2  # CLIP-T's text has the class noun
    assert [r["dino"] for r in first] == pytest.approx(dino.tolist(), abs=1e-6)
    assert [r["clip_t"] for r in first] == pytest.approx(clip_t.tolist(), abs=1e-6)

    # Repaint the background of the generated images (outside the subject's square): the unmasked scores
    # move, the masked ones do not.
    for i in range(2):
        arr = np.asarray(gen[i]).copy()
        keep = arr[24:72, 24:72].copy()
        arr[:] = np.random.default_rng(7 + i).integers(0, 255, arr.shape)
        arr[24:72, 24:72] = keep
        Image.fromarray(arr).save(folder / f"00-{i}.png")
    second = score(cfg, embedder, CentreSegmenter(), [subject], bench, tmp_path)["images"]
    for a, b in zip(first, second):
        assert a["mdino"] == pytest.approx(b["mdino"], abs=1e-6) and a["mclip_i"] == pytest.approx(b["mclip_i"], abs=1e-6)
        assert abs(a["dino"] - b["dino"]) > 1e-4 or abs(a["clip_i"] - b["clip_i"]) > 1e-4


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Path:
    from test_generation import write_adapters

    return write_adapters(tmp_path_factory.mktemp("eval-adapters") / "adapters.safetensors", perturb=0.3)


def test_evaluate_cli_tiny_writes_every_metric_and_resumes(dreambooth, adapters, tmp_path, capsys):
    from dreamcache.cli import main as cli
    from dreamcache.evaluate import METRICS

    args = ["evaluate", "--profile", "tiny", "--adapters", str(adapters), "--dreambooth", str(dreambooth),
            "--subjects", "2", "--prompts", "2", "--images-per-prompt", "2", "--steps", "10", "--out", str(tmp_path)]
    assert cli(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["overall"]["images"] == 8 and len(results["subjects"]) == 2
    assert results["overall"]["masked_images"] >= 1  # the random tiny segmenter finds a "subject" in some
    for m in METRICS:
        assert isinstance(results["overall"][m], float) and -1 <= results["overall"][m] <= 1, m
    assert "| **overall** | 8 |" in (tmp_path / "results.md").read_text()
    config = results["config"]
    assert (config["preset"], config["guidance"], config["text_scale"], config["sampler"]) == (
        "joint", "joint", 7.5, "DDIM, eta 0")
    assert results["paper"]["SD 2.1"] == {"dino": 0.767, "clip_i": 0.816, "clip_t": 0.301}  # beside SD 1.5's
    assert "SD 1.5: DINO 0.713" in (tmp_path / "results.md").read_text()
    assert len(list((tmp_path / "grids").glob("*.jpg"))) == 2
    images = sorted((tmp_path / "images").rglob("*.png"))
    assert len(images) == 8
    stamps = {p: p.stat().st_mtime_ns for p in images}
    first = images[0].read_bytes()

    os.remove(images[0])  # an interrupted run: one image missing
    capsys.readouterr()
    assert cli(args) == 0
    log = capsys.readouterr().out
    assert "1 prompt(s) generated, 1 already on disk" in log and "0 prompt(s) generated, 2 already on disk" in log
    # Only the prompt with the missing image is sampled again (its images share one call), with the same seeds.
    assert all(p.stat().st_mtime_ns == stamps[p] for p in images[2:])  # kept, not regenerated
    assert images[0].read_bytes() == first


class FindsNothing:
    def describe(self):
        return {"stand-in": "finds nothing"}

    def cutouts(self, images, subject, size):
        return [None] * len(images)


def test_a_reference_the_segmenter_misses_is_cached_whole_and_reported(dreambooth, adapters, tmp_path):
    from dreamcache.evaluate import generate_images
    from dreamcache.generation import load_pipeline

    bench = load_benchmark(dreambooth)
    cfg = EvalConfig(adapters=str(adapters), dreambooth=str(dreambooth), out=str(tmp_path), prompts=1,
                     images_per_prompt=1, steps=2)
    pipe = load_pipeline("tiny:sd15", adapters, device="cpu")
    subject = bench.subjects[0]
    assert generate_images(cfg, pipe, FindsNothing(), [subject], bench, tmp_path) == [subject.name]
    assert (tmp_path / "images" / subject.name / "00-0.png").exists()
    # A resumed run still reports it, without segmenting again.
    assert generate_images(cfg, pipe, FindsNothing(), [subject], bench, tmp_path) == [subject.name]


def test_guidance_presets_and_the_flags_that_override_them():
    from dreamcache.cli import parse

    def settings(*flags):
        cfg = parse(["evaluate", "--adapters", "a", "--dreambooth", "d", *flags])[1]
        return {k: getattr(cfg, k) for k in ("guidance", "text_scale", "image_scale")}

    assert settings() == {"guidance": "joint", "text_scale": 7.5, "image_scale": 3.0}
    assert settings("--preset", "official") == {"guidance": "combined", "text_scale": 7.5, "image_scale": 0.4}
    assert settings("--preset", "official", "--image-scale", "0.6")["image_scale"] == 0.6
    assert settings("--guidance", "combined") == {"guidance": "combined", "text_scale": 7.5, "image_scale": 3.0}


def test_evaluate_with_one_and_three_references_side_by_side(dreambooth, adapters, tmp_path):
    """--references 1 3: each subject's first image, then its first three, as one cache of three times the
    tokens; the same seeds for both; both compared with the rest (images 3 and on); the report side by side."""
    from dreamcache.cli import main as cli
    from dreamcache.generation import ReferenceCache

    args = ["evaluate", "--profile", "tiny", "--adapters", str(adapters), "--dreambooth", str(dreambooth),
            "--subjects", "1", "--prompts", "1", "--images-per-prompt", "1", "--steps", "3", "--references", "1", "3",
            "--out", str(tmp_path)]
    assert cli(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["references"]) == ["1", "3"] and results["config"]["compare"] == "rest"
    assert results["overall"] == results["references"]["1"]["overall"]
    assert sorted(r["references"] for r in results["images"]) == [1, 3]
    subject = load_benchmark(dreambooth).subjects[0]
    one = ReferenceCache.load(tmp_path / "caches" / f"{subject.name}.safetensors")
    three = ReferenceCache.load(tmp_path / "caches" / f"{subject.name}-k3.safetensors")
    assert [r["name"] for r in three.references] == [str(p) for p in subject.images[:3]]
    for layer, f in one.features.items():
        assert three.features[layer].shape[1] == 3 * f.shape[1]
        assert torch.equal(three.features[layer][:, :f.shape[1]], f)  # its first reference's tokens, as cached alone
    a = np.asarray(Image.open(tmp_path / "images" / subject.name / "00-0.png"))
    b = np.asarray(Image.open(tmp_path / "images-k3" / subject.name / "00-0.png"))
    assert np.abs(a.astype(int) - b.astype(int)).max() > 0  # same seed, other references
    report = (tmp_path / "results.md").read_text()
    assert "| references | 1 | 3 |" in report and "## 3 reference(s) per subject" in report
    assert (tmp_path / "grids" / f"{subject.name}-k3.jpg").exists()

    # compared with the rest: images 3 and on (the real fallback set and the benchmark both have at least 4)
    from dreamcache.evaluate import real_images

    cfg = EvalConfig(adapters="-", dreambooth=str(dreambooth), references=(1, 3))
    assert real_images(cfg, subject, 1) == real_images(cfg, subject, 3) == subject.images[3:]
    with pytest.raises(ValueError, match="--references 9 .* needs 10 images per subject"):
        from dreamcache.evaluate import evaluate

        evaluate(EvalConfig(adapters=str(adapters), dreambooth=str(dreambooth), references=(9,), profile="tiny",
                            out=str(tmp_path / "nine")))
