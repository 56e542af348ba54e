"""The frozen caption plan: captions generated, deduplicated and balanced once, then consumed in order.

The plan is what makes the run resumable and deterministic: sample keys and seeds are positions in it, and
a resumed run reads it back instead of asking the LLM again. It is written atomically with its marker
(``plan/plan.json``) last. Captions are over-generated in rounds until the plan holds ``plan_size``
candidates (``size x overgenerate``, to absorb SDXL and segmentation drops) or ``max_rounds`` is reached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter
from typing import Any, Callable

from manifests.index import now
from manifests.schema import PLAN
from manifests.store import Store
from pipeline.captions import make_requests
from pipeline.config import PipelineConfig
from pipeline.dedup import dedup_and_balance
from pipeline.errors import PipelineError
from pipeline.stage import OK

log = logging.getLogger(__name__)
CaptionRunner = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]


def sample_key(seed: int, index: int) -> str:
    return f"s{seed}-{index:08d}"


def sample_seed(seed: int, key: str) -> int:
    """The SDXL seed of a sample: a hash of the run seed and its key (31 bits, any generator accepts it)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:4], "big") & 0x7FFFFFFF


def data_fingerprint(cfg: PipelineConfig) -> str:
    """Fingerprint of everything that changes the samples; batch sizes and resources do not."""
    d = cfg.to_dict()
    for section in ("captions", "targets", "segment"):
        d[section].pop("batch_size", None)
    for k in ("resources", "progress_interval"):
        d.pop(k)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def existing_plan(store: Store, cfg: PipelineConfig) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
    """The committed plan at ``store`` (rows, plan.json), None if there is none; refuses another config's plan."""
    if not store.exists(PLAN, "plan.json"):
        return None
    meta = json.loads(store.read_bytes(PLAN, "plan.json"))
    if meta["fingerprint"] != data_fingerprint(cfg):
        raise PipelineError(
            f"{store.uri} holds a dataset made with a different configuration (fingerprint {meta['fingerprint']}, "
            f"this run {data_fingerprint(cfg)}). Resume with the same flags, or write to a new --out.")
    rows = [json.loads(line) for line in store.read_bytes(PLAN, "captions.jsonl").decode().splitlines()]
    log.info("resuming with the frozen caption plan: %d candidates", len(rows))
    return rows, meta


def commit_plan(store: Store, cfg: PipelineConfig, run_captions: CaptionRunner) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Makes the plan and commits it: rows first, then plan.json, the plan's commit marker."""
    store.remove_temporaries(PLAN)
    rows, drops, stats = make_plan(cfg, run_captions)
    meta = {"fingerprint": data_fingerprint(cfg), "created": now(), "candidates": len(rows), "drops": dict(drops), **stats}
    store.write_atomic("".join(json.dumps(r) + "\n" for r in rows).encode(), PLAN, "captions.jsonl")
    store.write_atomic(json.dumps(meta, indent=1).encode(), PLAN, "plan.json")
    return rows, meta


def make_plan(cfg: PipelineConfig, run_captions: CaptionRunner) -> tuple[list[dict[str, Any]], Counter, dict[str, Any]]:
    """Caption rounds + dedup until the plan is full; returns (rows, drops by stage:reason, stats)."""
    need, per_request = cfg.plan_size, cfg.captions.captions_per_request
    pool: list[dict[str, Any]] = []
    caption_drops: Counter = Counter()
    plan: list[dict[str, Any]] = []
    dedup_drops: Counter = Counter()
    requests_made = 0
    for round_ in range(cfg.captions.max_rounds):
        missing = need - len(plan)
        n = math.ceil(missing * cfg.captions.overgenerate / per_request)
        log.info("caption round %d: %d requests for %d more candidates", round_, n, missing)
        results = run_captions(make_requests(n, cfg.seed, round_, cfg.captions))
        requests_made += n
        results.sort(key=lambda r: (r["request_id"], r["n"]))  # workers finish in any order; the plan does not
        for r in results:
            if r["status"] == OK:
                pool.append({k: r[k] for k in ("request_id", "n", "category", "subject", "caption")})
            else:
                caption_drops[r["status"]] += 1
        plan, dedup_drops = dedup_and_balance(pool, need, cfg.dedup, cfg.seed)
        log.info("caption round %d: %d captions, %d unique after dedup and balance (need %d)",
                 round_, len(pool), len(plan), need)
        if len(plan) >= need:
            break
    else:
        log.warning("caption plan holds %d of %d candidates after %d rounds: the run may stop short; raise "
                    "captions.max_rounds or captions.overgenerate, or extend the vocabulary in prompts/",
                    len(plan), need, cfg.captions.max_rounds)
    rows = []
    for i, r in enumerate(plan):
        key = sample_key(cfg.seed, i)
        rows.append({"index": i, "key": key, "seed": sample_seed(cfg.seed, key), "category": r["category"],
                     "subject": r["subject"], "caption": r["caption"]})
    stats = {"requests": requests_made, "captions": len(pool),
             "rounds": round_ + 1}
    return rows, caption_drops + dedup_drops, stats
