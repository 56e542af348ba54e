"""Adapter overhead per U-Net pass: the full-size architecture with random weights, with and without a cache.

    python benchmarks/adapter_overhead.py [--base sd15] [--latent 32] [--repeats 5]

Both passes run in the same process on the same U-Net, alternating, and the median of each is reported,
so the ratio is robust to a noisy shared machine. Also times the one caching pass. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch

    from training.adapter import DEFAULT_LAYERS, cached, capture_features, install_adapters
    from training.train import build_unet

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="sd15", choices=["sd15", "sd21"])
    p.add_argument("--latent", type=int, default=32, help="latent side (64 = 512 px)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    unet = build_unet(args.base, random_init=True, device=device).to(dtype).eval()
    install_adapters(unet)
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(1, 4, args.latent, args.latent, device=device, dtype=dtype, generator=g)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, device=device, dtype=dtype, generator=g)
    t = torch.tensor([500], device=device)

    def clock(fn) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    with torch.inference_mode():
        one = torch.tensor([1], device=device)
        cache_s = [clock(lambda: capture_features(unet, DEFAULT_LAYERS, x, one, torch.zeros_like(text)))
                   for _ in range(2)][-1]
        feats = capture_features(unet, DEFAULT_LAYERS, x, one, torch.zeros_like(text))
        unet(x, t, encoder_hidden_states=text)  # warm-up
        base, adapted = [], []
        for _ in range(args.repeats):
            base.append(clock(lambda: unet(x, t, encoder_hidden_states=text)))
            with cached(unet, feats):
                adapted.append(clock(lambda: unet(x, t, encoder_hidden_states=text)))
    b, a = statistics.median(base), statistics.median(adapted)
    print(json.dumps({"base": args.base, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                      "threads": torch.get_num_threads(), "latent": args.latent, "dtype": str(dtype),
                      "base_pass_s": round(b, 4), "adapter_pass_s": round(a, 4), "overhead_ratio": round(a / b, 3),
                      "caching_pass_s": round(cache_s, 4),
                      "cache_values": sum(v.numel() for v in feats.values())}))


if __name__ == "__main__":
    main()
