"""Base-model specs, and DreamCache on SDXL (tiny:sdxl): the stock pipeline bit for bit without a cache, the
sampler retraced with identity adapters, both text encoders and the size ids in every row, trained and used
from the command line; the full-size SDXL adapter and cache counts on the meta device."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dreamcache.adapter import adapter_modules, install_adapters, save_adapters
from dreamcache.bases import SD_LAYERS, SDXL_LAYERS, SPECS, base_spec, default_layers
from dreamcache.generation import DreamCachePipeline, DreamCacheXLPipeline, ReferenceCache, load_pipeline


def transformer_layers(unet) -> list[str]:
    """Every transformer layer (Transformer2DModel) in the U-Net's running order: encoder, mid block, decoder."""
    names = [f"down_blocks.{i}.attentions.{j}" for i, b in enumerate(unet.down_blocks)
             for j in range(len(getattr(b, "attentions", [])))]
    names += [f"mid_block.attentions.{j}" for j in range(len(unet.mid_block.attentions))]
    return names + [f"up_blocks.{i}.attentions.{j}" for i, b in enumerate(unet.up_blocks)
                    for j in range(len(getattr(b, "attentions", [])))]


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl"])
def test_each_base_adapts_the_mid_block_and_every_second_decoder_transformer(name):
    """The official code's rule, counted over the real architecture: the mid block and the decoder transformers
    whose running index over the whole U-Net is even."""
    spec = SPECS[name]
    unet = spec.build_unet(random_init=True, device="meta")
    layers = transformer_layers(unet)
    mid = layers.index("mid_block.attentions.0")
    want = ("mid_block.attentions.0", *(layer for i, layer in enumerate(layers) if i > mid and i % 2 == 0))
    assert spec.layers == want == default_layers(dict(unet.config))  # the rule, as bases.py applies it to folders
    assert spec.resolution == unet.config.sample_size * 8  # the SD and SDXL VAEs reduce by 8
    assert (unet.config.addition_embed_type or None) == spec.added_conditioning


def test_a_base_is_a_name_a_tiny_model_or_a_checkpoint_folder_of_a_known_family(tmp_path):
    from dreamcache.models import resolve

    assert base_spec("sdxl").text_encoders == ("text_encoder", "text_encoder_2") and base_spec("sdxl").layers == SDXL_LAYERS
    assert base_spec("tiny:sd21").layers == SD_LAYERS
    folder = base_spec(resolve("tiny:sdxl"))  # a diffusers folder: the family comes from its model_index.json
    assert folder.family == "sdxl" and folder.layers == SDXL_LAYERS and folder.checkpoint == resolve("tiny:sdxl")
    with pytest.raises(ValueError, match="cannot read its model_index.json"):
        base_spec(str(tmp_path))
    world = tmp_path / "world"  # a folder of another layout: the rule counted over its own U-Net
    from world.base import build

    build().save_pretrained(world)
    unet = base_spec(str(world)).build_unet(random_init=False)
    layers = transformer_layers(unet)
    mid = layers.index("mid_block.attentions.0")
    assert base_spec(str(world)).layers == ("mid_block.attentions.0", *(layer for i, layer in enumerate(layers)
                                                                        if i > mid and i % 2 == 0))
    assert base_spec(str(world)).layers == ("mid_block.attentions.0", "up_blocks.1.attentions.1",
                                            "up_blocks.2.attentions.1")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="not a Stable Diffusion 1.x/2.x or SDXL checkpoint"):
        base_spec(str(tmp_path))


@pytest.mark.parametrize("name", ["tiny:sd15", "tiny:sd21", "tiny:sdxl"])
def test_the_tiny_specs_say_what_their_checkpoints_are(name):
    spec = base_spec(name)
    pipe = load_pipeline(name, device="cpu")
    assert isinstance(pipe, {"sd": DreamCachePipeline, "sdxl": DreamCacheXLPipeline}[spec.family])
    assert pipe.resolution == spec.resolution
    assert pipe.scheduler.config.prediction_type == spec.prediction_type
    assert all(getattr(pipe, name) is not None for name in spec.text_encoders)
    assert all(pipe.unet.get_submodule(layer) is not None for layer in spec.layers)
    if spec.name != "tiny:sd21":  # its scale is measured from its VAE when it is built
        assert pipe.vae.config.scaling_factor == spec.vae_scale


def write_xl_adapters(path, perturb: float, seed: int = 1):
    unet = base_spec("tiny:sdxl").build_unet(random_init=False)
    torch.manual_seed(seed)
    install_adapters(unet, SDXL_LAYERS)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for proc in adapter_modules(unet).values():
            proc.proj.weight.add_(torch.randn(proc.proj.weight.shape, generator=g) * perturb)
    save_adapters(unet, str(path), {"base": "tiny:sdxl", "step": "0", "resolution": "64"})
    return path


def reference_image(seed: int = 0) -> Image.Image:
    arr = np.full((48, 48, 3), 255, np.uint8)
    arr[12:36, 12:36] = np.random.default_rng(seed).integers(0, 255, (24, 24, 3))
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    path = write_xl_adapters(tmp_path_factory.mktemp("xl") / "adapters.safetensors", 0.3)
    return load_pipeline("tiny:sdxl", path, device="cpu"), path


def test_sdxl_without_a_cache_is_the_stock_pipeline_bit_for_bit(xl):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    pipe, _ = xl
    stock = StableDiffusionXLPipeline.from_pretrained(base_spec("tiny:sdxl").path())
    stock.scheduler = DDIMScheduler.from_config(stock.scheduler.config)
    stock.set_progress_bar_config(disable=True)
    assert isinstance(pipe, DreamCacheXLPipeline) and len(adapter_modules(pipe.unet)) == 2 + 2 + 1 + 1  # blocks
    kw = dict(num_inference_steps=4, guidance_scale=5.0, output_type="np")
    want = stock("a dog in the snow", generator=torch.Generator().manual_seed(3), **kw).images
    got = pipe("a dog in the snow", generator=torch.Generator().manual_seed(3), **kw).images
    assert np.array_equal(got, want)


def test_sdxl_identity_adapters_with_a_cache_retrace_the_sampler_and_trained_ones_change_it(xl, tmp_path):
    identity = load_pipeline("tiny:sdxl", write_xl_adapters(tmp_path / "id.safetensors", 0.0), device="cpu")
    cache = identity.cache_reference(reference_image())
    assert {k: tuple(v.shape) for k, v in cache.features.items()} == {  # 64 px: 8x8 and 16x16 latents' layers
        "mid_block.attentions.0": (1, 64, 64), "up_blocks.0.attentions.1": (1, 64, 64),
        "up_blocks.1.attentions.0": (1, 256, 32), "up_blocks.1.attentions.2": (1, 256, 32)}
    kw = dict(num_inference_steps=4, guidance_scale=7.5, output_type="np")
    base = identity("a red cup", generator=torch.Generator().manual_seed(5), **kw).images
    with_cache = identity("a red cup", cache=cache, generator=torch.Generator().manual_seed(5), **kw).images
    np.testing.assert_allclose(with_cache, base, atol=1e-4)
    pipe, _ = xl
    changed = pipe("a red cup", cache=pipe.cache_reference(reference_image()),
                   generator=torch.Generator().manual_seed(5), **kw).images
    assert np.abs(changed - base).max() > 1e-3


def test_sdxl_rows_carry_both_text_encoders_the_pooled_text_and_the_size_ids(xl, monkeypatch):
    """What the U-Net sees with a cache is what the stock pipeline gives it: 64 = 32 + 32 features from the two
    encoders, the pooled embedding of the second, ids (64, 64, 0, 0, 64, 64), zeros for the unconditional rows."""
    pipe, _ = xl
    text, null, pooled, null_pooled = pipe.encode_prompt("a toy", device="cpu", num_images_per_prompt=1,
                                                         do_classifier_free_guidance=True)
    calls = []
    forward = pipe.unet.forward

    def record(sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None, **kw):
        calls.append((encoder_hidden_states, added_cond_kwargs))
        return forward(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                       added_cond_kwargs=added_cond_kwargs, **kw)

    cache = pipe.cache_reference(reference_image())
    monkeypatch.setattr(pipe.unet, "forward", record)
    pipe("a toy", cache=cache, guidance="combined", num_inference_steps=1, output_type="latent")
    embeds, added = calls[0]
    assert embeds.shape == (3, 77, 64)
    torch.testing.assert_close(embeds, torch.cat([null, null, text]))  # (0,0), (I,0), (I,T)
    torch.testing.assert_close(added["text_embeds"], torch.cat([null_pooled, null_pooled, pooled]))
    assert not null.any() and not null_pooled.any()  # SDXL's force_zeros_for_empty_prompt
    assert added["time_ids"].tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 3


def test_sdxl_cache_file_roundtrip(xl, tmp_path):
    pipe, path = xl
    cache = pipe.cache_reference(reference_image())
    cache.save(tmp_path / "c.cache")
    loaded = ReferenceCache.load(tmp_path / "c.cache")
    assert json.loads(loaded.metadata["layers"]) == list(SDXL_LAYERS) and loaded.metadata["resolution"] == "64"
    kw = dict(num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    a = pipe("a toy", cache=cache, **kw).images
    b = pipe("a toy", cache=loaded, **{**kw, "generator": torch.Generator().manual_seed(0)}).images
    assert np.array_equal(a, b)


def test_the_sdxl_trainer_step_trains_every_adapter():
    from dreamcache.adapter import trainable_parameters
    from training.config import TINY, TrainConfig
    from training.models import load_models
    from training.step import Step

    cfg = TrainConfig(**{**TINY, "base": "tiny:sdxl", "drop_text": 0.5})
    pipe, scheduler = load_models(cfg, torch.device("cpu"))
    install_adapters(pipe.unet, base_spec(cfg.base).layers)
    params = trainable_parameters(pipe.unet)
    torch.manual_seed(0)
    for p in params:
        p.data.normal_(0, 0.02)
    step = Step(cfg, pipe, scheduler, torch.device("cpu"))
    assert len(step.null) == 1 and set(step.null.added) == {"text_embeds", "time_ids"}
    g = torch.Generator().manual_seed(0)
    batch = {"key": [f"s0-{i:08d}" for i in range(4)], "caption": ["a red cup on a table"] * 4,
             "subject": ["a red cup"] * 4, "target": torch.rand(4, 3, 64, 64, generator=g) * 2 - 1,
             "reference": torch.rand(4, 3, 64, 64, generator=g) * 2 - 1}
    loss = step.loss(pipe.unet, batch, step=1, backward_scale=1.0)
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_the_full_size_sdxl_dry_run_counts_adapters_and_cache_at_1024_px(capsys):
    from training.train import main

    assert main(["--base", "sdxl", "--random-init", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "frozen U-Net parameters: 2,567,463,684" in out  # SDXL base 1.0's U-Net
    # The mid block and up_blocks.0.attentions.1: 10 blocks of 6 x 1280^2 + 4 x 1280 each; two 2-block layers at 640.
    assert "adapter parameters: 206,551,040" in out
    # 32x32 x 1280 twice, 64x64 x 640 twice
    assert "feature cache per reference at 1024 px: 7,864,320 values (15.7 MB in fp16)" in out


@pytest.mark.slow
def test_sdxl_adapters_train_personalise_and_generate_from_the_command_line(tiny_dataset, tmp_path):
    """The user's path on SDXL: train (here with two augmented views per reference), personalise, generate."""
    from dreamcache.cli import main as cli
    from test_train import train

    out = tmp_path / "run"
    proc = train(tiny_dataset, out, "--base", "tiny:sdxl", "--max-steps", 2, "--checkpoint-every", 2,
                 "--val-samples", 1, "--val-steps", 2, "--references", 2)  # and two views of each reference
    assert "step 2/2 loss" in proc.stdout and "step 2 validation images" in proc.stdout
    adapters = out / "adapters.safetensors"
    from dreamcache.generation import adapter_metadata

    info = adapter_metadata(adapters)
    assert info["base"] == "tiny:sdxl" and json.loads(info["layers"]) == list(SDXL_LAYERS) and info["resolution"] == "64"
    assert info["references"] == "2"
    assert json.loads((out / "config.json").read_text())["layers"] == list(SDXL_LAYERS)  # the spec's, resolved
    ref = tmp_path / "ref.png"
    reference_image().save(ref)
    assert cli(["personalize", "--profile", "tiny", "--adapters", str(adapters), "--reference", str(ref),
                "--no-segment", "--out", str(tmp_path / "toy.cache")]) == 0
    assert cli(["generate", "--cache", str(tmp_path / "toy.cache"), "--prompt", "a toy in the snow", "--steps", "2",
                "--out", str(tmp_path / "toy.png")]) == 0
    assert Image.open(tmp_path / "toy.png").size == (64, 64)


def test_training_and_caching_put_latents_in_the_space_decode_undoes():
    """A VAE with latents_mean/std (as some SDXL checkpoints have): the trainer's latents, the cache's and
    what ``decode`` denormalises are one space; a plain VAE is scaled by its factor alone, as before."""
    from training.config import TINY, TrainConfig
    from training.models import load_models
    from training.step import Step

    cfg = TrainConfig(**{**TINY, "base": "tiny:sdxl"})
    pipe, scheduler = load_models(cfg, torch.device("cpu"))
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = pipe.vae.encode(images).latent_dist.mean
    torch.testing.assert_close(pipe.scale_latents(z), z * pipe.vae.config.scaling_factor)
    mean, std = [0.1, -0.2, 0.3, 0.0], [0.9, 1.1, 1.2, 0.8]
    pipe.vae.register_to_config(latents_mean=mean, latents_std=std)
    install_adapters(pipe.unet, SDXL_LAYERS)
    step = Step(cfg, pipe, scheduler, torch.device("cpu"))
    scaled = step.latents(images, None)
    torch.testing.assert_close(scaled, pipe.encode_image(images))
    m, s = (torch.tensor(v).view(1, 4, 1, 1) for v in (mean, std))
    torch.testing.assert_close(scaled * s / pipe.vae.config.scaling_factor + m, z)  # decode's denormalisation


def test_the_identity_tells_the_released_bases_apart_and_not_a_fine_tune():
    """SD 1.5 and SD 2.1-base have the same block widths (adapter weights of one load onto the other): their
    identities differ in text width and architecture; SDXL in family too; a fine-tune (same architecture, another
    checkpoint) is the same base for the adapters, and the identity is read from the U-Net, not the name."""
    from dreamcache.bases import CONFIGS, BaseIdentity

    configs = {name: json.loads((CONFIGS / spec.unet_config).read_text()) for name, spec in SPECS.items()}
    ids = {name: BaseIdentity.of(config, name) for name, config in configs.items()}
    assert configs["sd15"]["block_out_channels"] == configs["sd21"]["block_out_channels"]
    assert [(i.family, i.text_width) for i in ids.values()] == [("sd", 768), ("sd", 1024), ("sdxl", 2048)]
    assert ids["sd15"].differences(ids["sd21"]) == ["text_width", "unet"]
    assert ids["sd15"].differences(ids["sdxl"]) == ["family", "text_width", "unet"]
    assert ids["sd15"].checkpoint == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    fine_tune = BaseIdentity.of({**configs["sd15"], "_name_or_path": "someone/sd15-finetune", "sample_size": 96},
                                "someone/sd15-finetune")
    assert ids["sd15"].differences(fine_tune) == []  # the resolution is checked on its own
    assert BaseIdentity.from_metadata(ids["sd21"].metadata()) == ids["sd21"]
    assert BaseIdentity.from_metadata({"base": "sd15"}) is None  # a file from before identities


def test_sdxl_adapters_record_the_sdxl_identity(xl):
    pipe, path = xl
    from dreamcache.generation import adapter_metadata

    meta = adapter_metadata(path)
    assert (meta["base_family"], meta["base_text_width"], meta["base_checkpoint"]) == ("sdxl", "64", "tiny:sdxl")
    assert meta["base_unet_sha256"] == pipe.base_identity().unet
