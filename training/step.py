"""The training step's loss: a micro-batch's diffusion loss with the adapters conditioned on its references.

Every random draw of a sample (noise, timestep, conditioning dropout, VAE sample) comes from a generator seeded
by (seed, step, key), so a step computes the same thing in any run, on any number of ranks, after any resume.
"""

from __future__ import annotations

import torch

from dreamcache.adapter import CACHE_PROMPT, cache_kwargs, cache_prompt, host_to_device, reference_features
from dreamcache.conditioning import Condition
from dreamcache.seeds import generator
from training.config import TrainConfig


class Step:
    """The diffusion loss of a micro-batch with the adapters conditioned on the cached reference features."""

    def __init__(self, cfg: TrainConfig, pipe, scheduler, device):
        """``pipe``: the base's DreamCache pipeline over the frozen modules (``load_models``): prompts are encoded
        as generation encodes them, on every base."""
        self.cfg, self.pipe, self.scheduler, self.device = cfg, pipe, scheduler, device
        self.unet, self.vae = pipe.unet, pipe.vae
        self.null = pipe.null_condition()  # one row: text dropout and the paper's empty caching prompt
        # --compile: the VAE's encode compiled at fixed shapes (the pipeline's own, for validation, stays eager)
        self.encode = torch.compile(self.vae.encode, backend=cfg.compile_backend, dynamic=False) if cfg.compile \
            else self.vae.encode

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> Condition:
        """The captions' condition rows (SDXL: both text encoders, pooled text, size ids at the training size)."""
        return self.pipe.encode(list(captions))

    @torch.no_grad()
    def latents(self, images: torch.Tensor, eps: torch.Tensor | None) -> torch.Tensor:
        images = host_to_device(images, self.device, self.vae.dtype)
        if self.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        dist = self.encode(images).latent_dist
        z = dist.mean if eps is None else dist.mean + dist.std * host_to_device(eps, self.device, dist.mean.dtype)
        return self.pipe.scale_latents(z)  # as generation scales them: the same latent space on every base

    @torch.no_grad()
    def target_latents(self, batch: dict, eps: torch.Tensor) -> torch.Tensor:
        """The targets' latents sampled with ``eps``: encoded here, or from the cached distribution."""
        if "target_mean" not in batch:
            return self.latents(batch["target"], eps)
        mean, std = (host_to_device(batch[k], self.device, self.vae.dtype) for k in ("target_mean", "target_std"))
        return self.pipe.scale_latents(mean + std * host_to_device(eps, self.device, mean.dtype))

    def cache_text(self, batch: dict, captions: Condition) -> Condition:
        """The caching pass's condition: one row for the paper's empty prompt, else one per row (the
        --cache-prompt template filled with each sample's subject and caption)."""
        if self.cfg.cache_prompt == CACHE_PROMPT:
            return self.null
        prompts = [cache_prompt(self.cfg.cache_prompt, subject, caption)
                   for subject, caption in zip(batch["subject"], batch["caption"])]
        return captions if prompts == batch["caption"] else self.encode_text(prompts)

    @torch.no_grad()
    def reference_gap(self, model, batch: dict, step: int) -> tuple[float, float]:
        """(loss with each sample's own reference, loss with another sample's): same noise, timesteps and
        captions, no dropout. The adapters use the reference exactly when the first is lower."""
        name = "reference_latent" if "reference_latent" in batch else "reference"
        rolled = {**batch, name: batch[name].roll(1, dims=0)}
        return (self.loss(model, batch, step, dropout=False).item(),
                self.loss(model, rolled, step, dropout=False).item())

    def loss(self, model, batch: dict, step: int, dropout: bool = True,
             backward_scale: float | None = None) -> torch.Tensor:
        """The micro-batch's loss; with ``backward_scale``, also backpropagates ``loss * backward_scale``. The
        reference features go into the U-Net call itself (``cross_attention_kwargs``, through DDP like any
        keyword), so gradient checkpointing recomputes the adapters' blocks from the inputs the forward pass had."""
        cfg, sched = self.cfg, self.scheduler
        B = len(batch["key"])
        gens = [generator(cfg.seed, step, k) for k in batch["key"]]  # every draw of sample k at this step
        if "target_mean" in batch:  # the latent cache: the target's latent distribution, encoded once
            lat_shape = tuple(batch["target_mean"].shape[1:])
        else:
            down = 2 ** (len(self.vae.config.block_out_channels) - 1)  # the VAE's spatial reduction
            lat_shape = (self.vae.config.latent_channels, *(s // down for s in batch["target"].shape[-2:]))
        draw = lambda shape: torch.stack([torch.randn(shape, generator=g) for g in gens])  # noqa: E731
        target = self.target_latents(batch, draw(lat_shape))  # (B, 4, h, w)
        # Drawn on the host from each sample's generator (the same draws on any rank, after any resume), copied
        # without a synchronisation (host_to_device)
        noise, ref_noise = (host_to_device(draw(lat_shape), self.device, target.dtype) for _ in range(2))
        t = host_to_device(torch.cat([torch.randint(0, sched.config.num_train_timesteps, (1,), generator=g)
                                      for g in gens]), self.device)
        u = torch.cat([torch.rand(1, generator=g) for g in gens])
        # (B, 3, R, R), or (B, K, 3, R, R): K augmented views of each reference; or their cached latents, (B, 4, h, w)
        # or (B, K, 4, h, w) (--reference-latents)
        cached = "reference_latent" in batch
        refs = batch["reference_latent" if cached else "reference"]
        views = refs.shape[1] if refs.dim() == 5 else 1
        if views > 1:  # the other views' noise, drawn after everything a single view draws
            more = [host_to_device(draw(lat_shape), self.device, target.dtype) for _ in range(views - 1)]
            # (B*K, 4, h, w): a sample's views together
            ref_noise = torch.stack([ref_noise, *more], dim=1).flatten(0, 1)
            refs = refs.flatten(0, 1)
        if not dropout:
            u = torch.ones_like(u)  # every sample keeps caption and reference (draws consumed all the same)
        drop_text = (u < cfg.drop_text) | (u >= cfg.drop_text + cfg.drop_image) & (u < cfg.drop_text + cfg.drop_image + cfg.drop_both)
        use_image = ~((u >= cfg.drop_text) & (u < cfg.drop_text + cfg.drop_image + cfg.drop_both))
        captions = self.encode_text(batch["caption"])
        text = self.null.where(host_to_device(drop_text, self.device), captions)
        prompt = self.cache_text(batch, captions)
        ref_latents = self.pipe.scale_latents(host_to_device(refs, self.device, self.vae.dtype)) if cached \
            else self.latents(refs, None)
        features = reference_features(self.unet, self.unet.dreamcache_layers, sched, ref_latents,
                                      ref_noise, prompt.repeat_rows(views) if len(prompt) > 1 else prompt,
                                      cfg.cache_timestep)
        if views > 1:  # one row per sample again: its views' tokens one after the other, as several references
            features = {k: f.reshape(B, views * f.shape[1], f.shape[2]) for k, f in features.items()}
        noisy = sched.add_noise(target, noise, t)
        goal = sched.get_velocity(target, noise, t) if sched.config.prediction_type == "v_prediction" else noise
        autocast = cfg.bf16 and self.unet.dtype == torch.bfloat16  # frozen weights in bf16: fp32 adapters autocast
        # Drawn on the host: the rows need no read-back. Compiled, they are a mask: the same shapes every step.
        reference = cache_kwargs(features, active=use_image, static=cfg.compile)
        with torch.autocast(self.device.type, torch.bfloat16, enabled=autocast):
            pred = model(noisy, t, **text.kwargs(), cross_attention_kwargs=reference).sample
        loss = torch.nn.functional.mse_loss(pred.float(), goal.float())
        if backward_scale is not None:
            (loss * backward_scale).backward()
        return loss
