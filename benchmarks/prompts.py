"""Images per minute for many prompts: ``dreamcache generate --prompts FILE`` (one process: the models and the
cache loaded once) against one ``dreamcache generate --prompt`` process per prompt, the way a shell loop runs it.

    python -m benchmarks.prompts                          # tiny profile, 12 prompts, 50 steps, on this machine
    python -m benchmarks.prompts --prompts 24 --steps 25

Both sides run the real command line as subprocesses, on the same cache, seeds and prompts, alternately, and
count the wall-clock time of the whole command (start-up, model loading, sampling, writing). The adapters are
the tiny base's untrained ones (their cost is the trained ones'). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import hardware

CONTEXTS = ("in the snow", "on a beach", "at night", "in a kitchen", "on a wooden table", "in a forest",
            "on the moon", "in the rain", "on a bookshelf", "in a garden", "under water", "in a city street")


def tiny_cache(folder: Path) -> Path:
    """Untrained adapters on the tiny SD 1.5 and the cache of one synthetic reference (``dreamcache
    personalize --profile tiny``)."""
    import torch

    from dreamcache.adapter import install_adapters, save_adapters
    from dreamcache.bases import build_unet

    unet = build_unet("tiny:sd15", random_init=False)
    torch.manual_seed(0)
    install_adapters(unet)
    adapters = folder / "adapters.safetensors"
    save_adapters(unet, str(adapters), {"base": "tiny:sd15", "step": "0"})
    arr = np.full((48, 48, 3), 255, np.uint8)
    arr[12:36, 12:36] = np.random.default_rng(0).integers(0, 255, (24, 24, 3))
    Image.fromarray(arr).save(folder / "toy.png")
    cache = folder / "toy.cache"
    command(["personalize", "--profile", "tiny", "--adapters", str(adapters), "--reference", str(folder / "toy.png"),
             "--subject", "toy", "--out", str(cache), "--device", "cpu"])
    return cache


def command(args: list[str]) -> float:
    """Runs ``python -m dreamcache ARGS``; its wall-clock seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dreamcache", *args], check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.prompts", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=12, help="prompts per side (default 12)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps per image (default 50, the paper's)")
    p.add_argument("--repeats", type=int, default=2, help="times each side runs, alternately; the fastest counts")
    args = p.parse_args(argv)
    prompts = [f"a toy {CONTEXTS[i % len(CONTEXTS)]}" + (f", view {i // len(CONTEXTS)}" if i >= len(CONTEXTS) else "")
               for i in range(args.prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cache = tiny_cache(folder)
        (folder / "prompts.txt").write_text("\n".join(prompts) + "\n")
        common = ["generate", "--cache", str(cache), "--steps", str(args.steps), "--device", "cpu"]
        many, each = [], []
        for r in range(args.repeats):
            many.append(command([*common, "--prompts", str(folder / "prompts.txt"), "--out", str(folder / f"many-{r}")]))
            each.append(sum(command([*common, "--prompt", prompt, "--out", str(folder / f"each-{r}-{i}.png")])
                            for i, prompt in enumerate(prompts)))
    one, loop = min(many), min(each)
    report = {"command": "python -m benchmarks.prompts " + " ".join(argv if argv is not None else sys.argv[1:]),
              "hardware": hardware(), "profile": "tiny", "prompts": args.prompts, "steps": args.steps,
              "one_process_s": round(one, 2), "process_per_prompt_s": round(loop, 2),
              "one_process_images_per_min": round(args.prompts / one * 60, 1),
              "process_per_prompt_images_per_min": round(args.prompts / loop * 60, 1),
              "speedup": round(loop / one, 2)}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
