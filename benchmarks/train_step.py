"""One training step of the full-size U-Net architecture with random weights: seconds and peak memory.

    python benchmarks/train_step.py [--base sd15] [--latent 16] [--batch 1] [--steps 3]

Frozen U-Net (random weights from training/configs/), DreamCache adapters on the paper's layers, one caching
pass (t=1, empty prompt), forward with the cache, MSE loss, backward into the adapters only, AdamW step.
VAE and text encoder are left out (their cost does not depend on the adapters). The first step is warm-up;
the median of the rest is reported with the process's peak RSS (CPU) or peak allocated memory (GPU).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch

    from training.adapter import DEFAULT_LAYERS, cached, capture_features, install_adapters, trainable_parameters
    from training.train import build_unet

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="sd15", choices=["sd15", "sd21"])
    p.add_argument("--latent", type=int, default=16, help="latent side (64 = 512 px)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--grad-checkpointing", action="store_true")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    unet = build_unet(args.base, random_init=True, device=device).to(dtype)
    install_adapters(unet, DEFAULT_LAYERS)
    params = trainable_parameters(unet)
    for q in params:
        q.data = q.data.float()
    if args.grad_checkpointing:
        unet.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(params, lr=1e-5)
    B, s, D = args.batch, args.latent, unet.config.cross_attention_dim
    x, ref = torch.randn(B, 4, s, s, device=device, dtype=dtype), torch.randn(B, 4, s, s, device=device, dtype=dtype)
    text, null = torch.randn(B, 77, D, device=device, dtype=dtype), torch.zeros(B, 77, D, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (B,), device=device)
    one = torch.ones(B, dtype=torch.long, device=device)

    def step() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        feats = capture_features(unet, DEFAULT_LAYERS, ref, one, null)
        unet.train()
        with cached(unet, feats), torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
            loss = torch.nn.functional.mse_loss(unet(x, t, encoder_hidden_states=text).sample.float(), x.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times = [step() for _ in range(args.steps + 1)][1:]
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    print(json.dumps({"base": args.base, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                      "threads": torch.get_num_threads(), "latent": s, "batch": B, "dtype": str(dtype),
                      "grad_checkpointing": args.grad_checkpointing, "step_s": round(statistics.median(times), 3),
                      "steps_timed": len(times), "peak_memory_gib": round(peak, 2),
                      "adapter_parameters": sum(q.numel() for q in params)}))


if __name__ == "__main__":
    main()
