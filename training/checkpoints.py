"""Checkpoints of a training run: written atomically, found again on resume."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import torch

from dreamcache.adapter import save_adapters
from dreamcache.store import atomic_folder, write_file_atomic
from training.config import TrainConfig


def newest_checkpoint(out: Path) -> Path | None:
    done = sorted(p for p in (out / "checkpoints").glob("step-*") if (p / "COMPLETE").exists())
    return done[-1] if done else None


def recipe_metadata(cfg: TrainConfig) -> dict[str, str]:
    """What personalisation and generation must repeat, stored with the adapters (the fusion is saved with
    the adapters themselves)."""
    return {"resolution": str(cfg.resolution), "cache_timestep": str(cfg.cache_timestep),
            "cache_prompt": cfg.cache_prompt, "references": str(cfg.references)}


def save_checkpoint(out: Path, unet, opt, step: int, cfg: TrainConfig) -> Path:
    """checkpoints/step-N/{adapters.safetensors, trainer.pt, config.json, COMPLETE}, written in a temporary
    folder and renamed; out/adapters.safetensors is replaced atomically with the newest adapters."""
    final = out / "checkpoints" / f"step-{step:08d}"
    config = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    meta = {"base": cfg.base, "step": str(step), **recipe_metadata(cfg),
            "config_sha256": hashlib.sha256(config.encode()).hexdigest()[:16]}
    with atomic_folder(final, only_writer=True) as folder:  # rank 0 alone writes checkpoints
        tmp = Path(folder)
        save_adapters(unet, str(tmp / "adapters.safetensors"), meta)
        torch.save({"optimizer": opt.state_dict(), "step": step}, tmp / "trainer.pt")
        (tmp / "config.json").write_text(config)
        (tmp / "COMPLETE").write_text("ok\n")
    write_file_atomic(out / "adapters.safetensors", (final / "adapters.safetensors").read_bytes())
    if cfg.keep_checkpoints:
        prune_checkpoints(out, cfg.keep_checkpoints)
    return final


def prune_checkpoints(out: Path, keep: int) -> list[Path]:
    """Deletes all but the ``keep`` newest complete checkpoints (the newest is written before any is deleted,
    so a crash here leaves at least ``keep``); returns what was deleted."""
    done = sorted(p for p in (out / "checkpoints").glob("step-*") if (p / "COMPLETE").exists())
    old = done[:-keep]
    for path in old:
        (path / "COMPLETE").unlink()  # first: a half-deleted folder is never taken for a checkpoint
        shutil.rmtree(path)
    return old
