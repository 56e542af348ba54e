"""U-Net cases: adapter overhead per pass, personalised generation against a reference-every-step baseline,
the training step, the adapters' FLOPs on every base, and SDXL's denoising. U-Net work only (the text encoders
and the VAE cost the same with or without personalisation); full-size architectures with random weights
(speed does not depend on the weights)."""

from __future__ import annotations

import resource
import statistics

import torch

from benchmarks.common import DEVICE, PEAK_BF16, clock
from dreamcache.conditioning import Condition, placeholder


class UNetBench:
    """One U-Net with adapters, shared by the U-Net cases: a base's full-size architecture with random weights
    and its spec's adapter layers, or ``unet`` (adapters installed) where the caller has one."""

    def __init__(self, latent: int, unet=None, dtype: torch.dtype | None = None, base: str = "sd15"):
        from dreamcache.adapter import install_adapters
        from dreamcache.bases import SPECS

        if unet is None:
            torch.manual_seed(0)
            self.dtype = dtype or (torch.bfloat16 if DEVICE == "cuda" else torch.float32)
            unet = SPECS[base].build_unet(random_init=True, device=DEVICE).to(self.dtype).eval()
            install_adapters(unet, SPECS[base].layers)
        self.unet, self.layers = unet, unet.dreamcache_layers
        self.device, self.dtype = unet.device, unet.dtype
        g = torch.Generator(self.device).manual_seed(0)
        shape = (1, unet.config.in_channels, latent, latent)
        self.latent = latent
        self.z = torch.randn(shape, device=self.device, dtype=self.dtype, generator=g)
        self.ref = torch.randn(shape, device=self.device, dtype=self.dtype, generator=g)
        self.null = placeholder(unet.config, 1, device=self.device, dtype=self.dtype)  # zeros: SDXL's unconditional
        self.text = Condition(torch.randn(self.null.embeds.shape, device=self.device, dtype=self.dtype, generator=g),
                              {k: torch.randn(v.shape, device=self.device, dtype=self.dtype, generator=g)
                               for k, v in self.null.added.items()})
        self.text_row = torch.tensor([1], device=self.device)  # the guided step's image row, built once

    def features(self, t: int) -> dict:
        from dreamcache.adapter import capture_features

        return capture_features(self.unet, self.layers, self.ref, torch.tensor([t], device=self.device), self.null)

    def guided_step(self, features: dict, t: int, every_row: bool = False) -> torch.Tensor:
        """One joint-guidance denoising step: rows (no text, no image) and (text, image) in one call.
        ``every_row``: both rows go through the adapters (what the step cost before rows without the image
        skipped them; the masking that kept the first row's values is not timed)."""
        from dreamcache.adapter import CACHE_KEY, CacheInputs

        x = torch.cat([self.z, self.z])
        cache = CacheInputs(features, None if every_row else self.text_row)  # one reference, shared by the rows
        e = self.unet(x, torch.tensor([t], device=self.device), **Condition.cat([self.null, self.text]).kwargs(),
                      cross_attention_kwargs={CACHE_KEY: cache})
        return e.sample

    def plain_step(self, t: int) -> torch.Tensor:
        x = torch.cat([self.z, self.z])
        rows = Condition.cat([self.null, self.text]).kwargs()
        return self.unet(x, torch.tensor([t], device=self.device), **rows).sample


def case_adapter_overhead(b: UNetBench, repeats: int) -> dict:
    """A U-Net pass with the cache against the base pass (batch 1, every row conditioned)."""
    from dreamcache.adapter import cache_kwargs

    feats = b.features(1)
    t = torch.tensor([500], device=b.device)
    base, adapted = [], []
    with torch.inference_mode():
        text, reference = b.text.kwargs(), cache_kwargs(feats)
        b.unet(b.z, t, **text)  # warm-up, both paths
        b.unet(b.z, t, **text, cross_attention_kwargs=reference)
        for _ in range(repeats):  # alternate, so drift in the machine's speed hits both alike
            base.append(clock(lambda: b.unet(b.z, t, **text)))
            adapted.append(clock(lambda: b.unet(b.z, t, **text, cross_attention_kwargs=reference)))
    # The minimum is the run least disturbed by the rest of the machine (timeit's advice); medians are kept too.
    bs, as_ = min(base), min(adapted)
    return {"latent": b.latent, "repeats": repeats, "base_pass_s": round(bs, 4), "cached_pass_s": round(as_, 4),
            "ratio": round(as_ / bs, 3), "median_ratio": round(statistics.median(adapted) / statistics.median(base), 3)}


def case_generation(b: UNetBench, steps: int, repeats: int, project_to: int = 50) -> dict:
    """Whole personalised generation, U-Net work only, joint guidance, same steps:
    DreamCache = one caching pass + steps x (2-row guided pass);
    reference every step (BootPIG/JeDi style, same U-Net and adapters) = steps x (reference pass at the
    current t, empty prompt, + the same 2-row guided pass reading those features)."""
    timesteps = torch.linspace(999, 1, steps).long().tolist()

    def dreamcache():
        feats = b.features(1)
        for t in timesteps:
            b.guided_step(feats, t)

    def every_step():
        for t in timesteps:
            b.guided_step(b.features(t), t)

    def base():
        for t in timesteps:
            b.plain_step(t)

    def dreamcache_every_row():  # before the optimisation: the unconditional row also ran the adapter
        feats = b.features(1)
        for t in timesteps:
            b.guided_step(feats, t, every_row=True)

    with torch.inference_mode():
        b.guided_step(b.features(1), 500)  # warm-up
        b.plain_step(500)
        runs = {"dreamcache": [], "reference_every_step": [], "base": [], "dreamcache_before": []}
        for _ in range(repeats):
            for name, fn in (("dreamcache", dreamcache), ("reference_every_step", every_step), ("base", base),
                             ("dreamcache_before", dreamcache_every_row)):
                runs[name].append(clock(fn))
        cache_s = min(clock(lambda: b.features(1)) for _ in range(repeats))
    med = {k: min(v) for k, v in runs.items()}  # least disturbed run of each, as in case 1
    # Per step, from the measured runs; projected to the paper's 50 steps (the caching pass is paid once).
    dc_step = (med["dreamcache"] - cache_s) / steps
    ev_step = med["reference_every_step"] / steps
    return {"latent": b.latent, "steps": steps, "repeats": repeats,
            "dreamcache_s": round(med["dreamcache"], 3), "reference_every_step_s": round(med["reference_every_step"], 3),
            "base_generation_s": round(med["base"], 3), "caching_pass_s": round(cache_s, 4),
            "dreamcache_before_s": round(med["dreamcache_before"], 3),
            "ratio_before": round(med["dreamcache_before"] / med["reference_every_step"], 3),
            "ratio": round(med["dreamcache"] / med["reference_every_step"], 3),
            "ratio_vs_base": round(med["dreamcache"] / med["base"], 3),
            f"projected_{project_to}_steps_ratio": round((cache_s + project_to * dc_step) / (project_to * ev_step), 3),
            f"caching_vs_{project_to}_step_generation": round(cache_s / (cache_s + project_to * dc_step), 4)}


def case_train_step(b: UNetBench, steps: int, batch: int = 1) -> dict:
    """One training step (caching pass, forward with the cache, backward into the adapters, AdamW)."""
    from dreamcache.adapter import cache_kwargs, capture_features, trainable_parameters

    unet = b.unet
    params = trainable_parameters(unet)
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-5)
    B = batch
    rep = lambda v: v.expand(B, *v.shape[1:]).contiguous()  # noqa: E731
    z, ref = rep(b.z), rep(b.ref)
    text, null = (c.expand(B) for c in (b.text, b.null))
    one = torch.ones(B, dtype=torch.long, device=DEVICE)
    t = torch.full((B,), 500, device=DEVICE)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        feats = capture_features(unet, b.layers, ref, one, null)
        unet.train()
        with torch.autocast(DEVICE, torch.bfloat16, enabled=DEVICE == "cuda"):
            pred = unet(z, t, **text.kwargs(), cross_attention_kwargs=cache_kwargs(feats)).sample
            loss = torch.nn.functional.mse_loss(pred.float(), z.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        unet.eval()

    times = [clock(step) for _ in range(steps + 1)][1:]
    peak = (torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    unet.requires_grad_(False)
    s = statistics.median(times)
    out = {"latent": b.latent, "batch": B, "step_s": round(s, 3), "steps_timed": len(times),
           "peak_memory_gib": round(peak, 2), "samples_per_s": round(B / s, 3)}
    if DEVICE == "cuda":  # the paper's 25k steps x 128 samples at this rate, on one GPU
        out["projected_gpu_hours_25k_x_128"] = round(25_000 * 128 / (B / s) / 3600, 1)
    return out


def sdxl_unet(device: str):
    from dreamcache.bases import SDXL

    return SDXL.build_unet(random_init=True, device=device)  # SDXL base: 2,567,463,684 parameters


def sdxl_inputs(rows: int, latent: int, device: str, dtype=torch.float32):
    r = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    added = {"text_embeds": r(rows, 1280), "time_ids": r(rows, 6)}
    return r(rows, 4, latent, latent), torch.full((rows,), 500, device=device), r(rows, 77, 2048), added


def case_sdxl(batch: int = 4, timed_steps: int = 25, steps: int = 25) -> dict:
    """The SDXL U-Net's denoising at 1024 px, 25 steps, guidance 3.5 (two rows per image), random weights, bf16:
    images/s and model FLOP utilisation from a FLOP count of the same call. Text encoders and the VAE decode
    are not included. The FLOP count runs on the meta device, so it is reported without a GPU too."""
    from torch.utils.flop_counter import FlopCounterMode

    latent, rows = 128, 2 * batch
    with torch.device("meta"):
        unet = sdxl_unet("meta")
        x, t, text, added = sdxl_inputs(rows, latent, "meta")
        with FlopCounterMode(display=False) as counter:
            unet(x, t, encoder_hidden_states=text, added_cond_kwargs=added)
    flops_per_step = counter.get_total_flops()
    out = {"resolution": 1024, "steps": steps, "guidance_scale": 3.5, "images_per_call": batch,
           "tflop_per_image": round(flops_per_step * steps / batch / 1e12, 1)}
    if DEVICE != "cuda":
        return {**out, "skipped": "timing needs a GPU"}
    unet = sdxl_unet(DEVICE).to(torch.bfloat16).eval()
    x, t, text, added = sdxl_inputs(rows, latent, DEVICE, torch.bfloat16)
    with torch.inference_mode():
        for _ in range(2):
            unet(x, t, encoder_hidden_states=text, added_cond_kwargs=added)  # warm-up
        timed = clock(lambda: [unet(x, t, encoder_hidden_states=text, added_cond_kwargs=added)
                               for _ in range(timed_steps)])
    seconds = timed / timed_steps * steps  # one call of `steps` steps
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    achieved = flops_per_step * steps / seconds
    return {**out, "timed_steps": timed_steps, "seconds_per_call": round(seconds, 2), "images_per_s": round(batch / seconds, 3),
            "achieved_tflops": round(achieved / 1e12, 1), "mfu": round(achieved / peak, 3) if peak else None}


def case_adapter_flops(bases: tuple[str, ...] = ("sd15", "sd21", "sdxl")) -> dict:
    """Per base, at its native resolution: the FLOPs of a U-Net pass with the cache against the base pass (one
    row, conditioned), counted on the meta device (no memory, no time, any machine), with the adapters'
    parameters and one reference's cache. Per denoising step with joint guidance only one of the two rows runs
    the adapters, so the step's overhead is half the pass's."""
    from torch.utils.flop_counter import FlopCounterMode

    from dreamcache.adapter import cache_kwargs, capture_features, install_adapters, trainable_parameters
    from dreamcache.bases import SPECS

    def flops(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    out = {}
    for name in bases:
        spec = SPECS[name]
        unet = spec.build_unet(random_init=True, device="meta")
        side = unet.config.sample_size
        z, t = torch.empty(1, unet.config.in_channels, side, side, device="meta"), torch.tensor([500], device="meta")
        text = placeholder(unet.config, 1, device="meta").kwargs()
        base = flops(lambda: unet(z, t, **text))
        install_adapters(unet, spec.layers)
        features = capture_features(unet, spec.layers, z, torch.tensor([1], device="meta"),
                                    placeholder(unet.config, 1, device="meta"))

        adapted = flops(lambda: unet(z, t, **text, cross_attention_kwargs=cache_kwargs(features)))
        out[name] = {"resolution": spec.resolution, "layers": len(spec.layers),
                     "adapter_parameters": sum(p.numel() for p in trainable_parameters(unet)),
                     "cache_values": sum(v.numel() for v in features.values()),
                     "base_pass_gflop": round(base / 1e9, 1), "cached_pass_gflop": round(adapted / 1e9, 1),
                     "ratio": round(adapted / base, 4),
                     "joint_guidance_step_ratio": round((base + adapted) / (2 * base), 4)}
    return {"bases": out}


def case_references(b: UNetBench, steps: int, repeats: int, ks: tuple[int, ...] = (1, 2, 4)) -> dict:
    """Several references in one cache (their tokens concatenated at each layer), for K in ``ks``: the cache's
    size, a U-Net pass with it against the base pass (one conditioned row), and a whole generation (K caching
    passes, then ``steps`` joint-guidance steps) against the base model's generation; timed at the bench's
    latent, and the pass's FLOPs counted at SD 1.5's 512 px on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from dreamcache.adapter import cache_kwargs, capture_features, install_adapters
    from dreamcache.bases import SD15

    g = torch.Generator(b.device).manual_seed(1)
    refs = [torch.randn(b.ref.shape, device=b.device, dtype=b.dtype, generator=g) for _ in range(max(ks))]
    one = torch.tensor([1], device=b.device)
    timesteps = torch.linspace(999, 1, steps).long().tolist()
    t = torch.tensor([500], device=b.device)
    text = b.text.kwargs()

    def features(k: int) -> dict:
        per_ref = [capture_features(b.unet, b.layers, r, one, b.null) for r in refs[:k]]
        return {layer: torch.cat([f[layer] for f in per_ref], dim=1) for layer in per_ref[0]}

    def generation(k: int):
        feats = features(k)
        for step in timesteps:
            b.guided_step(feats, step)

    def base():
        for step in timesteps:
            b.plain_step(step)

    meta = SD15.build_unet(random_init=True, device="meta")
    side = meta.config.sample_size
    z = torch.empty(1, 4, side, side, device="meta")
    meta_text = placeholder(meta.config, 1, device="meta").kwargs()
    with FlopCounterMode(display=False) as counter:
        meta(z, torch.tensor([500], device="meta"), **meta_text)
    base_flops = counter.get_total_flops()
    install_adapters(meta, SD15.layers)
    native = capture_features(meta, SD15.layers, z, torch.tensor([1], device="meta"),
                              placeholder(meta.config, 1, device="meta"))
    out = {"latent": b.latent, "steps": steps, "repeats": repeats, "runs": []}
    with torch.inference_mode():
        b.plain_step(500)  # warm-up
        base_s = min(clock(base) for _ in range(repeats))
        base_pass = min(clock(lambda: b.unet(b.z, t, **text)) for _ in range(max(3, repeats)))
        for k in ks:
            reference = cache_kwargs(features(k))
            b.unet(b.z, t, **text, cross_attention_kwargs=reference)  # warm-up
            cached_pass = min(clock(lambda: b.unet(b.z, t, **text, cross_attention_kwargs=reference))
                              for _ in range(max(3, repeats)))
            gen_s = min(clock(lambda: generation(k)) for _ in range(repeats))
            big = {layer: f.repeat(1, k, 1) for layer, f in native.items()}  # K references' tokens
            with FlopCounterMode(display=False) as counter:
                meta(z, torch.tensor([500], device="meta"), **meta_text, cross_attention_kwargs=cache_kwargs(big))
            values = sum(f.numel() for f in big.values())
            out["runs"].append({"references": k, "cache_values_512px": values,
                                "cache_mb_fp16_512px": round(2 * values / 1e6, 1),
                                "pass_ratio": round(cached_pass / base_pass, 3),
                                "flop_ratio_512px": round(counter.get_total_flops() / base_flops, 4),
                                "generation_s": round(gen_s, 3), "generation_vs_base": round(gen_s / base_s, 3)})
    out["base_generation_s"], out["base_pass_s"] = round(base_s, 3), round(base_pass, 4)
    return out
