"""The web app (``dreamcache app``): the studio behind it against the commands, its API through gradio_client,
and the page in a real browser (Debian's chromium, driven by Playwright)."""

import io
import json
import shutil
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreamcache.cli import main as cli
from dreamcache.commands import AppConfig, Sampling
from dreamcache.generation import ReferenceCache, load_pipeline
from dreamcache.segmenter import grounding_config, make_segmenter
from dreamcache.studio import Studio, archive
from test_evaluate import SPEC
from test_generation import reference_image, write_adapters

gr = pytest.importorskip("gradio")

PROMPTS = ["a toy in the snow", "a toy on a beach"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Path:
    return write_adapters(tmp_path_factory.mktemp("app-adapters") / "adapters.safetensors", perturb=0.3)


@pytest.fixture(scope="module")
def studio(adapters) -> Studio:
    pipe = load_pipeline("tiny:sd15", adapters, device="cpu")
    return Studio(pipe, make_segmenter(grounding_config("tiny", "key")))


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("references")
    paths = [folder / f"toy-{i}.png" for i in range(2)]
    for i, path in enumerate(paths):
        reference_image(i).save(path)
    return paths


@pytest.fixture(scope="module")
def dreambooth(tmp_path_factory) -> Path:
    """A DreamBooth folder in the real layout, subjects on a white backdrop (the key segmenter finds them)."""
    root = tmp_path_factory.mktemp("dreambooth")
    (root / "prompts_and_classes.txt").write_text(SPEC)
    for n, name in enumerate(["backpack", "cat", "bear_plushie"]):
        (root / name).mkdir()
        for i in range(2):
            reference_image(10 * n + i).save(root / name / f"{i:02d}.jpg", quality=95)
    return root


def pixels(image: Image.Image | str | Path) -> np.ndarray:
    return np.asarray(Image.open(image).convert("RGB") if not isinstance(image, Image.Image) else image.convert("RGB"))


def test_the_studio_gives_what_personalize_and_generate_give(studio, adapters, references, tmp_path):
    """The same cache as `dreamcache personalize` and the same images as `dreamcache generate`, for several
    references, seeds and both guidances; the base model's images come from the same seeds."""
    cache = tmp_path / "toy.cache"
    assert cli(["personalize", "--profile", "tiny", "--adapters", str(adapters), "--segmenter", "key",
                *[a for p in references for a in ("--reference", str(p))], "--subject", "toy",
                "--out", str(cache)]) == 0
    subject = studio.personalize([Image.open(p) for p in references], "toy", names=[str(p) for p in references])
    expected = ReferenceCache.load(cache)
    assert set(subject.cache.features) == set(expected.features)
    for layer, f in expected.features.items():
        assert np.array_equal(subject.cache.features[layer].numpy(), f.numpy()), layer
    for k, cutout in enumerate(subject.cutouts):
        assert np.array_equal(pixels(cutout), pixels(cache.with_suffix(".reference.png" if k == 0 else
                                                                       f".reference-{k}.png")))
    for guidance, seed in (("joint", 3), ("combined", 11)):
        out = tmp_path / f"{guidance}.png"
        assert cli(["generate", "--cache", str(cache), "--prompt", PROMPTS[0], "--n", "2", "--seed", str(seed),
                    "--steps", "3", "--guidance", guidance, "--out", str(out)]) == 0
        settings = Sampling(n=2, seed=seed, steps=3, guidance=guidance)
        [result] = studio.generate(subject, [PROMPTS[0]], settings, base_too=True)
        assert result.seeds == [seed, seed + 1]
        for k, image in enumerate(result.images):
            assert np.array_equal(pixels(image), pixels(out.with_name(f"{out.stem}-{k}.png"))), (guidance, k)
        import torch

        gens = [torch.Generator().manual_seed(seed + k) for k in range(2)]
        base = studio.pipe(PROMPTS[0], num_inference_steps=3, num_images_per_prompt=2, generator=gens).images
        for ours, theirs, personal in zip(result.base, base, result.images):
            assert np.array_equal(pixels(ours), pixels(theirs))
            assert not np.array_equal(pixels(ours), pixels(personal))  # the adapters change the image


def test_a_subject_is_cached_once_and_other_inputs_make_other_caches(adapters):
    studio = Studio(load_pipeline("tiny:sd15", adapters, device="cpu"), make_segmenter(grounding_config("tiny", "key")),
                    keep=2)
    a, b = reference_image(0), reference_image(1)
    first = studio.personalize([a], "toy")
    assert studio.personalize([a.copy()], " toy ") is first and studio.cached == 1  # the same pixels and phrase
    variants = [studio.personalize([b], "toy"), studio.personalize([a], "toy", segment=False),
                studio.personalize([a], "toy", seed=1), studio.personalize([a, b], "toy")]
    assert studio.cached == 5 and len({id(v) for v in [first, *variants]}) == 5
    assert len(studio.subjects) == 2  # keep=2: the oldest went
    studio.personalize([a], "toy")
    assert studio.cached == 6  # made again after it went
    results = studio.generate(variants[-1], PROMPTS, Sampling(n=1, steps=2), attention=True)
    assert studio.cached == 6
    layers = len(studio.pipe.unet.dreamcache_layers)
    for r in results:  # one sheet per layer and image: both references' maps, then the image
        assert len(r.attention) == layers and r.attention[0][1].size == (3 * 32, 32)
    with pytest.raises(ValueError, match="at least one reference"):
        studio.personalize([], "toy")
    with pytest.raises(ValueError, match="write a prompt"):
        studio.generate(first, ["", "  "], Sampling(steps=2))
    grounded = Studio(studio.pipe, make_segmenter(grounding_config("tiny", "grounded")))
    with pytest.raises(ValueError, match="name the subject"):
        grounded.personalize([a], None)


def test_the_archive_is_an_imagefolder_per_model(studio):
    subject = studio.personalize([reference_image(0)], "toy")
    results = studio.generate(subject, PROMPTS, Sampling(n=2, seed=7, steps=2), base_too=True)
    with zipfile.ZipFile(io.BytesIO(archive(results))) as z:
        names = set(z.namelist())
        for folder in ("images", "base"):
            rows = [json.loads(line) for line in z.read(f"{folder}/metadata.jsonl").decode().splitlines()]
            assert [(r["prompt"], r["seed"]) for r in rows] == [(p, s) for p in PROMPTS for s in (7, 8)]
            assert {f"{folder}/{r['file_name']}" for r in rows} <= names
        first = next(r for r in results if r.prompt == PROMPTS[0])
        assert np.array_equal(pixels(Image.open(io.BytesIO(z.read("images/000-a-toy-in-the-snow-1.png")))),
                              pixels(first.images[1]))


@pytest.fixture(scope="module")
def app(studio, dreambooth):
    import anyio

    from dreamcache.app import serve

    # anyio imports its parts on first use, in whichever thread asks (the server's). Under pytest every such import
    # is parsed for assertion rewriting (anyio ships a pytest plugin), and CPython 3.11 raises SystemError ("AST
    # constructor recursion depth mismatch") when two threads build ASTs at once: import them all here, first.
    for name in dir(anyio):
        getattr(anyio, name)
    cfg = AppConfig(profile="tiny", adapters="-", segmenter="key", port=0, steps=2, max_images=6,
                    dreambooth=str(dreambooth))
    demo, url = serve(cfg, studio=studio, block=False)
    yield url
    demo.close()


def test_the_api_personalizes_once_and_generates_beside_the_base_model(app, studio, references):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(app, verbose=False)
    assert {"/personalize", "/generate"} <= set(client.view_api(print_info=False, return_format="dict")
                                                ["named_endpoints"])
    files = [handle_file(str(p)) for p in references]
    before = studio.cached
    cutouts, cache, status = client.predict(files, "toy robot", True, api_name="/personalize")
    assert len(cutouts) == 2 and "Cache made" in status
    made = studio.personalize([Image.open(p) for p in references], "toy robot")
    features = ReferenceCache.load(cache).features
    assert all(np.array_equal(features[k].numpy(), v.numpy()) for k, v in made.cache.features.items())

    args = (files, "toy robot", True, "\n".join(PROMPTS), 2, 5, "joint", 7.5, 3.0, 2, True, False)
    jobs = [client.submit(*args, api_name="/generate") for _ in range(2)]  # queued: one at a time
    outputs = [job.result() for job in jobs]
    assert studio.cached == before + 1  # every request reused the cache the first made
    images, base, maps, _, _, zipped, status = outputs[0]
    assert len(images) == len(base) == 4 and "made once and reused" in status
    expected = studio.generate(made, PROMPTS, Sampling(n=2, seed=5, steps=2))
    for got, want in zip(images, [im for r in expected for im in r.images]):
        assert np.array_equal(pixels(got["image"]), pixels(want))
    assert [pixels(i["image"]).tolist() for i in outputs[1][0]] == [pixels(i["image"]).tolist() for i in images]
    with zipfile.ZipFile(zipped) as z:
        assert sum(n.endswith(".png") for n in z.namelist()) == 8

    with pytest.raises(AppError, match="more than the 6"):
        client.predict(files, "toy", True, "\n".join(PROMPTS * 2), 2, 0, "joint", 7.5, 3.0, 2, False, False,
                       api_name="/generate")
    with pytest.raises(AppError, match="write a prompt"):
        client.predict(files, "toy", True, " \n", 1, 0, "joint", 7.5, 3.0, 2, False, False, api_name="/generate")
    with pytest.raises(AppError, match="combined needs"):
        client.predict(files, "toy", True, "x", 1, 0, "combined", 1.0, 3.0, 2, False, False, api_name="/generate")
    with pytest.raises(AppError, match="add one or more photos"):
        client.predict([], "toy", True, "x", 1, 0, "joint", 7.5, 3.0, 2, False, False, api_name="/generate")


def chromium() -> str | None:
    """Debian's chromium (apt-get install chromium): the binary itself, not the /usr/bin wrapper script."""
    return next((p for p in ("/usr/lib/chromium/chromium", shutil.which("chromium"), shutil.which("chromium-browser"))
                 if p and Path(p).is_file()), None)


@pytest.mark.skipif(chromium() is None, reason="no chromium to drive (apt-get install chromium)")
def test_in_a_browser_a_picked_subject_and_an_upload_generate_images(app, references, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(0)  # no wall-clock limit: the suite's hang guard is the only one
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(app)
        # A DreamBooth subject fills in its photo, class noun and first prompts.
        page.get_by_label("DreamBooth subject").click()
        page.get_by_role("option", name="cat", exact=True).click()
        expect(page.locator("#subject textarea, #subject input")).to_have_value("cat", timeout=0)
        expect(page.locator("#prompts textarea")).to_have_value("a cat in the jungle\na cat wearing a red hat\n"
                                                                "a red cat", timeout=0)
        # Two photos uploaded beside the picked one; then generate.
        page.locator("#references input[type=file]").set_input_files([str(p) for p in references])
        page.locator("#subject textarea, #subject input").fill("toy")
        page.locator("#prompts textarea").fill("a toy in the snow")
        page.locator("#generate").click()
        expect(page.locator("#status")).to_contain_text("made once and reused", timeout=0)
        for gallery in ("#images", "#base", "#cutouts"):
            shown = page.locator(f"{gallery} img")
            expect(shown.first).to_be_visible(timeout=0)
            assert shown.first.evaluate("img => img.complete && img.naturalWidth > 0")
        assert page.locator("#cutouts img").count() == 3  # the picked photo and the two uploaded, cached together
        shot = page.screenshot(full_page=True)
        text = page.locator("body").inner_text()
        browser.close()
    assert not errors, errors
    assert "Error" not in text
    image = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).astype(float)
    assert image.shape[0] >= 600 and image.shape[1] == 1400
    assert image.std() > 20  # a page with content, not a blank or single-colour error screen


def test_the_app_command_checks_its_flags_before_loading_anything(capsys):
    assert cli(["app", "--adapters", "x", "--port", "70000"]) == 2
    assert "--port must be <= 65535" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["app", "--adapters", "x", "--segmenter", "nope"])
    assert cli(["app", "--adapters", "/nowhere/adapters.safetensors"]) == 2
    assert "/nowhere/adapters.safetensors" in capsys.readouterr().err
    for mode in ("reduce-overhead", "max-autotune"):  # CUDA graphs are per thread; the app's requests are not
        assert cli(["app", "--adapters", "x", "--compile", "--compile-mode", mode]) == 2
        assert "records per thread" in capsys.readouterr().err


def test_one_request_at_a_time_per_studio(studio):
    """Two threads generating with one studio: each gets what it would get alone (the lock; a U-Net serves one
    cached call at a time)."""
    subject = studio.personalize([reference_image(0)], "toy")
    alone = [studio.generate(subject, [p], Sampling(steps=2))[0].images[0] for p in PROMPTS]
    got = {}
    threads = [threading.Thread(target=lambda p=p: got.__setitem__(p, studio.generate(subject, [p],
                                                                                     Sampling(steps=2))))
               for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p, want in zip(PROMPTS, alone):
        assert np.array_equal(pixels(got[p][0].images[0]), pixels(want))
