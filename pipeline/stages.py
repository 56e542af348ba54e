"""The sample stages, in the order a candidate goes through them: the list the pipeline is built from.

Each entry is a ``Stage`` class (pipeline/stage.py) that names its config section, actor pool, funnel step,
recorded scores and models. The Ray graph (pipeline/run.py), the model check, ``dataset.json``'s models and
stages, the sample's json and manifest record (pipeline/writer.py), the plan fingerprint (pipeline/plan.py)
and the benchmarks' plain loop all derive from this list; a new stage is a class and a line here (and its
config section and pool in pipeline/config.py).
"""

from __future__ import annotations

from typing import Any

from pipeline.clip_filter import ClipFilterStage
from pipeline.segment import SegmentStage
from pipeline.stage import ModelRef, Stage
from pipeline.targets import TargetStage

SAMPLE_STAGES: tuple[type[Stage], ...] = (TargetStage, SegmentStage, ClipFilterStage)


def section(cfg, stage: type[Stage]):
    """The stage's config section of a ``PipelineConfig``."""
    return getattr(cfg, stage.name)


def active(cfg) -> list[type[Stage]]:
    """The sample stages this config runs, in order."""
    return [s for s in SAMPLE_STAGES if s.enabled(section(cfg, s))]


def models(cfg) -> list[ModelRef]:
    """Every model the active sample stages load."""
    return [m for s in active(cfg) for m in s.models(section(cfg, s))]


def describe(cfg) -> list[dict[str, Any]]:
    """The active stages as ``dataset.json`` records them: what ``manifests show`` builds its funnel from."""
    return [{"name": s.name, "funnel": s.funnel, "record": list(s.record)} for s in active(cfg)]
