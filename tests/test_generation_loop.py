"""Generation with a cache is the stock pipeline's own call (tiny SD 1.5): its callbacks, guidance rescale,
custom timesteps and sigmas, output types, generator and latents all work with the adapters reading the cache."""

import numpy as np
import pytest
import torch

from dreamcache.generation import load_pipeline
from test_generation import adapters, guided_prediction, pipe, predictions, reference_image  # noqa: F401 (fixtures)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def cache(pipe):  # noqa: F811
    return pipe.cache_reference(reference_image())


def test_callbacks_see_every_step_and_steer_the_loop(pipe, cache):  # noqa: F811
    seen = []

    def callback(p, i, t, tensors):
        seen.append((i, int(t), tuple(tensors["prompt_embeds"].shape)))
        return {"latents": torch.zeros_like(tensors["latents"])} if i == 1 else {}

    kw = dict(cache=cache, num_inference_steps=3, output_type="latent")
    steered = pipe("a toy", generator=seeded(0), callback_on_step_end=callback,
                   callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], **kw).images
    assert [(i, t) for i, t, _ in seen] == list(enumerate(pipe.scheduler.timesteps.tolist()))
    assert seen[0][2] == (2, 77, 32)  # the stock loop's rows: unconditional, text
    free = pipe("a toy", generator=seeded(0), **kw).images
    assert (steered - free).abs().max() > 1e-3  # the latents the callback returned were used

    def fail(p, i, t, tensors):
        raise KeyboardInterrupt

    unet = pipe.unet
    with pytest.raises(KeyboardInterrupt):
        pipe("a toy", callback_on_step_end=fail, **kw)
    assert pipe.unet is unet and not unet._forward_pre_hooks and not unet._forward_hooks  # however the call ended


def test_the_pipeline_keeps_its_own_unet_through_a_cached_call(pipe, cache, monkeypatch):  # noqa: F811
    """Model CPU offload wraps the U-Net's forward with accelerate's hook and re-installs every hook at the end
    of each call from ``pipe.components``: both must see the U-Net itself, in both guidances."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
    from diffusers import UNet2DConditionModel

    class Count(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.calls += 1
            return args, kwargs

    seen = []
    free = pipe.maybe_free_model_hooks
    monkeypatch.setattr(pipe, "maybe_free_model_hooks", lambda: seen.append(pipe.components["unet"]) or free())
    unet = pipe.unet
    add_hook_to_module(unet, Count())
    try:
        for guidance in ("joint", "combined"):
            before = pipe.unet
            during = []
            pipe("a toy", cache=cache, guidance=guidance, num_inference_steps=2, output_type="latent",
                 callback_on_step_end=lambda p, i, t, tensors: during.append(p.unet) or {})
            assert before is unet and all(u is unet for u in during + seen)
    finally:
        remove_hook_from_module(unet)
    assert Count.calls == 4 and isinstance(seen[0], UNet2DConditionModel) and len(seen) == 2
    assert not unet._forward_pre_hooks and not unet._forward_hooks


def test_guidance_rescale_applies_to_the_guided_prediction(pipe, cache, monkeypatch):  # noqa: F811
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    e00, _, eIT = predictions(pipe, cache)
    for rescale in (0.0, 0.7):
        got = guided_prediction(pipe, cache, monkeypatch, guidance_scale=7.5, guidance_rescale=rescale)
        want = rescale_noise_cfg(e00 + 7.5 * (eIT - e00), eIT, guidance_rescale=rescale)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert (want - (e00 + 7.5 * (eIT - e00))).abs().max() > 1e-3  # the rescale did change it


def test_custom_timesteps_and_sigmas_with_a_scheduler_that_takes_them(adapters, cache):  # noqa: F811
    from diffusers import EulerDiscreteScheduler

    pipe = load_pipeline("tiny:sd15", adapters, device="cpu")
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    steps = []
    record = lambda p, i, t, tensors: steps.append(float(t)) or {}  # noqa: E731
    kw = dict(output_type="latent", callback_on_step_end=record)
    with_cache = pipe("a toy", cache=cache, timesteps=[999, 500, 20], generator=seeded(0), **kw).images
    assert steps == [999.0, 500.0, 20.0]
    without = pipe("a toy", timesteps=[999, 500, 20], generator=seeded(0), **kw).images
    assert (with_cache - without).abs().max() > 1e-3  # the adapters read the cache at those timesteps
    steps.clear()
    pipe("a toy", cache=cache, sigmas=[10.0, 3.0, 0.5], generator=seeded(0), **kw)
    assert pipe.scheduler.sigmas.tolist() == pytest.approx([10.0, 3.0, 0.5]) and len(steps) == 2


def test_every_output_type_is_the_same_image(pipe, cache):  # noqa: F811
    kw = dict(cache=cache, num_inference_steps=2)
    latents = pipe("a toy", output_type="latent", generator=seeded(0), **kw).images
    assert latents.shape == (1, 4, 16, 16)
    pt = pipe("a toy", output_type="pt", generator=seeded(0), **kw).images
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    torch.testing.assert_close(pt, (decoded / 2 + 0.5).clamp(0, 1))
    arr = pipe("a toy", output_type="np", generator=seeded(0), **kw).images
    np.testing.assert_allclose(arr, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    image = pipe("a toy", output_type="pil", generator=seeded(0), **kw).images[0]
    assert np.array_equal(np.asarray(image), (arr[0] * 255).round().astype(np.uint8))


def test_the_generator_draws_the_latents_and_given_latents_replace_it(pipe, cache):  # noqa: F811
    kw = dict(cache=cache, num_inference_steps=2, output_type="np")
    a, b = (pipe("a toy", generator=seeded(1), **kw).images for _ in range(2))
    assert np.array_equal(a, b)
    assert np.abs(a - pipe("a toy", generator=seeded(2), **kw).images).max() > 1e-3
    z = torch.randn(1, 4, 16, 16, generator=seeded(7))  # what seed 7 draws: DDIM with eta 0 draws nothing else
    given = pipe("a toy", latents=z, generator=seeded(1), **kw).images
    assert np.array_equal(given, pipe("a toy", latents=z, generator=seeded(2), **kw).images)
    assert np.array_equal(given, pipe("a toy", generator=seeded(7), **kw).images)


def test_combined_guidance_below_a_text_scale_of_one_is_refused_before_anything_loads():
    from dreamcache.cli import parse

    for argv in (["generate", "--cache", "c", "--prompt", "p", "--out", "o.png"],
                 ["evaluate", "--adapters", "a", "--dreambooth", "d"]):
        assert parse([*argv, "--guidance", "combined", "--text-scale", "1.5"])[1].text_scale == 1.5
        with pytest.raises(ValueError, match="--guidance combined needs --text-scale > 1"):
            parse([*argv, "--guidance", "combined", "--text-scale", "1"])


def test_the_pair_handed_to_classifier_free_guidance_rounds_like_the_formula():
    """u + s_T (c - u) from combined_as_cfg against the formula on the same predictions: one ulp of the result
    at the usual scales, more as s_T nears 1 (the coefficient grows as 1 / (s_T - 1))."""
    from dreamcache.sampling import combined_as_cfg, combined_guidance

    g = seeded(0)
    e00 = torch.randn(2, 4, 32, 32, generator=g)
    eI0 = e00 + 0.1 * torch.randn(e00.shape, generator=g)
    eIT = eI0 + 0.1 * torch.randn(e00.shape, generator=g)
    error = {}
    for s_i, s_t in ((3.0, 7.5), (0.4, 7.5), (2.0, 5.0), (3.0, 1.5), (3.0, 1.0001)):
        u, c = combined_as_cfg(e00, eI0, eIT, s_i, s_t)
        assert torch.equal(c, eIT)
        want = combined_guidance(e00, eI0, eIT, s_i, s_t)
        error[s_t] = float((u + s_t * (c - u) - want).abs().max() / want.abs().max())
    assert max(error[7.5], error[5.0], error[1.5]) < 1e-6 < error[1.0001] < 1e-3
    with pytest.raises(ValueError, match="text scale > 1"):
        combined_as_cfg(e00, eI0, eIT, 3.0, 1.0)
