"""The Ray Data graphs: the caption requests through the LLM pool, and the plan's candidates through the sample
stages' pools (pipeline/stages.py), each a fixed actor pool (pipeline/pools.py)."""

from __future__ import annotations

import math
from typing import Any

from pipeline import stages
from pipeline.config import PipelineConfig
from pipeline.pools import ray_arguments


def caption_on_ray(requests: list[dict[str, Any]], cfg: PipelineConfig) -> list[dict[str, Any]]:
    """The caption requests (pipeline/plan.py's rounds) through the LLM's pool: one answer row per request."""
    import ray.data

    from pipeline.captions import CaptionStage

    ds = ray.data.from_items(requests).map_batches(
        CaptionStage, fn_constructor_args=(cfg.captions,), batch_size=cfg.captions.batch_size,
        batch_format="numpy", **ray_arguments("caption", cfg.resources))
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()} for row in ds.take_all()]


def plan_blocks(plan: list[dict[str, Any]], batch_size: int, max_blocks: int = 20_000) -> list:
    """The plan's rows as Arrow tables of a whole number of batches each (the last may be short), so that every
    SDXL call gets a full batch; as fine-grained as one batch per block, at most ``max_blocks`` blocks."""
    import pyarrow as pa

    rows = [{**r, "status": "ok", "error": ""} for r in plan]
    step = batch_size * max(1, math.ceil(len(rows) / (batch_size * max_blocks)))
    return [pa.Table.from_pylist(rows[i:i + step]) for i in range(0, len(rows), step)]


def samples_on_ray(plan: list[dict[str, Any]], cfg: PipelineConfig):
    """The plan's candidates through the active sample stages (SDXL -> segmentation [-> CLIP filter]), each a
    fixed actor pool; blocks come back as they finish (``Reorder`` puts the rows back in plan order)."""
    import ray.data

    chain = stages.active(cfg)
    ds = ray.data.from_arrow(plan_blocks(plan, stages.section(cfg, chain[0]).batch_size))
    for stage in chain:
        part = stages.section(cfg, stage)
        ds = ds.map_batches(stages.implementation(cfg, stage), fn_constructor_args=(part, cfg.shards),
                            batch_size=part.batch_size, batch_format="numpy", **ray_arguments(stage.pool_name, cfg.resources))
    last = stages.section(cfg, chain[-1]).batch_size
    return ds.iter_batches(batch_size=last, batch_format="numpy", prefetch_batches=2)
