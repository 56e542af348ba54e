"""The small world's base model: a Stable Diffusion 1.x pipeline (CLIP text encoder, U-Net, VAE, DDPM), small
enough to train from scratch on a CPU, and the command that trains it.

    python -m world.base OUT [--steps 3250] [--batch-size 32]    # resumable: run it again to go on

Its parts, in the Hugging Face layout that ``StableDiffusionPipeline.from_pretrained`` reads:

- ``tokenizer``: CLIP's BPE with one token per word of the world (merges that spell each word).
- ``text_encoder``: ``CLIPTextModel``, 64 wide, 2 layers, trained with the U-Net.
- ``unet``: ``UNet2DConditionModel`` on 32x32x4 latents, widths (32, 64, 64, 64), cross-attention at 16x16 and
  8x8 and in the mid block; the adapters go where the rule of SD 1.5 and SDXL puts them (``bases.default_layers``).
- ``vae``: ``AutoencoderKL`` built as an exact pixel codec (the latents are the image's RGB, scaled, and a
  zero fourth channel; the decoder inverts it), so the world is diffused in pixel space; nothing in it is trained.
- ``scheduler``: DDPM with the cosine schedule (improved DDPM's, better than linear betas at 32 px) and
  v-prediction (SD 2.x's objective): at high noise the U-Net predicts the image, so the caption, which decides
  what is drawn there, is learned in hundreds of steps, where epsilon prediction had not begun to after 1,250.

The weights are stored in float16 (the committed fixture, world/base-model, is under 5 MB) and load in float32.

Training: the U-Net and text encoder on rendered scenes of the training subjects (never the held-out ones),
captions that name the identity with probability 0.5 each word and are empty with probability 0.1 (for
classifier-free guidance), AdamW, the min-SNR-5 loss weighting, an exponential moving average of the weights
(what is saved). Checkpoints
go to OUT/train/ every ``--checkpoint-every`` steps; the pipeline folder OUT/ is written from the average.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from world.scene import BACKGROUNDS, COLOURS, PATTERNS, SHAPES, WHERE, draw_scene, render, training_subjects

MAX_TOKENS = 16  # the longest caption is 12 words, with its start and end tokens 14
MIN_SNR_GAMMA = 5.0  # Hang et al. 2023
CODEC_CONSTANT = 1000.0  # the codec's constant channels: they make GroupNorm's scale all but image-independent


def world_words() -> list[str]:
    words = {"a", "on", "background", *SHAPES, *COLOURS, *PATTERNS, *BACKGROUNDS}
    for phrase in WHERE.values():
        words |= set(phrase.split())
    return sorted(words)


def build_tokenizer():
    """CLIP's tokenizer with every world word one token: byte symbols, and the merges BPE learns on the words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(world_words(), trainers.BpeTrainer(vocab_size=4096, end_of_word_suffix="</w>",
                                                               show_progress=False))
    learned = json.loads(bpe.to_str())["model"]
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
    vocab = list(dict.fromkeys(["<|startoftext|>", "<|endoftext|>", *symbols, *(s + "</w>" for s in symbols),
                                *learned["vocab"]]))
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)},
                              merges=[tuple(m) for m in learned["merges"]], model_max_length=MAX_TOKENS)
    for w in world_words():
        if len(tokenizer.tokenize(w)) != 1:
            raise AssertionError(f"{w!r} is not one token: {tokenizer.tokenize(w)}")
    return tokenizer


def pixel_codec(scaling_factor: float):
    """An ``AutoencoderKL`` whose latents are exactly the image's RGB (times nothing: the pipeline scales them)
    with a zero fourth channel, and whose decoder inverts that: one block, no downsampling, every residual
    branch zero (so each block passes its input), the final GroupNorm made all but image-independent by two
    constant channels, and SiLU's odd part (silu(x) - silu(-x) = x) read off channel pairs (x, -x)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=1, sample_size=32, scaling_factor=scaling_factor,
                        mid_block_add_attention=False)
    k = CODEC_CONSTANT
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        for part in (vae.encoder, vae.decoder):
            for m in part.modules():
                if isinstance(m, torch.nn.GroupNorm):
                    m.weight.fill_(1.0)
            part.conv_norm_out.weight.fill_(k / 2)  # the 8 channels' std is k/2 (to 1 part in 10^6): x passes
            for c in range(3):  # channels 2c, 2c+1 hold x_c and -x_c; 6 and 7 hold k and -k
                part.conv_in.weight[2 * c, c, 1, 1] = 1.0
                part.conv_in.weight[2 * c + 1, c, 1, 1] = -1.0
            part.conv_in.bias[6], part.conv_in.bias[7] = k, -k
        vae.encoder.conv_out.weight[:3, :, 1, 1] = 0.0
        for c in range(3):
            vae.encoder.conv_out.weight[c, 2 * c, 1, 1] = 1.0
            vae.encoder.conv_out.weight[c, 2 * c + 1, 1, 1] = -1.0
            vae.decoder.conv_out.weight[c, 2 * c, 1, 1] = 1.0
            vae.decoder.conv_out.weight[c, 2 * c + 1, 1, 1] = -1.0
        vae.encoder.conv_out.bias[4:] = -30.0  # log-variance: a std of e^-15, the posterior is a point
        vae.quant_conv.weight[:, :, 0, 0] = torch.eye(8)
        vae.post_quant_conv.weight[:, :, 0, 0] = torch.eye(4)
    return vae


def build(seed: int = 0):
    """The untrained pipeline (random text encoder and U-Net, the pixel codec, DDPM)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=MAX_TOKENS, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4, cross_attention_dim=64, norm_num_groups=8)
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=False,
                              steps_offset=1)
    pipe = StableDiffusionPipeline(vae=pixel_codec(scaling_factor=1 / PIXEL_STD), text_encoder=text_encoder,
                                   tokenizer=tokenizer, unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    return pipe


PIXEL_STD = 0.69  # std of the world's pixels in [-1, 1] (measured on 4096 training renders): latents at unit scale


def training_caption(scene, rng: random.Random) -> str:
    """A scene's caption as the base learns it: empty 10% of the time; otherwise the colour and the pattern
    are each named with probability 0.5, so class-only captions draw any identity."""
    if rng.random() < 0.1:
        return ""
    s = scene.subject
    words = ([s.colour] if rng.random() < 0.5 else []) + ([s.pattern] if rng.random() < 0.5 else [])
    return " ".join(["a", *words, s.shape]) + scene.caption()[len(f"a {s.shape}"):]


def batch(rng: random.Random, n: int) -> tuple[torch.Tensor, list[str]]:
    """``n`` rendered training scenes in [-1, 1] (n, 3, 32, 32) and their training captions."""
    subjects = training_subjects()
    scenes = [draw_scene(rng, subjects) for _ in range(n)]
    images = np.stack([np.asarray(render(s), dtype=np.float32) for s in scenes]) / 127.5 - 1
    return torch.from_numpy(images).permute(0, 3, 1, 2), [training_caption(s, rng) for s in scenes]


# ----------------------------------------------------------------------------------------------- training

def _state(unet, text_encoder, ema, opt, step: int, rng: random.Random, settings: dict) -> dict:
    return {"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(), "ema": ema, "opt": opt.state_dict(),
            "step": step, "rng": rng.getstate(), "torch_rng": torch.get_rng_state(), "settings": settings}


def train(out: Path, steps: int, batch_size: int = 32, lr: float = 1e-3, checkpoint_every: int = 250,
          ema_decay: float = 0.999, seed: int = 0, log_every: int = 50) -> Path:
    """Trains (or goes on training) the base in ``out``; returns ``out``, a pipeline folder of the average."""
    ckpt = out / "train" / "state.pt"
    settings = {"batch_size": batch_size, "lr": lr, "ema_decay": ema_decay, "seed": seed}
    if not ckpt.exists() and (out / "model_index.json").exists():
        raise FileExistsError(f"{out} holds a base model but not its training state ({ckpt}): training would start "
                              "again from step 0 and replace it. Train into another folder.")
    pipe = build(seed)
    unet, text_encoder, scheduler, tokenizer = pipe.unet, pipe.text_encoder, pipe.scheduler, pipe.tokenizer
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng, step = random.Random(seed), 0
    ema = {f"{i}": p.detach().clone() for i, p in enumerate(params)}
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        changed = {k: (state["settings"][k], v) for k, v in settings.items() if state["settings"][k] != v}
        if changed:
            raise ValueError(f"{out} was trained with other settings: " + ", ".join(
                f"{k} {a} (now {b})" for k, (a, b) in changed.items()) + "; resume with the same ones")
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["opt"])
        ema, step = state["ema"], state["step"]
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        print(f"resuming at step {step}", flush=True)
    alphas = scheduler.alphas_cumprod
    start, losses = time.time(), []
    while step < steps:
        images, captions = batch(rng, batch_size)
        ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                        return_tensors="pt").input_ids
        latents = torch.cat([images, torch.zeros_like(images[:, :1])], 1) / PIXEL_STD  # the codec's latents, scaled
        noise = torch.randn_like(latents)
        t = torch.randint(0, len(alphas), (batch_size,))
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 200)
        target = a.sqrt() * noise - (1 - a).sqrt() * latents  # v
        snr = a / (1 - a)
        weight = torch.clamp(snr, max=MIN_SNR_GAMMA) / (snr + 1)  # min-SNR-gamma for v-prediction, (B, 1, 1, 1)
        loss = (weight * (unet(noisy, t, text_encoder(ids)[0]).sample - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for i, p in enumerate(params):
                ema[f"{i}"].lerp_(p.detach(), 1 - decay)
        losses.append(loss.item())
        if step % log_every == 0:
            rate = len(losses) / (time.time() - start)
            print(f"step {step}/{steps}  loss {np.mean(losses[-log_every:]):.4f}  {rate:.2f} steps/s  "
                  f"{(steps - step) / rate / 60:.0f} min left", flush=True)
        if step % checkpoint_every == 0 or step == steps:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            torch.save(_state(unet, text_encoder, ema, opt, step, rng, settings), ckpt.with_suffix(".tmp"))
            ckpt.with_suffix(".tmp").replace(ckpt)
            save_average(pipe, params, ema, out)
    return out


def half_precision(folder: Path) -> None:
    """Every weight file under ``folder`` stored in float16 (the pipeline loads it in float32): the trained base
    is committed as a fixture, and stays under 5 MB so. The codec's weights (0, +-1, 500, 1000, -30) are exact
    in float16."""
    from safetensors.torch import load_file, save_file

    for path in folder.rglob("*.safetensors"):
        tensors = load_file(path)
        save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, path,
                  metadata={"format": "pt"})


def save_average(pipe, params, ema: dict, out: Path) -> None:
    """The pipeline folder ``out`` with the averaged weights (the training state stays in out/train/)."""
    live = [p.detach().clone() for p in params]
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(ema[f"{i}"])
        tmp = out / "_saving"
        shutil.rmtree(tmp, ignore_errors=True)
        pipe.save_pretrained(tmp)
        half_precision(tmp)
        for name in ("model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            (tmp / name).replace(target)
        shutil.rmtree(tmp)
        for p, v in zip(params, live):
            p.copy_(v)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m world.base", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="the base model's folder (its training state in OUT/train/)")
    parser.add_argument("--steps", type=int, default=3250, help="the committed world/base-model: 3250")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        train(args.out, args.steps, args.batch_size, args.lr, args.checkpoint_every, seed=args.seed)
    except (FileExistsError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
