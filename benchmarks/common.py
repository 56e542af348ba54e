"""What every benchmark shares: the device, a synchronised clock, the hardware record, markdown helpers."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

from dreamcache.models import default_device

ROOT = Path(__file__).resolve().parent.parent
DEVICE = default_device()
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s, from the vendor's data sheets


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def clock(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def hardware() -> dict:
    info = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "cpu": platform.processor() or
            platform.machine(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__}
    try:
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                 if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def table(head: list[str], rows: list[list]) -> list[str]:
    """Markdown table lines; every column but the first right-aligned."""
    return ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1),
            *("| " + " | ".join(str(v) for v in row) + " |" for row in rows)]


def write_markdown(report: dict, path: Path, render, begin: str, end: str) -> None:
    """Replaces the section between ``begin`` and ``end`` in ``path`` with ``render(report)``, or appends it;
    everything else in the file is kept."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = render(report)
    if begin in text and end in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
