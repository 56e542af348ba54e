"""The sample stages, in the order a candidate goes through them: the list the pipeline is built from.

Each entry is a ``Stage`` class (pipeline/stage.py) that names its config section, actor pool, funnel step,
recorded scores and models. A stand-in takes a stage's place when a model reference asks for it
(``simulate:SECONDS``, pipeline/simulate.py; ``world:FOLDER``, pipeline/small_world.py): ``STAND_INS``, so
that the stages themselves know nothing of their stand-ins. The Ray graph (pipeline/graphs.py), the model
check, ``dataset.json``'s models and stages, the sample's json and manifest record (pipeline/writer.py), the
plan fingerprint (pipeline/plan.py) and the benchmarks' plain loop all derive from this list; a new stage is
a class and a line here (and its config section and pool in pipeline/config.py).
"""

from __future__ import annotations

from typing import Any

from pipeline.clip_filter import ClipFilterStage
from pipeline.segment import SegmentStage
from pipeline.simulate import SimulatedSegment, SimulatedTargets
from pipeline.small_world import WorldTargets
from pipeline.stage import ModelRef, Stage
from pipeline.targets import TargetStage

SAMPLE_STAGES: tuple[type[Stage], ...] = (TargetStage, SegmentStage, ClipFilterStage)
# stage -> the stand-ins that may take its place, in the order asked (``Stage.stands_in``)
STAND_INS: dict[type[Stage], tuple[type[Stage], ...]] = {TargetStage: (WorldTargets, SimulatedTargets),
                                                         SegmentStage: (SimulatedSegment,)}


def section(cfg, stage: type[Stage]):
    """The stage's config section of a ``PipelineConfig``."""
    return getattr(cfg, stage.name)


def active(cfg) -> list[type[Stage]]:
    """The sample stages this config runs, in order."""
    return [s for s in SAMPLE_STAGES if s.enabled(section(cfg, s))]


def implementation(cfg, stage: type[Stage]) -> type[Stage]:
    """The class the actors of ``stage`` run with ``cfg``: a stand-in that the config asks for, or the stage's own."""
    part = section(cfg, stage)
    return next((s for s in STAND_INS.get(stage, ()) if s.stands_in(part)), None) or stage.variant(part)


def models(cfg) -> list[ModelRef]:
    """Every model the active sample stages (or their stand-ins) load."""
    return [m for s in active(cfg) for m in implementation(cfg, s).models(section(cfg, s))]


def describe(cfg) -> list[dict[str, Any]]:
    """The active stages as ``dataset.json`` records them: what ``manifests show`` builds its funnel from."""
    return [{"name": s.name, "funnel": s.funnel, "record": list(s.record)} for s in active(cfg)]
