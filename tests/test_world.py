"""The small world (world/): its renders and judge, its held-out subjects, its caption vocabulary, its base
model's parts (the exact pixel codec, the word-level tokenizer, resumable training) and the keying segmenter."""

import io
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from dreamcache.segmenter import KeyedSegmenter, grounding_config
from pipeline.captions import CaptionStage, make_requests, subject_in_caption
from pipeline.config import CaptionConfig, DedupConfig
from pipeline.dedup import dedup_and_balance
from pipeline.small_world import identity_prompt
from prompts import load_vocabulary
from world import base, judge
from world.scene import (ALL_SUBJECTS, BACKGROUNDS, COLOURS, PATTERNS, SHAPES, WHERE, Scene, Subject, contexts,
                         draw_scene, held_out_subjects, render, subject_mask, training_subjects)


def test_the_judge_reads_at_least_95_percent_of_rendered_scenes_right_on_every_attribute():
    accuracy = judge.check(n=600, seed=1)
    assert min(accuracy.values()) >= 0.95, accuracy


def test_the_judge_finds_the_subject_by_its_own_rule():
    rng = random.Random(2)
    for _ in range(100):
        scene = draw_scene(rng, ALL_SUBJECTS)
        pixels = np.asarray(render(scene), dtype=np.float32)
        mask = judge.subject_pixels(pixels, np.array(BACKGROUNDS[scene.background], dtype=np.float32))
        truth = subject_mask(scene) > 0.5
        assert (mask & truth).sum() / (mask | truth).sum() > 0.75  # edge pixels half covered count either way


def test_the_target_stage_drops_a_target_the_base_drew_as_a_held_out_subject():
    from pipeline.config import build_config
    from pipeline.small_world import WorldTargets

    class Drawn:  # stands in for the base: draws what the test says, whatever it is asked
        device = torch.device("cpu")

        def __init__(self, scenes):
            self.scenes = scenes

        def __call__(self, prompt, **kw):
            return type("Out", (), {"images": [render(s) for s in self.scenes[:len(prompt)]]})

    held, kept = held_out_subjects()[0], training_subjects()[0]
    scenes = [Scene(held, "left", "white"), Scene(kept, "left", "white")]
    cfg = build_config("tiny", yaml_file=ROOT / "world" / "pipeline.yaml").targets
    stage = WorldTargets(cfg, pipe=Drawn(scenes))
    rows = [{"caption": s.caption(), "category": s.subject.shape, "seed": i} for i, s in enumerate(scenes)]
    out = stage.process(rows)
    assert out[0].reason == "held_out_subject" and set(out[1]) == {"target"}


def test_the_world_writes_its_targets_with_full_resolution_colour():
    """JPEG's default chroma subsampling blurs colour over 2x2 pixels: at 32 px a visible error on every edge of
    a subject, which the adapters would learn to reproduce. The world's shards keep colour whole."""
    from pipeline.config import ShardConfig, build_config
    from pipeline.stage import encode_jpeg

    shards = build_config("tiny", yaml_file=ROOT / "world" / "pipeline.yaml").shards
    assert shards.jpeg_chroma == 444
    rng = random.Random(4)
    for subject in held_out_subjects():
        image = render(Scene(subject, rng.choice(list(WHERE)), rng.choice(list(BACKGROUNDS))))
        pixels = np.asarray(image, dtype=np.float32)
        error = {name: np.abs(np.asarray(Image.open(io.BytesIO(encode_jpeg(image, s))), dtype=np.float32)
                              - pixels).mean() for name, s in (("world", shards), ("default", ShardConfig()),
                                                               ("best 4:2:0", ShardConfig(jpeg_quality=100)))}
        assert error["world"] < 1.0 < error["best 4:2:0"] < error["default"], error  # mean absolute 0-255 levels
    with pytest.raises(ValueError, match="jpeg_chroma must be one of 420, 422, 444"):
        ShardConfig(jpeg_chroma=411)
    assert build_config("tiny", {"shards.jpeg_chroma": "444"}).shards.jpeg_chroma == 444  # as --set gives it


def test_the_judge_finds_nothing_in_a_flat_image_and_names_its_background():
    r = judge.read(Image.new("RGB", (32, 32), BACKGROUNDS["gray"]))
    assert r.shape is None and r.identity is None and r.background == "gray"


def test_held_out_subjects_are_in_no_training_draw_but_their_parts_are():
    held, train = set(held_out_subjects()), set(training_subjects())
    assert len(held) == 6 and not held & train and held | train == set(ALL_SUBJECTS)
    for part, values in (("colour", COLOURS), ("shape", SHAPES), ("pattern", PATTERNS)):
        assert {getattr(s, part) for s in train} == set(values)  # every colour, shape and pattern is seen
    rng = random.Random(0)
    assert not {draw_scene(rng, training_subjects()).subject for _ in range(2000)} & held


@pytest.mark.parametrize("shape", SHAPES)
def test_the_target_stage_asks_for_a_training_identity_drawn_from_the_seed(shape):
    caption = Scene(Subject(shape, "red", "plain"), "left", "gray").caption()
    prompts = [identity_prompt(caption, shape, seed) for seed in range(300)]
    assert prompts == [identity_prompt(caption, shape, seed) for seed in range(300)]  # a function of the seed
    asked = {tuple(p.split(" on the left")[0].split()[1:]) for p in prompts}
    wanted = {(s.colour, s.pattern, s.shape) for s in training_subjects() if s.shape == shape}
    assert asked == wanted  # every training identity of the class, and no held-out one
    assert all(p.endswith(" on the left, on a gray background") for p in prompts)
    with pytest.raises(ValueError, match="does not name"):
        identity_prompt("a square on the left, on a gray background", "circle", 0)


def test_the_vocabulary_file_holds_the_world_captions_name_the_class_only_and_repeats_are_kept():
    path = str(ROOT / "world" / "vocabulary.yaml")
    vocab = load_vocabulary(path)
    assert [c.name for c in vocab.categories] == list(SHAPES) and not vocab.colours and not vocab.styles
    assert list(vocab.contexts) == [f"{WHERE[p]}, on a {b} background" for p, b in contexts()]
    cfg = CaptionConfig(backend="template", vocabulary=path, captions_per_request=8)
    requests = make_requests(12, 0, 0, cfg)
    out = CaptionStage(cfg)({k: np.array([r[k] for r in requests], dtype=object) for k in requests[0]})
    assert set(out["status"]) == {"ok"} and len(out["caption"]) == 96
    scenes = {Scene(Subject(s, "red", "plain"), p, b).caption() for s in SHAPES for p, b in contexts()}
    assert set(out["caption"]) <= scenes  # "a circle on the left, on a white background": no identity
    assert all(subject_in_caption(s, c) for s, c in zip(out["subject"], out["caption"]))
    rows = [{"caption": c, "subject": s, "category": k} for c, s, k in zip(out["caption"], out["subject"], out["category"])]
    kept, drops = dedup_and_balance(rows, 96, DedupConfig(enabled=False))
    assert len(kept) == 96 and not sum(drops.values())  # 27 captions, each many times: the samples differ by identity
    assert len(dedup_and_balance(rows, 96, DedupConfig())[0]) <= 27


def test_the_codec_latents_are_the_pixels_and_it_decodes_them_back_exactly():
    codec = base.pixel_codec(scaling_factor=1 / base.PIXEL_STD)
    images, _ = base.batch(random.Random(0), 8)
    images[0] = torch.linspace(-1, 1, 32 * 32 * 3).view(3, 32, 32)  # every level, not only the palette
    with torch.no_grad():
        latents = codec.encode(images).latent_dist
        assert torch.allclose(latents.mean[:, :3], images, atol=1e-5) and latents.mean[:, 3].abs().max() == 0
        assert latents.std.max() < 1e-6  # the posterior is a point
        assert torch.allclose(codec.decode(latents.mean).sample, images, atol=1e-5)


def test_every_world_word_is_one_token_and_captions_fit_the_text_length():
    tok = base.build_tokenizer()
    for word in base.world_words():
        assert len(tok.tokenize(word)) == 1, word
    longest = max((Scene(s, p, b).caption(identity=True) for s in ALL_SUBJECTS for p in WHERE for b in BACKGROUNDS),
                  key=len)
    assert len(tok(longest).input_ids) <= base.MAX_TOKENS


def test_training_captions_name_the_identity_sometimes_and_are_empty_a_tenth_of_the_time():
    rng = random.Random(0)
    scene = Scene(Subject("circle", "red", "striped"), "left", "white")
    counts = Counter(base.training_caption(scene, rng) for _ in range(4000))
    assert 0.08 < counts[""] / 4000 < 0.12
    assert set(counts) == {"", scene.caption(), scene.caption(identity=True),
                           "a red circle on the left, on a white background",
                           "a striped circle on the left, on a white background"}


def test_keying_cuts_out_the_rendered_subject():
    seg = KeyedSegmenter(grounding_config(method="key"))
    rng = random.Random(3)
    for _ in range(60):
        scene = draw_scene(rng, ALL_SUBJECTS)
        mask = seg.find([render(scene)], ["ignored"])[0][0]
        truth = subject_mask(scene) > 0.5
        # > 0.75: a striped subject's dark edge rows on a black backdrop (green's are 55 away) can be lost
        assert (mask & truth).sum() / (mask | truth).sum() > 0.75
    assert seg.find([Image.new("RGB", (32, 32), "white")], ["x"]) == [None]
    cut = seg.cutout(render(scene), "x", 32)[0]
    assert np.asarray(cut)[0, 0].tolist() == [255, 255, 255]  # on white


def test_the_keyed_segment_stage_cuts_references_and_drops_what_it_cannot_key():
    from pipeline.config import ShardConfig, build_config
    from pipeline.segment import KeyedSegmentStage, SegmentStage
    from pipeline.stage import encode_jpeg

    cfg = build_config("tiny", yaml_file=ROOT / "world" / "pipeline.yaml").segment
    assert SegmentStage.variant(cfg) is KeyedSegmentStage and SegmentStage.models(cfg) == []
    scenes = [draw_scene(random.Random(i), ALL_SUBJECTS) for i in range(6)]
    images = [render(s) for s in scenes] + [Image.new("RGB", (32, 32), "gray")]
    n = len(images)
    batch = {"key": np.array([f"k{i}" for i in range(n)], dtype=object), "subject": np.array(["x"] * n, dtype=object),
             "target": np.array([encode_jpeg(im, ShardConfig()) for im in images], dtype=object),
             "status": np.array(["ok"] * n, dtype=object)}
    out = KeyedSegmentStage(cfg)(batch)
    assert list(out["status"]) == ["ok"] * 6 + ["segment:no_box"]
    for scene, ref in zip(scenes, out["reference"][:6]):
        r = judge.read(Image.open(io.BytesIO(ref)))
        assert (r.colour, r.background) == (scene.subject.colour, "white")  # the subject, cut out on white


def test_the_pixel_scale_gives_latents_of_unit_spread():
    images, _ = base.batch(random.Random(1), 4096)
    assert abs(images.std().item() - base.PIXEL_STD) < 0.02


def test_base_training_refuses_to_replace_a_model_it_has_no_state_for_or_to_resume_with_other_settings(tmp_path):
    base.build().save_pretrained(tmp_path / "fixture")
    with pytest.raises(FileExistsError, match="not its training state"):
        base.train(tmp_path / "fixture", steps=1, batch_size=2)
    base.train(tmp_path / "run", steps=1, batch_size=2, checkpoint_every=1)
    with pytest.raises(ValueError, match="batch_size 2 \\(now 4\\)"):
        base.train(tmp_path / "run", steps=2, batch_size=4)


def test_base_training_resumes_where_it_stopped_bit_for_bit(tmp_path):
    torch.set_num_threads(1)
    base.train(tmp_path / "straight", steps=3, batch_size=2, checkpoint_every=3, log_every=10)
    base.train(tmp_path / "resumed", steps=2, batch_size=2, checkpoint_every=2, log_every=10)
    base.train(tmp_path / "resumed", steps=3, batch_size=2, checkpoint_every=3, log_every=10)
    a, b = (torch.load(tmp_path / run / "train" / "state.pt", weights_only=False) for run in ("straight", "resumed"))
    assert a["step"] == b["step"] == 3
    for key in ("unet", "text_encoder"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "resumed")  # the folder is a pipeline
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_a_dataset_fingerprint_follows_the_contents_of_its_vocabulary_and_world_base(tmp_path):
    """A vocabulary edited in place, or a world base trained again into the same folder, makes other samples: a
    second run into the same --out must see another configuration, not resume."""
    import shutil

    from pipeline.config import build_config
    from pipeline.plan import data_fingerprint

    vocabulary, model = tmp_path / "vocabulary.yaml", tmp_path / "base"
    shutil.copy(ROOT / "world" / "vocabulary.yaml", vocabulary)
    shutil.copytree(ROOT / "world" / "base-model", model)
    settings = {"captions.vocabulary": str(vocabulary), "targets.model": f"world:{model}", "size": 10}

    def fingerprint():
        return data_fingerprint(build_config("tiny", settings, yaml_file=ROOT / "world" / "pipeline.yaml"))

    first = fingerprint()
    (model / "train").mkdir()
    (model / "train" / "state.pt").write_bytes(b"the training state is not the model")
    assert fingerprint() == first
    vocabulary.write_text(vocabulary.read_text().replace("on a white background", "on a snow-white background"))
    edited = fingerprint()
    assert edited != first
    weights = next(model.glob("unet/*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one byte of the weights changed
    weights.write_bytes(bytes(data))
    assert fingerprint() != edited


def test_the_ablations_refuse_other_settings_than_the_proof_they_compare_with(tmp_path, capsys):
    import json

    from world import proof

    out = tmp_path / "proof"
    (out / "dataset").mkdir(parents=True)
    (out / "dataset" / "dataset.json").write_text("{}")
    (out / "eval" / "images").mkdir(parents=True)
    settings = {"steps": "500", "batch": "32", "lr": "0.001", "guidance": "combined", "image_scale": "2.0",
                "images_per_prompt": "2", "seed": "0", "train_set": "[]"}
    (out / "proof.json").write_text(json.dumps({"args": settings}))
    assert proof.main(["--out", str(out), "--ablations", "--lr", "3e-4", "--guidance", "joint"]) == 2
    error = capsys.readouterr().err
    assert "other --lr, --guidance (0.001, combined)" in error and not (out / "ablations").exists()
    assert proof.main(["--out", str(tmp_path / "none"), "--ablations"]) == 2
    assert "needs a finished proof" in capsys.readouterr().err
