"""The stage contract: a callable class, batch in -> batch out, a bad row is data.

A sample stage also says, in class attributes, how the pipeline runs and records it: its config section and
drop prefix (``name``), its actor pool (``pool_name``), its step in the drop funnel (``funnel``), the scores kept
in the manifest and the sample's json (``record``), the models it loads (``models``, checked before any work
and listed in ``dataset.json``) and whether it runs at all (``enabled``). ``pipeline/stages.py`` lists the
sample stages in order; the Ray graph, the writer, the plan fingerprint and the benchmarks read that list.

A batch is Ray Data's numpy format, ``{column: np.ndarray}``. Every row carries ``status`` ("ok" or the
reason it was dropped, as ``stage:reason``) and ``error`` (detail for humans). A stage works on the rows
that are still ok and passes the others through untouched, so that the shard writer sees every candidate
and can record each drop in the manifest. If processing a batch raises, the stage retries each row on its
own; a row that still raises is dropped as ``<stage>:error`` with the exception text. Nothing a single
sample does can stop the run.

An error of the machine rather than of the sample (CUDA errors, out of memory) is not data: inside a Ray
actor it ends the actor's process, so that Ray starts a new actor and retries its rows, instead of a broken
GPU dropping every row it is handed and using up the plan. Outside Ray it is raised to the caller.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import traceback
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from pipeline.config import CHROMA, ShardConfig

log = logging.getLogger(__name__)
OK = "ok"
# What the machine's failures say: the GPU runtime's errors and allocation failures, on GPU or CPU.
INFRASTRUCTURE = ("CUDA", "cuDNN", "cuBLAS", "CUBLAS", "NCCL", "device-side assert", "out of memory",
                  "can't allocate memory", "HIP error", "ECC error")
EXIT_INFRASTRUCTURE = 75  # the actor's exit status after an infrastructure error (EX_TEMPFAIL)


def is_infrastructure_error(e: BaseException) -> bool:
    """True for an error of the machine (the GPU, memory), not of the sample being processed."""
    if isinstance(e, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, (RuntimeError, OSError)) and any(m in str(e) for m in INFRASTRUCTURE)


def end_actor_or_raise(stage: str, e: BaseException) -> None:
    """After an infrastructure error: ends this actor's process (Ray replaces the actor and retries the
    task) or, outside Ray, raises ``e``."""
    if not _in_ray_worker():
        raise e
    log.error("%s: infrastructure error, ending this actor so that Ray replaces it and retries its rows: %s",
              stage, "".join(traceback.format_exception_only(e)).strip())
    logging.shutdown()
    os._exit(EXIT_INFRASTRUCTURE)


def _in_ray_worker() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE


def encode_jpeg(image, shards: ShardConfig) -> bytes:
    """A PIL image as JPEG bytes (RGB), at the quality and chroma subsampling of the run's ``shards`` section."""
    import io

    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=shards.jpeg_quality, subsampling=CHROMA[shards.jpeg_chroma])
    return buf.getvalue()


@dataclass(frozen=True)
class Drop:
    """A row that leaves the pipeline, and why."""

    reason: str  # short, stable, countable: "no_box", "mask_area", ...
    detail: str = ""  # free text for humans


class ModelRef(NamedTuple):
    """A model a stage loads: its key in dataset.json's ``models``, the reference (hub id, folder, tiny:<name>,
    simulate:<seconds>), its revision, its role in messages and the flag that sets it."""

    key: str
    ref: str
    revision: str | None
    role: str
    flag: str


class Stage:
    """Subclasses set ``name`` and ``columns`` ({new column: value for dropped rows}) and implement
    ``process(rows) -> list[dict | Drop]`` on the rows that are still ok, one result per row, in order.
    A sample stage's constructor takes its config section and the run's ``shards`` section (how JPEGs are written,
    ``encode_jpeg``): ``Stage(cfg, shards)``."""

    name: str = "stage"  # the drop prefix ("segment:no_box") and the stage's config section
    columns: dict[str, Any] = {}
    pool_name: str = ""  # its fixed actor pool, sized by resources.<pool_name>_actors and <pool_name>_gpus
    title: str = ""  # the pool in messages ("12 segmentation x 0.25 GPU")
    funnel: str = ""  # the drop funnel's step after this stage (manifests show)
    record: tuple[str, ...] = ()  # score columns kept in the manifest's sample record and the sample's json

    @classmethod
    def enabled(cls, cfg) -> bool:
        """Whether the stage runs with its config section ``cfg`` (an optional stage is off by default)."""
        return True

    @classmethod
    def models(cls, cfg) -> list[ModelRef]:
        return []

    @classmethod
    def variant(cls, cfg) -> type:
        """This stage's own class for ``cfg``: this one, or a variant of it (the keying segmenter). What the actors
        run, stand-ins included (``simulate:``, ``world:``), is ``pipeline.stages.implementation``'s choice."""
        return cls

    @classmethod
    def stands_in(cls, cfg) -> bool:
        """Whether this stand-in takes its stage's place for the config section ``cfg`` (pipeline/stages.py)."""
        return False

    @classmethod
    def sample_json(cls, row: dict[str, Any]) -> dict[str, Any]:
        """What the stage adds to the sample's json: its ``record`` scores, unless a stage keeps more."""
        return {k: float(row[k]) for k in cls.record}

    def process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any] | Drop]:
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["status"])
        status = np.asarray(batch["status"], dtype=object).copy()
        error = np.asarray(batch.get("error", np.full(n, "", dtype=object)), dtype=object).copy()
        live = [i for i in range(n) if status[i] == OK]
        rows = [{k: v[i] for k, v in batch.items()} for i in live]
        new = {c: [d] * n for c, d in self.columns.items()}
        for i, result in zip(live, self._process_safely(rows)):
            if isinstance(result, Drop):
                status[i], error[i] = f"{self.name}:{result.reason}", result.detail[:500]
                continue
            for c in self.columns:
                new[c][i] = result[c]
        out = {**batch, "status": status, "error": error}
        for c, values in new.items():
            out[c] = _column(values)
        return out

    def _process_safely(self, rows: list[dict[str, Any]]) -> list[dict[str, Any] | Drop]:
        if not rows:
            return []
        try:
            results = self.process(rows)
            if len(results) != len(rows):
                raise RuntimeError(f"{self.name}.process returned {len(results)} results for {len(rows)} rows")
            return results
        except Exception as e:
            if is_infrastructure_error(e):
                end_actor_or_raise(self.name, e)
            if len(rows) == 1:
                log.warning("%s dropped %s: %s", self.name, rows[0].get("key"), e)
                return [Drop("error", "".join(traceback.format_exception_only(e)).strip())]
            log.warning("%s failed on a batch of %d (%s); retrying row by row", self.name, len(rows), e)
            return [r for row in rows for r in self._process_safely([row])]


class DrawnTargets(Stage):
    """caption + seed -> ``target`` (JPEG bytes): a diffusers text-to-image pipeline (``self.pipe``) at the
    ``targets`` section's guidance, steps and resolution, one ``torch.Generator`` per sample seeded from its
    seed. Subclasses load the pipeline (SDXL: pipeline/targets.py; the small world's base:
    pipeline/small_world.py) and may ask for another prompt than the caption (``prompt``) or drop what was
    drawn (``keep``)."""

    name = "targets"
    columns = {"target": b""}
    pool_name, funnel = "target", "SDXL targets"

    def __init__(self, cfg, shards: ShardConfig, pipe):
        self.cfg, self.shards, self.pipe, self.device = cfg, shards, pipe, pipe.device.type
        # The diffusers pipeline keeps per-call state (its scheduler's timesteps): calls from several threads
        # take turns. The pipeline's SDXL actors run one call at a time (a second in flight measured slower).
        self.device_lock = threading.Lock()

    def prompt(self, row: dict[str, Any]) -> str:
        return str(row["caption"])

    def keep(self, image) -> dict[str, Any] | Drop:
        return {"target": encode_jpeg(image, self.shards)}

    def process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any] | Drop]:
        import torch

        cfg, out = self.cfg, []
        for start in range(0, len(rows), cfg.batch_size):
            chunk = rows[start:start + cfg.batch_size]
            generators = [torch.Generator(self.device).manual_seed(int(r["seed"])) for r in chunk]
            with self.device_lock:
                images = self.pipe(
                    prompt=[self.prompt(r) for r in chunk],
                    negative_prompt=[cfg.negative_prompt] * len(chunk) if cfg.negative_prompt else None,
                    guidance_scale=cfg.guidance_scale, num_inference_steps=cfg.steps,
                    height=cfg.resolution, width=cfg.resolution, generator=generators,
                ).images
            out += [self.keep(im) for im in images]
        return out


def _column(values: list[Any]) -> np.ndarray:
    """A numpy column that keeps bytes, strings and arrays as Python objects (no silent fixed-width dtypes)."""
    if values and all(isinstance(v, (float, int, np.floating, np.integer)) and not isinstance(v, bool) for v in values):
        return np.asarray(values, dtype=np.float64 if any(isinstance(v, (float, np.floating)) for v in values) else np.int64)
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out
