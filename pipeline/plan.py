"""The frozen caption plan: captions generated, deduplicated and balanced once, then consumed in order.

The plan is what makes the run resumable and deterministic: sample keys and seeds are positions in it, and
a resumed run reads it back instead of asking the LLM again. It is made and committed in chunks of
``plan_chunk`` candidates (the 400k dataset's plan is one chunk), so the driver never holds more than one
chunk whatever ``--size`` is, and a run killed while planning keeps every chunk it committed:

    plan/chunk-000000.jsonl   the chunk's candidates, in consumption order (global index, key, seed, caption)
    plan/chunk-000000.json    the chunk's commit marker: counts, drops, fingerprint
    plan/plan.json            the whole plan's commit marker, written after its last chunk

Each chunk over-generates captions in rounds until it holds its candidates (``size x overgenerate``, to
absorb SDXL and segmentation drops, cut into chunks) or ``max_rounds`` is reached; dedup and balance run
within a chunk. Datasets from before chunks have one ``plan/captions.jsonl``; they are read as one chunk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from manifests.index import now
from manifests.schema import PLAN
from dreamcache.seeds import derive_seed
from dreamcache.store import Store
from pipeline import small_world
from pipeline.captions import make_requests
from pipeline.config import PipelineConfig
from pipeline.dedup import dedup_and_balance
from dreamcache.errors import PipelineError
from pipeline.stage import OK

log = logging.getLogger(__name__)
EXAMPLES = 3  # raw answers kept per caption drop reason, in plan/report-NNNNNN.json


class CaptionFailure(PipelineError):
    """The caption stage gave too few captions to make the dataset: nothing is committed, a rerun retries."""
CaptionRunner = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]


def sample_key(seed: int, index: int) -> str:
    return f"s{seed}-{index:08d}"


def sample_seed(seed: int, key: str) -> int:
    """The SDXL seed of a sample: a hash of the run seed and its key (31 bits, any generator accepts it)."""
    return derive_seed(seed, key, bits=31)


def data_fingerprint(cfg: PipelineConfig) -> str:
    """Fingerprint of everything that changes the samples; batch sizes and resources do not, nor the settings
    of a sample stage that does not run."""
    from pipeline.stages import SAMPLE_STAGES

    d = cfg.to_dict()
    d["captions"].pop("batch_size")
    for stage in SAMPLE_STAGES:
        if not stage.enabled(getattr(cfg, stage.name)):
            d.pop(stage.name)  # an optional stage left off: its settings change nothing
            continue
        d[stage.name].pop("batch_size", None)
        d[stage.name].pop("compile", None)  # the same computation (to the last bits, like a batch size)
        d[stage.name].pop("compile_mode", None)
        # The detector's padded text length: the same detections for every phrase that fits (padding is masked);
        # a longer one is dropped by name, and the captions' subjects are 1-8 words. Datasets from before the
        # bound keep their fingerprint.
        d[stage.name].pop("max_text_tokens", None)
    # Settings added after datasets were made: at their defaults they leave the fingerprint as it was.
    for section, name, default in (("segment", "method", "grounded"), ("captions", "vocabulary", ""),
                                   ("targets", "fp8", False),
                                   ("dedup", "enabled", True), ("shards", "jpeg_chroma", 420)):
        if section in d and d[section].get(name) == default:
            d[section].pop(name)
            if section == "segment":
                d[section].pop("key_distance", None)
    for k in ("resources", "progress_interval", "max_drop_rate", "drop_window"):  # how the run goes, not what
        d.pop(k)
    # Local files that decide the samples, by their contents: a path may be written again between two runs.
    if cfg.captions.vocabulary:
        d["captions"]["vocabulary_sha256"] = hashlib.sha256(Path(cfg.captions.vocabulary).read_bytes()).hexdigest()
    if small_world.is_world(cfg.targets.model):
        d["targets"]["model_sha256"] = small_world.model_digest(cfg.targets.model)
    if cfg.plan_size <= cfg.plan_chunk:  # one chunk: the chunk size does not change the plan
        d.pop("plan_chunk")
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def chunk_name(index: int, suffix: str) -> str:
    return f"chunk-{index:06d}.{suffix}"


@dataclass
class Plan:
    """A committed plan: its marker and chunk markers in memory, its rows read one chunk at a time."""

    store: Store
    meta: dict[str, Any]  # plan.json
    chunks: list[dict[str, Any]]  # chunk markers: first (global index), candidates

    @property
    def candidates(self) -> int:
        return self.meta["candidates"]

    def rows(self, start: int = 0) -> Iterator[list[dict[str, Any]]]:
        """The rows at global index >= ``start``, one list per chunk."""
        for c in self.chunks:
            if c["first"] + c["candidates"] <= start:
                continue
            rows = _read_rows(self.store, c["file"])
            yield rows[max(0, start - c["first"]):]


def _read_rows(store: Store, name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in store.read_bytes(PLAN, name).decode().splitlines()]


def existing_plan(store: Store, cfg: PipelineConfig) -> dict[str, Any] | None:
    """The committed plan.json at ``store``, None if the plan is not complete; refuses another config's plan
    (or chunks of one) before anything starts."""
    markers = sorted(n for n in store.list(PLAN, ".json") if n.startswith("chunk-"))
    meta = json.loads(store.read_bytes(PLAN, "plan.json")) if store.exists(PLAN, "plan.json") else None
    found = meta or (json.loads(store.read_bytes(PLAN, markers[0])) if markers else None)
    if found is not None and found["fingerprint"] != data_fingerprint(cfg):
        raise PipelineError(
            f"{store.uri} holds a dataset made with a different configuration (fingerprint {found['fingerprint']}, "
            f"this run {data_fingerprint(cfg)}). Resume with the same flags, or write to a new --out.")
    return meta


def load_plan(store: Store, meta: dict[str, Any]) -> Plan:
    if "chunks" not in meta:  # a plan from before chunks: one file
        return Plan(store, meta, [{"file": "captions.jsonl", "first": 0, "candidates": meta["candidates"]}])
    chunks = [json.loads(store.read_bytes(PLAN, chunk_name(i, "json"))) for i in range(meta["chunks"])]
    return Plan(store, meta, chunks)


def commit_plan(store: Store, cfg: PipelineConfig, run_captions: CaptionRunner) -> Plan:
    """Makes the plan's missing chunks, committing each (rows, then its marker), then plan.json. A chunk
    already committed by an interrupted run is kept; the same config gives the same chunks either way."""
    store.remove_temporaries(PLAN)
    fingerprint, total, chunks = data_fingerprint(cfg), cfg.plan_size, []
    first = 0
    n_chunks = math.ceil(total / cfg.plan_chunk)
    for c in range(n_chunks):
        need = min(cfg.plan_chunk, total - c * cfg.plan_chunk)
        if store.exists(PLAN, chunk_name(c, "json")):
            marker = json.loads(store.read_bytes(PLAN, chunk_name(c, "json")))
            log.info("caption plan: chunk %d/%d was committed by an earlier run (%d candidates)", c + 1, n_chunks,
                     marker["candidates"])
        else:
            rows, drops, stats, examples = make_chunk(cfg, run_captions, c, first, need)
            least = math.ceil(need / cfg.overgenerate)  # the chunk's share of --size, with no SDXL or mask drop
            report = {"chunk": c, "needed": need, "at_least": least, "candidates": len(rows), **stats,
                      "committed": len(rows) >= least, "drops": dict(drops.most_common()), "examples": examples}
            store.write_atomic(json.dumps(report, indent=1).encode(), PLAN, f"report-{c:06d}.json")
            if len(rows) < least:
                raise CaptionFailure(_failure(store, c, report))
            marker = {"fingerprint": fingerprint, "file": chunk_name(c, "jsonl"), "first": first,
                      "candidates": len(rows), "drops": dict(drops), **stats}
            store.write_atomic("".join(json.dumps(r) + "\n" for r in rows).encode(), PLAN, marker["file"])
            store.write_atomic(json.dumps(marker, indent=1).encode(), PLAN, chunk_name(c, "json"))
            log.info("caption plan: chunk %d/%d committed: %d of %d candidates (%d in the plan so far)", c + 1,
                     n_chunks, len(rows), need, first + len(rows))
            del rows  # one chunk in memory at a time
        chunks.append(marker)
        first += marker["candidates"]
    drops: Counter = Counter()
    for m in chunks:
        drops.update(m["drops"])
    meta = {"fingerprint": fingerprint, "created": now(), "candidates": first, "drops": dict(drops),
            "requests": sum(m["requests"] for m in chunks), "captions": sum(m["captions"] for m in chunks),
            "rounds": sum(m["rounds"] for m in chunks), "chunks": len(chunks), "chunk_size": cfg.plan_chunk}
    store.write_atomic(json.dumps(meta, indent=1).encode(), PLAN, "plan.json")
    return Plan(store, meta, chunks)


def _failure(store: Store, chunk: int, report: dict[str, Any]) -> str:
    top = ", ".join(f"{k}={v}" for k, v in list(report["drops"].items())[:4]) or "none"
    example = next((e[0] for e in report["examples"].values() if e and e[0]), "")
    return (f"caption stage: plan chunk {chunk} holds {report['candidates']} candidates, fewer than the "
            f"{report['at_least']} its share of --size needs, after {report['rounds']} rounds of "
            f"{report['requests']} requests ({report['captions']} valid captions). Top drops: {top}."
            + (f" A raw answer: {example[:160]!r}." if example else "") +
            f" Nothing was committed. The raw answers by reason are in {store.uri}/plan/report-{chunk:06d}.json; "
            "check the caption model and its settings (captions.model, captions.constrained, prompts/), then run "
            "the same command again: captioning is retried.")


def make_chunk(cfg: PipelineConfig, run_captions: CaptionRunner, chunk: int, first: int,
               need: int) -> tuple[list[dict[str, Any]], Counter, dict[str, Any], dict[str, list[str]]]:
    """Caption rounds + dedup until the chunk holds ``need`` candidates; returns (rows, drops by
    stage:reason, stats, a few raw answers per caption drop reason). Rows are numbered from ``first``;
    chunk 0 asks what a single-chunk plan asks."""
    per_request = cfg.captions.captions_per_request
    pool: list[dict[str, Any]] = []
    caption_drops: Counter = Counter()
    plan: list[dict[str, Any]] = []
    dedup_drops: Counter = Counter()
    requests_made = 0
    examples: dict[str, list[str]] = {}
    for round_ in range(cfg.captions.max_rounds):
        missing = need - len(plan)
        n = math.ceil(missing * cfg.captions.overgenerate / per_request)
        log.info("caption plan: chunk %d round %d: %d requests for %d more candidates", chunk, round_, n, missing)
        results = run_captions(make_requests(n, cfg.seed, chunk * cfg.captions.max_rounds + round_, cfg.captions))
        requests_made += n
        results.sort(key=lambda r: (r["request_id"], r["n"]))  # workers finish in any order; the plan does not
        for r in results:
            if r["status"] == OK:
                pool.append({k: r[k] for k in ("request_id", "n", "category", "subject", "caption")})
            else:
                caption_drops[r["status"]] += 1
                seen = examples.setdefault(r["status"], [])
                if len(seen) < EXAMPLES and r.get("error") and r["error"] not in seen:
                    seen.append(r["error"])
        del results
        plan, dedup_drops = dedup_and_balance(pool, need, cfg.dedup, cfg.seed)
        log.info("caption plan: chunk %d round %d: %d captions, %d unique after dedup and balance (need %d)",
                 chunk, round_, len(pool), len(plan), need)
        if len(plan) >= need:
            break
    else:
        log.warning("caption plan chunk %d holds %d of %d candidates after %d rounds: the run may stop short; raise "
                    "captions.max_rounds or captions.overgenerate, or extend the vocabulary in prompts/",
                    chunk, len(plan), need, cfg.captions.max_rounds)
    rows = []
    for i, r in enumerate(plan, start=first):
        key = sample_key(cfg.seed, i)
        rows.append({"index": i, "key": key, "seed": sample_seed(cfg.seed, key), "category": r["category"],
                     "subject": r["subject"], "caption": r["caption"]})
    stats = {"requests": requests_made, "captions": len(pool), "rounds": round_ + 1}
    return rows, caption_drops + dedup_drops, stats, examples
