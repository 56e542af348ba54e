"""``python -m manifests sheet``: a contact sheet of triplets in one self-contained HTML file.

Samples are drawn reproducibly (``--seed``) from the manifests, optionally from some categories only; each
card shows the caption, the target, the reference and the target with the mask overlaid in red, plus the
detection and SAM scores. Images are embedded as data URIs: the file can be mailed or opened offline. A
category menu in the page filters the cards.
"""

from __future__ import annotations

import base64
import html
import io
import random
from collections import defaultdict

import numpy as np
from PIL import Image

from manifests.schema import SHARDS, read_manifests, tar_members
from dreamcache.store import Store

THUMB = 256


def _scores(record: dict[str, float]) -> str:
    """The stages' scores of a sample, short: "det 0.71 &middot; SAM 0.97 &middot; mask 18% &middot; CLIP 0.31"."""
    short = {"det_score": "det {:.2f}", "sam_score": "SAM {:.2f}", "clip_score": "CLIP {:.2f}"}
    parts = [f"mask {100 * v:.0f}%" if k == "mask_area" else short.get(k, k + " {:.2f}").format(v)
             for k, v in record.items()]
    return " &middot; ".join(html.escape(p) for p in parts)


def _data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _thumb(blob: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(blob)).convert("RGB")
    im.thumbnail((THUMB, THUMB))
    return im


def overlay(target: bytes, mask: bytes, alpha: float = 0.5) -> Image.Image:
    """The target with the mask tinted red (mask resized to the target if needed)."""
    t = np.asarray(Image.open(io.BytesIO(target)).convert("RGB")).astype(np.float32)
    m = Image.open(io.BytesIO(mask)).convert("L").resize((t.shape[1], t.shape[0]), Image.Resampling.NEAREST)
    on = (np.asarray(m) > 127)[..., None]
    red = np.array([255, 0, 0], np.float32)
    out = np.where(on, (1 - alpha) * t + alpha * red, t).astype(np.uint8)
    im = Image.fromarray(out)
    im.thumbnail((THUMB, THUMB))
    return im


def pick(store: Store, n: int, seed: int, categories: list[str] | None) -> list[tuple[str, object]]:
    """[(shard, SampleRecord)] for ``n`` samples drawn reproducibly, in key order."""
    pool = [(m.shard, s) for m in read_manifests(store) for s in m.samples
            if not categories or s.category in categories]
    if not pool:
        which = f" in categories {', '.join(categories)}" if categories else ""
        raise FileNotFoundError(f"{store.uri}: no committed samples{which}")
    chosen = random.Random(seed).sample(pool, min(n, len(pool)))
    return sorted(chosen, key=lambda x: x[1].key)


def build(store: Store, n: int = 24, seed: int = 0, categories: list[str] | None = None) -> str:
    chosen = pick(store, n, seed, categories)
    by_shard: dict[str, set[str]] = defaultdict(set)
    for shard, s in chosen:
        by_shard[shard].add(s.key)
    blobs = {}
    for shard, keys in by_shard.items():
        blobs.update(tar_members(store.read_bytes(SHARDS, shard), keys))
    cards = []
    for shard, s in chosen:
        b = blobs[s.key]
        ref = next(v for k, v in b.items() if k.startswith("reference."))
        cards.append(f"""<figure class="card" data-category="{html.escape(s.category)}">
  <div class="row"><img src="{_data_uri(_thumb(b['target.jpg']))}" title="target" alt="target">
  <img src="{_data_uri(_thumb(ref))}" title="reference" alt="reference">
  <img src="{_data_uri(overlay(b['target.jpg'], b['mask.png']))}" title="mask overlay" alt="mask overlay"></div>
  <figcaption><p class="caption">{html.escape(s.caption)}</p>
  <p class="meta"><b>{html.escape(s.category)}</b> &middot; {html.escape(s.subject)} &middot; {_scores(s.record)}
  &middot; <code>{html.escape(s.key)}</code> ({html.escape(shard)})</p></figcaption>
</figure>""")
    options = "".join(f'<option value="{html.escape(c)}">{html.escape(c)}</option>'
                      for c in sorted({s.category for _, s in chosen}))
    title = f"{len(chosen)} triplets from {html.escape(store.uri)}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px; background: #f4f4f4; color: #222; }}
header {{ display: flex; gap: 16px; align-items: baseline; margin-bottom: 16px; }}
h1 {{ font-size: 18px; margin: 0; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(800px, 1fr)); gap: 16px; }}
.card {{ margin: 0; background: #fff; border-radius: 6px; padding: 12px; box-shadow: 0 1px 3px #0002; }}
.row {{ display: flex; gap: 8px; }}
.row img {{ width: {THUMB}px; height: {THUMB}px; object-fit: contain; background: #ddd; }}
.caption {{ margin: 8px 0 4px; font-size: 15px; }}
.meta {{ margin: 0; color: #666; font-size: 12px; }}
</style></head><body>
<header><h1>{title}</h1><span>target &middot; reference &middot; mask overlay</span>
<label>category <select id="cat"><option value="">all</option>{options}</select></label></header>
<main class="grid">
{chr(10).join(cards)}
</main>
<script>
document.getElementById("cat").addEventListener("change", e => {{
  for (const c of document.querySelectorAll(".card"))
    c.style.display = !e.target.value || c.dataset.category === e.target.value ? "" : "none";
}});
</script>
</body></html>
"""
