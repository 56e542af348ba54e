"""``python -m manifests stats``: the plots people look at before training on a dataset.

One PNG with four panels: samples per category, the mask-area and detection-score distributions of the
kept samples (from the manifests), and the funnel from captions asked of the LLM to triplets (from dataset.json).
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

from manifests.schema import read_index, read_manifests
from manifests.show import funnel
from dreamcache.store import Store, write_file_atomic

SCORES = {"det_score": "Grounding DINO box", "sam_score": "SAM predicted IoU", "clip_score": "CLIP caption score"}


def plot(store: Store, out: str, top: int = 30) -> dict[str, int]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    manifests = read_manifests(store)
    samples = [s for m in manifests for s in m.samples]
    index = read_index(store)
    if index is None or not samples:
        raise FileNotFoundError(f"{store.uri}: no committed samples to plot")
    fig, ax = plt.subplots(2, 2, figsize=(14, 10))

    cats = Counter(s.category for s in samples).most_common(top)
    ax[0, 0].barh([c for c, _ in cats][::-1], [n for _, n in cats][::-1], color="#4c72b0")
    ax[0, 0].set_title(f"samples per category (top {len(cats)} of {len(set(s.category for s in samples))})")
    ax[0, 0].tick_params(axis="y", labelsize=8)

    ax[0, 1].hist([s.record.get("mask_area", 0.0) for s in samples], bins=40, range=(0, 1), color="#55a868")
    ax[0, 1].set_title("mask area (fraction of the target)")
    ax[0, 1].set_xlabel("area")

    names = [k for k in dict.fromkeys(k for s in samples for k in s.record) if k != "mask_area"]
    scores = {SCORES.get(k, k): [s.record[k] for s in samples if k in s.record] for k in names}
    ax[1, 0].hist(list(scores.values()), bins=40, range=(0, 1), label=list(scores))
    ax[1, 0].set_title("the stages' scores")
    ax[1, 0].legend()

    steps = funnel(index)
    ax[1, 1].barh([s for s, _ in steps][::-1], [n for _, n in steps][::-1], color="#dd8452")
    for y, (_, n) in enumerate(steps[::-1]):
        ax[1, 1].text(n, y, f" {n:,}", va="center", fontsize=9)
    ax[1, 1].set_title("funnel")

    fig.suptitle(f"{store.uri}: {len(samples):,} triplets in {len(manifests)} shards")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100, format=Path(out).suffix.lstrip(".").lower() or "png")
    write_file_atomic(out, buf.getvalue())
    plt.close(fig)
    return {"samples": len(samples), "shards": len(manifests)}
