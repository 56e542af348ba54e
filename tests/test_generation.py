"""Personalised generation on the tiny SD 1.5: the base pipeline untouched, the guidance formulas, the cache file."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreamcache.cli import main as cli
from dreamcache.generation import (DreamCachePipeline, ReferenceCache, combined_guidance, joint_guidance,
                                   load_pipeline)
from dreamcache.adapter import FUSIONS, adapter_modules, cache_kwargs, install_adapters, save_adapters

# The weight that makes each fusion's untrained adapter the identity ([I, 0] or zero).
IDENTITY_WEIGHT = {"concat": "proj", "spatial_sum": "to_out", "textual_sum": "to_v", "decoupled": "to_out"}


def write_adapters(path: Path, perturb: float, seed: int = 1, fusion: str = "concat", **metadata: str) -> Path:
    """An adapter file for tiny:sd15: the untrained identity (perturb=0) or with the weight that makes it the
    identity moved off its initialisation."""
    from dreamcache.bases import build_unet

    unet = build_unet("tiny:sd15", random_init=False)
    torch.manual_seed(seed)  # the adapters' q, k, v, out initialisation: the same file in every run
    install_adapters(unet, fusion=fusion)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for proc in adapter_modules(unet).values():
            weight = getattr(proc, IDENTITY_WEIGHT[fusion]).weight
            weight.add_(torch.randn(weight.shape, generator=g) * perturb)
    save_adapters(unet, str(path), {"base": "tiny:sd15", "step": "0", **metadata})
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Path:
    return write_adapters(tmp_path_factory.mktemp("adapters") / "adapters.safetensors", perturb=0.3)


@pytest.fixture(scope="module")
def pipe(adapters) -> DreamCachePipeline:
    return load_pipeline("tiny:sd15", adapters, device="cpu")


def reference_image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.full((48, 48, 3), 255, np.uint8)
    arr[12:36, 12:36] = rng.integers(0, 255, (24, 24, 3))
    return Image.fromarray(arr)


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_without_a_cache_it_is_the_stock_pipeline_bit_for_bit(adapters, fusion, tmp_path):
    from diffusers import StableDiffusionPipeline

    from dreamcache.models import resolve

    from diffusers import DDIMScheduler

    stock = StableDiffusionPipeline.from_pretrained(resolve("tiny:sd15"), safety_checker=None,
                                                    requires_safety_checker=False)
    stock.scheduler = DDIMScheduler.from_config(stock.scheduler.config)  # load_pipeline's: the paper's sampler
    stock.set_progress_bar_config(disable=True)
    if fusion != "concat":
        adapters = write_adapters(tmp_path / f"{fusion}.safetensors", 0.3, fusion=fusion)
    pipe = load_pipeline("tiny:sd15", adapters, device="cpu")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.adapters_metadata["fusion"] == pipe.unet.dreamcache_fusion == fusion  # installed as trained
    kw = dict(num_inference_steps=6, guidance_scale=7.5, output_type="np")
    want = stock("a dog in the snow", generator=torch.Generator().manual_seed(3), **kw).images
    got = pipe("a dog in the snow", generator=torch.Generator().manual_seed(3), **kw).images
    assert adapter_modules(pipe.unet)  # the adapters are installed, and inactive
    assert np.array_equal(got, want)


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_identity_adapters_with_a_cache_reproduce_the_base_sampler(tmp_path, fusion):
    """Untrained adapters are the identity, so joint guidance with a cache must retrace the call without one,
    for every fusion; and the same adapters moved off the identity do change the image."""
    identity = load_pipeline("tiny:sd15", write_adapters(tmp_path / "id.safetensors", 0.0, fusion=fusion), device="cpu")
    cache = identity.cache_reference(reference_image())
    kw = dict(num_inference_steps=6, guidance_scale=7.5, output_type="np")
    base = identity("a red cup", generator=torch.Generator().manual_seed(5), **kw).images
    with_cache = identity("a red cup", cache=cache, generator=torch.Generator().manual_seed(5), **kw).images
    np.testing.assert_allclose(with_cache, base, atol=1e-4)
    trained = load_pipeline("tiny:sd15", write_adapters(tmp_path / "t.safetensors", 0.3, fusion=fusion), device="cpu")
    changed = trained("a red cup", cache=trained.cache_reference(reference_image()),
                      generator=torch.Generator().manual_seed(5), **kw).images
    assert np.abs(changed - base).max() > 1e-3


def guided_prediction(pipe, cache, monkeypatch, **kw) -> torch.Tensor:
    """The noise prediction the stock loop hands the scheduler at its first step."""
    seen = []
    step = pipe.scheduler.step

    def record(model_output, *args, **kwargs):
        seen.append(model_output.clone())
        return step(model_output, *args, **kwargs)

    monkeypatch.setattr(pipe.scheduler, "step", record)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    pipe("a dog on the beach", cache=cache, latents=z.clone(), num_inference_steps=1, output_type="latent", **kw)
    monkeypatch.undo()
    return seen[0]


def predictions(pipe, cache) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """e(z,0,0), e(z,I,0), e(z,I,T) at the first step of a one-step call, each from a U-Net call of its own."""
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    pipe.scheduler.set_timesteps(1)
    t = pipe.scheduler.timesteps[0]
    x = pipe.scheduler.scale_model_input(z, t)
    text, null = pipe.encode_prompt(["a dog on the beach"], "cpu", 1, True)

    def e(embeds, image: bool):
        with torch.no_grad():
            return pipe.unet(x, t, encoder_hidden_states=embeds,
                             cross_attention_kwargs=cache_kwargs(cache.features, [image])).sample

    return e(null, False), e(null, True), e(text, True)


def test_joint_and_combined_guidance_match_their_formulas(pipe, monkeypatch):
    """Through the stock loop's classifier-free guidance: joint is its formula at any scale; combined, from three
    rows handed to it as two, is the three-term formula to float rounding, at several scales (the coefficient
    (1 - s_I) / (s_T - 1) grows as s_T nears 1)."""
    cache = pipe.cache_reference(reference_image())
    e00, eI0, eIT = predictions(pipe, cache)
    assert (eI0 - e00).abs().max() > 1e-3  # the reference changes the prediction: the rows can be told apart
    assert (eIT - eI0).abs().max() > 1e-3
    for s in (7.5, 2.0):
        got = guided_prediction(pipe, cache, monkeypatch, guidance="joint", guidance_scale=s)
        torch.testing.assert_close(got, e00 + s * (eIT - e00), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got, joint_guidance(e00, eIT, s), atol=1e-5, rtol=1e-4)
    for s_i, s_t in ((2.0, 5.0), (0.4, 7.5), (3.0, 1.5)):
        got = guided_prediction(pipe, cache, monkeypatch, guidance="combined", guidance_scale=s_t,
                                image_guidance_scale=s_i)
        want = e00 + s_i * (eI0 - e00) + s_t * (eIT - eI0)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(combined_guidance(e00, eI0, eIT, s_i, s_t), want)
    with pytest.raises(ValueError, match="combined guidance needs a text scale"):
        pipe("a toy", cache=cache, guidance="combined", guidance_scale=1.0, num_inference_steps=1)


def test_the_reference_changes_the_image(pipe):
    kw = dict(num_inference_steps=4, output_type="np")
    a = pipe("a toy", cache=pipe.cache_reference(reference_image(0)), generator=torch.Generator().manual_seed(1), **kw)
    b = pipe("a toy", cache=pipe.cache_reference(reference_image(1)), generator=torch.Generator().manual_seed(1), **kw)
    assert np.abs(a.images - b.images).max() > 1e-3


def test_cache_file_roundtrip_and_checks(pipe, tmp_path):
    cache = pipe.cache_reference(reference_image())
    cache.save(tmp_path / "c.safetensors")
    loaded = ReferenceCache.load(tmp_path / "c.safetensors")
    assert set(loaded.features) == set(pipe.unet.dreamcache_layers)
    for k, v in cache.features.items():
        assert torch.equal(loaded.features[k], v.cpu())  # fp16 in memory and on disk: the same images either way
    assert json.loads(loaded.metadata["layers"]) == list(pipe.unet.dreamcache_layers)
    assert loaded.metadata["adapters_sha256"] == pipe.adapters_metadata["adapters_sha256"]

    other = load_pipeline("tiny:sd15", write_adapters(tmp_path / "other.safetensors", 0.3, seed=2), device="cpu")
    with pytest.raises(ValueError, match="other adapters"):
        other("a toy", cache=loaded, num_inference_steps=1)
    with pytest.raises(FileNotFoundError, match="dreamcache personalize"):
        ReferenceCache.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="guidance must be"):
        pipe("a toy", cache=loaded, guidance="both", num_inference_steps=1)


def test_cli_personalize_and_generate(adapters, tmp_path, capsys):
    ref = tmp_path / "ref.png"
    reference_image().save(ref)
    assert cli(["personalize", "--profile", "tiny", "--adapters", str(adapters), "--reference", str(ref),
                "--subject", "toy", "--out", str(tmp_path / "toy.cache")]) == 0
    assert (tmp_path / "toy.reference.png").exists()
    assert cli(["generate", "--cache", str(tmp_path / "toy.cache"), "--prompt", "a toy in the snow", "--n", "2",
                "--steps", "3", "--out", str(tmp_path / "toy.png")]) == 0
    images = [Image.open(tmp_path / f"toy-{i}.png") for i in range(2)]
    assert all(im.size == (32, 32) for im in images)
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))  # seeds 0 and 1

    # Wrong input: a clear error and exit 2, nothing written.
    assert cli(["personalize", "--adapters", str(adapters), "--reference", str(ref), "--out", str(tmp_path / "x")]) == 2
    assert "--subject is required" in capsys.readouterr().err
    assert cli(["personalize", "--adapters", str(tmp_path / "none.safetensors"), "--reference", str(ref),
                "--no-segment", "--out", str(tmp_path / "x")]) == 2
    assert "no adapter file" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_adapters_of_the_earlier_format_are_refused_with_what_to_do(adapters, tmp_path):
    from safetensors.torch import load_file, save_file

    from dreamcache.generation import adapter_metadata

    old = tmp_path / "old.safetensors"  # format 1: no query LayerNorm
    tensors = {k: v for k, v in load_file(str(adapters)).items() if ".norm." not in k}
    save_file(tensors, str(old), metadata={**adapter_metadata(adapters), "format": "dreamcache-adapters/1"})
    with pytest.raises(ValueError, match="earlier format.*train them again"):
        load_pipeline("tiny:sd15", old, device="cpu")


def test_adapters_trained_at_another_resolution_are_refused(adapters, tmp_path):
    from safetensors.torch import load_file, save_file

    from dreamcache.generation import adapter_metadata

    other = tmp_path / "at-64.safetensors"
    save_file(load_file(str(adapters)), str(other), metadata={**adapter_metadata(adapters), "resolution": "64"})
    with pytest.raises(ValueError, match="trained at 64 px.*works at 32 px.*--allow-other-base"):
        load_pipeline("tiny:sd15", other, device="cpu")
    assert load_pipeline("tiny:sd15", other, device="cpu", allow_other_base=True).adapters_metadata["resolution"] == "64"


def test_the_cache_is_made_at_the_timestep_the_adapters_were_trained_with(adapters, tmp_path):
    """The Table S3 ablation: adapters trained with --cache-timestep N say so in their metadata, and
    personalisation caches the reference at N; without it, at the paper's t=1."""
    from safetensors.torch import load_file, save_file

    from dreamcache.generation import adapter_metadata
    from dreamcache.adapter import reference_features

    at_500 = tmp_path / "t500.safetensors"
    save_file(load_file(str(adapters)), str(at_500), metadata={**adapter_metadata(adapters), "cache_timestep": "500"})
    default, other = load_pipeline("tiny:sd15", adapters, device="cpu"), load_pipeline("tiny:sd15", at_500, device="cpu")
    a, b = default.cache_reference(reference_image(), seed=3), other.cache_reference(reference_image(), seed=3)
    assert a.metadata["cache_timestep"] == "1" and b.metadata["cache_timestep"] == "500"
    assert any(not torch.equal(a.features[k], b.features[k]) for k in a.features)
    # exactly the shared definition at t=500: the same latent, noise and empty prompt
    from dreamcache.images import to_tensor

    x = to_tensor(reference_image(), other.resolution)[None]
    latents = other.vae.encode(x).latent_dist.mean * other.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
    want = reference_features(other.unet, other.unet.dreamcache_layers, other.scheduler, latents, noise,
                              other.encode_prompt([""], "cpu", 1, False)[0], timestep=500)
    for k, v in want.items():
        assert torch.equal(v.to(b.features[k].dtype), b.features[k]), k


def test_the_cache_is_made_with_the_prompt_the_adapters_were_trained_with(tmp_path, capsys):
    """The Table 6 ablation: adapters trained with --cache-prompt carry the template; personalisation fills
    it with the reference's subject (or caption) and caches with that text; without it, the empty prompt."""
    from dreamcache.adapter import reference_features
    from dreamcache.images import to_tensor

    path = write_adapters(tmp_path / "prompted.safetensors", 0.3, cache_prompt="a photo of {subject}")
    pipe = load_pipeline("tiny:sd15", path, device="cpu")
    with pytest.raises(ValueError, match="give the reference's subject"):
        pipe.cache_reference(reference_image())
    cache = pipe.cache_reference(reference_image(), seed=3, subject="a toy")
    assert cache.metadata["cache_prompt"] == "a photo of a toy"
    x = to_tensor(reference_image(), pipe.resolution)[None]
    latents = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
    layers = pipe.unet.dreamcache_layers
    for prompt, expect_equal in (("a photo of a toy", True), ("", False)):
        want = reference_features(pipe.unet, layers, pipe.scheduler, latents, noise,
                                  pipe.encode_prompt([prompt], "cpu", 1, False)[0])
        assert all(torch.equal(v.to(cache.features[k].dtype), cache.features[k]) for k, v in want.items()) == expect_equal

    ref = tmp_path / "ref.png"
    reference_image().save(ref)
    assert cli(["personalize", "--profile", "tiny", "--adapters", str(path), "--reference", str(ref),
                "--no-segment", "--subject", "apple", "--out", str(tmp_path / "apple.cache")]) == 0
    assert ReferenceCache.load(tmp_path / "apple.cache").metadata["cache_prompt"] == "a photo of an apple"
    assert cli(["personalize", "--profile", "tiny", "--adapters", str(path), "--reference", str(ref),
                "--no-segment", "--out", str(tmp_path / "none.cache")]) == 2
    assert "give the reference's subject" in capsys.readouterr().err


def test_several_references_make_one_cache_of_their_tokens_and_one_is_as_before(pipe, tmp_path):
    """cache_reference([a, b, c]) holds the three references' tokens one after the other at each layer: the
    same, bit for bit, as caching each alone and merging; a list of one is the single-image cache; the merged
    cache generates, and differently from one reference."""
    a, b, c = (reference_image(i) for i in range(3))
    one = pipe.cache_reference(a)
    assert all(torch.equal(one.features[k], v) for k, v in pipe.cache_reference([a]).features.items())
    three = pipe.cache_reference([a, b, c], names=["a.jpg", "b.jpg", "c.jpg"])
    merged = ReferenceCache.concat([pipe.cache_reference(x) for x in (a, b, c)])
    for layer, f in one.features.items():
        assert three.features[layer].shape == (1, 3 * f.shape[1], f.shape[2])
        assert torch.equal(three.features[layer], merged.features[layer])
    from dreamcache.generation import image_sha256

    assert three.references == [{"name": n, "sha256": image_sha256(x)} for n, x in zip(("a.jpg", "b.jpg", "c.jpg"),
                                                                                      (a, b, c))]
    three.save(tmp_path / "three.cache")
    loaded = ReferenceCache.load(tmp_path / "three.cache")
    assert len(loaded.references) == 3
    kw = dict(num_inference_steps=3, output_type="np")
    x = pipe("a toy", cache=loaded, generator=torch.Generator().manual_seed(1), **kw).images
    y = pipe("a toy", cache=one, generator=torch.Generator().manual_seed(1), **kw).images
    assert np.abs(x - y).max() > 1e-4

    other = load_pipeline("tiny:sd15", write_adapters(tmp_path / "other.safetensors", 0.3, seed=2), device="cpu")
    with pytest.raises(ValueError, match="different adapters_sha256"):
        ReferenceCache.concat([one, other.cache_reference(b)])


def test_cli_personalize_with_three_references(adapters, tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"ref{i}.png")
        reference_image(i).save(paths[-1])
    args = [a for p in paths for a in ("--reference", str(p))]
    assert cli(["personalize", "--profile", "tiny", "--adapters", str(adapters), *args, "--subject", "toy",
                "--out", str(tmp_path / "toy.cache")]) == 0
    cache = ReferenceCache.load(tmp_path / "toy.cache")
    from dreamcache.generation import file_sha256

    assert [(r["name"], r["file_sha256"]) for r in cache.references] == [(str(p), file_sha256(p)) for p in paths]
    assert [p.name for p in sorted(tmp_path.glob("toy.reference*.png"))] == [
        "toy.reference-1.png", "toy.reference-2.png", "toy.reference.png"]
    assert cli(["generate", "--cache", str(tmp_path / "toy.cache"), "--prompt", "a toy", "--steps", "2",
                "--out", str(tmp_path / "toy.png")]) == 0
    assert (tmp_path / "toy.png").exists()


def test_the_caching_pass_noises_as_the_trainer_does_whatever_the_sampler(adapters, tmp_path):
    """Table S3's t=500: the reference is noised by DDPM's forward process on the checkpoint's betas, as the
    trainer's DDPMScheduler noises it, with the paper's DDIM, with Euler (whose own add_noise is x0 + sigma n),
    with a trailing-spaced Euler after set_timesteps ran (whose add_noise would index past its steps) and with a
    sampler on other betas."""
    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler
    from safetensors.torch import load_file, save_file

    from dreamcache.adapter import forward_process, reference_features
    from dreamcache.generation import adapter_metadata
    from dreamcache.images import to_tensor
    from dreamcache.models import resolve

    at_500 = tmp_path / "t500.safetensors"
    save_file(load_file(str(adapters)), str(at_500), metadata={**adapter_metadata(adapters), "cache_timestep": "500"})
    pipe = load_pipeline("tiny:sd15", at_500, device="cpu")
    trainer = DDPMScheduler.from_pretrained(resolve("tiny:sd15"), subfolder="scheduler")  # training.models.load_models'
    x0 = pipe.encode_image(to_tensor(reference_image(), pipe.resolution)[None])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    want = reference_features(pipe.unet, pipe.unet.dreamcache_layers, trainer, x0, noise, pipe.null_condition(), 500)
    # A sampler on other betas (zero terminal SNR, as some use for sampling) changes nothing: the checkpoint's
    # schedule, fixed when the pipeline loaded, is the one the adapters were trained on.
    samplers = {"ddim": pipe.scheduler, "ddim zero snr": DDIMScheduler.from_config(pipe.scheduler.config,
                                                                                  rescale_betas_zero_snr=True)}
    for spacing in ("leading", "trailing"):
        samplers[f"euler {spacing}"] = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing=spacing)
        samplers[f"euler {spacing}"].set_timesteps(10)
    for name, sampler in samplers.items():
        pipe.scheduler = sampler
        got = pipe.cache_reference(reference_image(), seed=3)
        assert all(torch.equal(got.features[k], v.to(got.features[k].dtype)) for k, v in want.items()), name
    # A pipeline loaded with another sampler from the start still reads the checkpoint's own betas.
    passed = type(pipe).from_pretrained(resolve("tiny:sd15"), scheduler=samplers["ddim zero snr"],
                                        **type(pipe).EXTRA_COMPONENTS)
    passed.load_adapters(at_500)
    got = passed.cache_reference(reference_image(), seed=3)
    assert all(torch.equal(got.features[k], v.to(got.features[k].dtype)) for k, v in want.items())
    t = torch.tensor([500])
    abar = trainer.alphas_cumprod[500]
    noisy = forward_process(samplers["euler trailing"]).add_noise(x0, noise, t)
    torch.testing.assert_close(noisy, abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
    euler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # before set_timesteps: its own noising works
    assert (euler.add_noise(x0, noise, t) - noisy).abs().max() > 0.1  # and is another thing


def test_adapters_remember_their_base_and_another_is_refused(adapters, tmp_path, capsys):
    """tiny:sd15's adapters record its identity; on tiny:sd21 (the same widths and text width, another U-Net
    architecture, as SD 1.5 and SD 2.1-base share widths) and on tiny:sdxl they are refused with one error
    naming both bases, unless allowed; a file without the identity loads as before."""
    from safetensors.torch import load_file, save_file

    from dreamcache.generation import adapter_metadata

    meta = adapter_metadata(adapters)
    assert (meta["base_family"], meta["base_text_width"], meta["base_checkpoint"]) == ("sd", "32", "tiny:sd15")
    with pytest.raises(ValueError) as refused:
        load_pipeline("tiny:sd21", adapters, device="cpu")
    message = str(refused.value)
    assert "trained on tiny:sd15" in message and "base is tiny:sd21" in message
    assert "another U-Net architecture." in message and "--allow-other-base" in message
    with pytest.raises(ValueError, match="another family, text width, U-Net architecture"):
        load_pipeline("tiny:sdxl", adapters, device="cpu")
    other = load_pipeline("tiny:sd21", adapters, device="cpu", allow_other_base=True)
    assert other("a toy", cache=other.cache_reference(reference_image()), num_inference_steps=1,
                 output_type="np").images.shape == (1, 32, 32, 3)
    older = tmp_path / "older.safetensors"  # written before adapters recorded their base
    save_file(load_file(str(adapters)), str(older),
              metadata={k: v for k, v in meta.items() if not k.startswith("base_")})
    assert load_pipeline("tiny:sd21", older, device="cpu").adapters_metadata["base"] == "tiny:sd15"

    ref = tmp_path / "ref.png"
    reference_image().save(ref)
    args = ["personalize", "--profile", "tiny", "--adapters", str(adapters), "--reference", str(ref), "--no-segment",
            "--base", "tiny:sd21", "--out", str(tmp_path / "toy.cache")]
    assert cli(args) == 2
    assert "trained on tiny:sd15" in capsys.readouterr().err and not (tmp_path / "toy.cache").exists()
    assert cli([*args, "--allow-other-base"]) == 0
    assert cli(["generate", "--cache", str(tmp_path / "toy.cache"), "--prompt", "a toy", "--steps", "1",
                "--base", "tiny:sd21", "--allow-other-base", "--out", str(tmp_path / "toy.png")]) == 0


def test_cli_generate_many_prompts_from_one_load(adapters, tmp_path, capsys):
    """--prompts FILE: every prompt from one load of the models and the cache, into a folder; a prompt's images
    are the ones --prompt alone gives with the same seed."""
    ref = tmp_path / "ref.png"
    reference_image().save(ref)
    cache = str(tmp_path / "toy.cache")
    assert cli(["personalize", "--profile", "tiny", "--adapters", str(adapters), "--reference", str(ref),
                "--subject", "toy", "--out", cache]) == 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# the subject in three contexts\na toy in the snow\n\na toy on a beach\n  a toy, at night  \n")
    common = ["--cache", cache, "--steps", "2", "--n", "2", "--seed", "5"]
    assert cli(["generate", *common, "--prompts", str(prompts), "--out", str(tmp_path / "many")]) == 0
    log = capsys.readouterr().out
    assert "[3/3] 'a toy, at night'" in log and "images/min" in log
    names = sorted(p.name for p in (tmp_path / "many").iterdir() if p.suffix == ".png")
    assert names == [f"{i:03d}-{slug}-{k}.png" for i, slug in enumerate(["a-toy-in-the-snow", "a-toy-on-a-beach",
                                                                           "a-toy-at-night"]) for k in range(2)]
    assert cli(["generate", *common, "--prompt", "a toy on a beach", "--out", str(tmp_path / "one.png")]) == 0
    for k in range(2):
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"one-{k}.png")),
                              np.asarray(Image.open(tmp_path / "many" / f"001-a-toy-on-a-beach-{k}.png")))
    index = [json.loads(line) for line in (tmp_path / "many" / "metadata.jsonl").read_text().splitlines()]
    assert [(r["file_name"], r["prompt"], r["seed"]) for r in index][2:4] == [
        ("001-a-toy-on-a-beach-0.png", "a toy on a beach", 5), ("001-a-toy-on-a-beach-1.png", "a toy on a beach", 6)]
    a, b = (np.asarray(Image.open(tmp_path / "many" / f"00{i}-{s}-0.png")).astype(int)
            for i, s in ((0, "a-toy-in-the-snow"), (1, "a-toy-on-a-beach")))
    assert np.abs(a - b).max() > 0  # the prompts do reach the images

    # Wrong input: a clear error and exit 2, nothing written.
    capsys.readouterr()
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    assert cli(["generate", "--cache", cache, "--prompts", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "x")]) == 2
    assert "holds no prompt" in capsys.readouterr().err
    assert cli(["generate", "--cache", cache, "--prompts", str(tmp_path / "none.txt"), "--out", str(tmp_path / "x")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli(["generate", "--cache", cache, "--prompts", str(prompts), "--prompt", "a toy",
                "--out", str(tmp_path / "x")]) == 2
    assert "one of the two" in capsys.readouterr().err
    assert cli(["generate", "--cache", cache, "--prompts", str(prompts), "--out", str(ref)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert cli(["generate", "--cache", cache, "--prompts", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "give a text file" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("fusion", ["concat", "textual_sum"])
def test_attention_is_recorded_for_conditioned_rows_only_and_sums_to_one(tmp_path, fusion):
    """The adapters hand their attention over the reference tokens to ``CacheInputs.attention`` for the rows that
    use the reference, and only those; recording computes the same output as fused attention."""
    from dreamcache.adapter import CacheInputs, CACHE_KEY, reference_features

    pipe = load_pipeline("tiny:sd15", write_adapters(tmp_path / "a.safetensors", perturb=0.3, fusion=fusion),
                         device="cpu")
    unet = pipe.unet
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(1, 4, 16, 16, generator=g)
    features = reference_features(unet, unet.dreamcache_layers, pipe.scheduler, ref, torch.randn(1, 4, 16, 16,
                                  generator=g), pipe.null_condition())
    x, t, text = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500]), pipe.encode(["a", "b"])
    seen = []
    plain = cache_kwargs(features, [False, True])
    recorded = {CACHE_KEY: CacheInputs(plain[CACHE_KEY].features, plain[CACHE_KEY].rows,
                                       attention=lambda layer, rows, probs: seen.append((layer, rows, probs)))}
    with torch.no_grad():
        a = unet(x, t, **text.kwargs(), cross_attention_kwargs=plain).sample
        b = unet(x, t, **text.kwargs(), cross_attention_kwargs=recorded).sample
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    blocks = sum(len(unet.get_submodule(layer).transformer_blocks) for layer in unet.dreamcache_layers)
    assert len(seen) == blocks and {layer for layer, _, _ in seen} == set(unet.dreamcache_layers)
    for layer, rows, probs in seen:
        assert rows.tolist() == [1]  # row 0 has no reference: no attention of it
        assert probs.shape[0] == 1 and probs.shape[2] == features[layer].shape[1]
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:2]))
    seen.clear()
    with torch.no_grad():
        unet(x, t, **text.kwargs(), cross_attention_kwargs={CACHE_KEY: CacheInputs(
            features, torch.tensor([], dtype=torch.long), attention=lambda *a: seen.append(a))})
    assert seen == []  # no row uses the reference: no map


def test_attention_maps_over_steps_and_a_region(pipe, tmp_path):
    from dreamcache.attention import AttentionMaps

    cache = pipe.cache_reference(reference_image(), seed=0)
    every = AttentionMaps()
    images = pipe(["a toy", "a toy at night"], cache=cache, num_inference_steps=3, attention=every,
                  generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    late = AttentionMaps(steps=range(2, 3), region=(0.0, 0.0, 0.5, 0.5))
    pipe(["a toy", "a toy at night"], cache=cache, num_inference_steps=3, attention=late,
         generator=[torch.Generator().manual_seed(i) for i in range(2)])
    maps, later = every.layers(), late.layers()
    assert set(maps) == set(pipe.unet.dreamcache_layers)
    for layer, m in maps.items():
        assert m.shape[:2] == (2, 1) and m.shape[2] == m.shape[3]  # 2 images, 1 reference, a square grid
        torch.testing.assert_close(m.sum((1, 2, 3)), torch.ones(2))
        blocks = len(pipe.unet.get_submodule(layer).transformer_blocks)
        assert every.counts[layer] == {0: 3 * blocks, 1: 3 * blocks} and late.counts[layer] == {0: blocks, 1: blocks}
        torch.testing.assert_close(later[layer].sum((1, 2, 3)), torch.ones(2))
        assert not torch.allclose(later[layer], m)  # another step range and region: another map
    paths = every.save(tmp_path / "maps", images, [reference_image()], stem="toy")
    assert len(paths) == 2 * len(maps) and all(Image.open(p).size == (2 * 32, 32) for p in paths)


def test_cli_generate_writes_attention_maps(adapters, tmp_path, capsys):
    ref = tmp_path / "ref.png"
    reference_image().save(ref)
    cache = str(tmp_path / "toy.cache")
    assert cli(["personalize", "--profile", "tiny", "--adapters", str(adapters), "--reference", str(ref),
                "--subject", "toy", "--out", cache]) == 0
    assert cli(["generate", "--cache", cache, "--prompt", "a toy in the snow", "--steps", "3", "--n", "2",
                "--out", str(tmp_path / "toy.png"), "--attention-maps", str(tmp_path / "maps"),
                "--attention-steps", "1:3", "--attention-region", "0.25,0.25,0.75,0.75"]) == 0
    layers = 5  # tiny:sd15's adapter layers
    assert len(list((tmp_path / "maps").glob("toy-*-*.png"))) == 2 * layers
    assert f"attention maps: {2 * layers} in" in capsys.readouterr().out
    for flag, value, message in (("--attention-steps", "3:1", "0 <= START < END"),
                                 ("--attention-region", "0.5,0.5,0.2,0.9", "x0 < x1"),
                                 ("--attention-region", "half", "x0,y0,x1,y1")):
        assert cli(["generate", "--cache", cache, "--prompt", "a toy", "--out", str(tmp_path / "x.png"),
                    "--attention-maps", str(tmp_path / "m2"), flag, value]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "m2").exists()


@pytest.mark.parametrize("guidance, scale", [("combined", 5.0), ("joint", 1.0)], ids=["combined", "unguided"])
def test_attention_maps_under_every_row_layout_and_several_references(pipe, guidance, scale):
    """Combined guidance (3 rows per image, two with the reference: the (text, image) row is the image's) and no
    guidance (1 row per image), with a cache of two references: one map per image over both references' tokens."""
    from dreamcache.attention import AttentionMaps

    cache = pipe.cache_reference([reference_image(0), reference_image(1)], seed=0)
    maps = AttentionMaps()
    pipe(["a toy", "a toy at night"], cache=cache, num_inference_steps=2, attention=maps, guidance=guidance,
         guidance_scale=scale, generator=[torch.Generator().manual_seed(i) for i in range(2)])
    for layer, m in maps.layers().items():
        assert m.shape[:2] == (2, 2)  # 2 images, 2 references side by side
        torch.testing.assert_close(m.sum((1, 2, 3)), torch.ones(2))
        blocks = len(pipe.unet.get_submodule(layer).transformer_blocks)
        assert maps.counts[layer] == {0: 2 * blocks, 1: 2 * blocks}  # one conditioned row per image and step
        assert m[:, 0].sum() > 0.05 and m[:, 1].sum() > 0.05  # both references are attended to


def test_compiled_sampling_compiles_once_per_layout_and_matches_eager(adapters, tmp_path):
    """``pipe.compile()``: one graph per guidance and row count, which later steps, prompts, seeds, step counts
    and caches reuse; the images those of the eager U-Net (aot_eager: the same kernels, so to float rounding);
    the caching pass, attention maps and adapters loaded later still work. Varied: joint, combined and no cache;
    other prompts, seeds, step counts and references; 1 and 2 images per prompt; a second adapter file."""
    from dreamcache.attention import AttentionMaps
    from dreamcache.generation import _own_output
    from training.models import compiled_graphs

    eager = load_pipeline("tiny:sd15", adapters, device="cpu")
    compiled = load_pipeline("tiny:sd15", adapters, device="cpu")
    compiled.compile("reduce-overhead", backend="aot_eager")  # aot_eager ignores the mode; the output is copied
    assert compiled.unet is not compiled.eager_unet and compiled.unet.dreamcache_layers == eager.unet.dreamcache_layers
    assert _own_output in compiled.unet._forward_hooks.values()
    calls = [  # (what, call arguments, graphs it may add)
        ("joint", dict(prompt="a toy", steps=3, seed=0, reference=0), 1),
        ("joint, another prompt, seed, step count and reference", dict(prompt="a toy at night", steps=5, seed=3,
                                                                       reference=1), 0),
        ("combined", dict(prompt="a toy", steps=3, seed=0, reference=0, guidance="combined"), 1),
        ("combined again", dict(prompt="a toy on a beach", steps=2, seed=1, reference=1, guidance="combined"), 0),
        ("no cache: the base model", dict(prompt="a toy", steps=3, seed=0, reference=None), 1),
        ("the base model again", dict(prompt="a red toy", steps=4, seed=2, reference=None), 0),
        ("two images per prompt", dict(prompt="a toy", steps=2, seed=0, reference=0, n=2), 1),
        ("the first layout again", dict(prompt="a toy in the rain", steps=2, seed=4, reference=1), 0),
        ("a cache of two references", dict(prompt="a toy", steps=2, seed=0, reference=(0, 1)), 1),
        ("two other references", dict(prompt="a toy", steps=3, seed=5, reference=(2, 3)), 0),
        ("no guidance (scale 1): one row per image", dict(prompt="a toy", steps=2, seed=0, reference=0, scale=1.0), 1),
    ]

    def run(pipe, prompt, steps, seed, reference, guidance="joint", n=1, attention=None, scale=7.5):
        images = [reference_image(r) for r in ((reference,) if isinstance(reference, int) else reference or ())]
        cache = pipe.cache_reference(images) if images else None
        return np.asarray(pipe(prompt, cache=cache, guidance=guidance, num_inference_steps=steps, attention=attention,
                               num_images_per_prompt=n, guidance_scale=scale, output_type="np",
                               generator=torch.Generator().manual_seed(seed)).images)

    for what, kwargs, new in calls:
        before = compiled_graphs()
        got = run(compiled, **kwargs)
        assert compiled_graphs() - before == new, what
        np.testing.assert_allclose(got, run(eager, **kwargs), atol=1e-5, err_msg=what)

    before = compiled_graphs()  # the caching pass runs on the U-Net itself: no graph, the same cache
    for key, value in compiled.cache_reference(reference_image(2)).features.items():
        assert torch.equal(value, eager.cache_reference(reference_image(2)).features[key])
    maps, eager_maps = AttentionMaps(), AttentionMaps()  # recorded by Python code: the call runs eagerly
    run(compiled, "a toy", 2, 0, 0, attention=maps), run(eager, "a toy", 2, 0, 0, attention=eager_maps)
    assert compiled_graphs() == before and isinstance(compiled.unet, torch._dynamo.eval_frame.OptimizedModule)
    for layer, m in maps.layers().items():
        torch.testing.assert_close(m, eager_maps.layers()[layer])

    # One cached call per U-Net, compiled or not: a second one during a call is refused before it changes anything.
    cache, refused = compiled.cache_reference(reference_image(0)), []

    def meanwhile(pipe, step, timestep, kwargs):
        for attention in (None, AttentionMaps()):
            with pytest.raises(RuntimeError, match="in a call with a cache already"):
                pipe("a toy", cache=cache, num_inference_steps=1, attention=attention)
            refused.append(pipe.unet)
        return kwargs

    got = np.asarray(compiled("a toy", cache=cache, num_inference_steps=2, output_type="np", callback_on_step_end=meanwhile,
                              generator=torch.Generator().manual_seed(0)).images)
    assert len(refused) == 4 and all(u is compiled.unet for u in refused)
    np.testing.assert_allclose(got, run(eager, "a toy", 2, 0, 0), atol=1e-5)

    other = write_adapters(tmp_path / "other.safetensors", 0.3, seed=2)  # loaded into the compiled pipeline
    compiled.load_adapters(other)
    eager.load_adapters(other)
    before = compiled_graphs()
    got = run(compiled, "a toy", 2, 0, 0)
    assert compiled_graphs() == before  # the same layers and fusion: their weights are the graphs' inputs
    np.testing.assert_allclose(got, run(eager, "a toy", 2, 0, 0), atol=1e-5)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor(10)  # called directly: diffusers' output class, copied too
    text = compiled.encode(["a toy"]).kwargs()
    torch.testing.assert_close(compiled.unet(x, t, **text).sample, eager.unet(x, t, **text).sample)
    assert np.abs(got - run(load_pipeline("tiny:sd15", adapters, device="cpu"), "a toy", 2, 0, 0)).max() > 1e-3


def test_cli_generate_compiled(adapters, tmp_path, capsys):
    """--compile (with --set compile_backend=...): the same images as without; a mode torch.compile does not know
    is refused before anything loads."""
    ref = tmp_path / "ref.png"
    reference_image().save(ref)
    cache = str(tmp_path / "toy.cache")
    assert cli(["personalize", "--adapters", str(adapters), "--reference", str(ref), "--no-segment",
                "--out", cache]) == 0
    common = ["generate", "--cache", cache, "--prompt", "a toy", "--steps", "2", "--n", "2"]
    assert cli([*common, "--out", str(tmp_path / "eager.png")]) == 0
    assert cli([*common, "--compile", "--set", "compile_backend=aot_eager", "--out", str(tmp_path / "c.png")]) == 0
    for k in range(2):
        np.testing.assert_allclose(np.asarray(Image.open(tmp_path / f"c-{k}.png"), dtype=float),
                                   np.asarray(Image.open(tmp_path / f"eager-{k}.png"), dtype=float), atol=1)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        cli([*common, "--compile", "--compile-mode", "fastest", "--out", str(tmp_path / "x.png")])
    assert exit.value.code == 2
    assert "reduce-overhead" in capsys.readouterr().err and not list(tmp_path.glob("x*"))
