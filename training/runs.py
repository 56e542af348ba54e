"""A run folder belongs to one run.

``--out`` holds one training run: its config, checkpoints, adapters, TensorBoard logs and validation grids.
Starting in a folder that already holds a run needs ``--resume`` (continue it) or ``--overwrite`` (delete
that run's files, and only those, then start). ``--resume`` compares the command's configuration with
the one the newest checkpoint was trained with and refuses changes to what a step computes, naming
each; ``--allow-change FIELD`` accepts one deliberately (a new learning rate, say). Fields that only say
how long to train, how to log or how to load are free to change. The architecture (base model, adapter
layers, fusion, resolution) can never change: the checkpoint would not load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

RUN_FILES = ("config.json", "adapters.safetensors", "checkpoints", "tensorboard", "validation")
# Free on resume: they change how long the run goes, how it logs or loads data, not what a step computes.
# (micro_batch too: each rank still consumes global_batch / world samples of the same stream per step.)
FREE = frozenset({"data", "out", "max_steps", "log_every", "num_workers", "val_samples", "val_steps", "latents",
                  "micro_batch", "grad_checkpointing", "tf32", "keep_checkpoints"})
FIXED = frozenset({"base", "layers", "resolution", "fusion"})  # the checkpoint's architecture


class RunFolderError(ValueError):
    pass


def prepare(out: Path, resume: bool, overwrite: bool, delete: bool = True) -> None:
    """Checks that ``out`` may be used as asked; with ``overwrite``, deletes the previous run's files (where
    ``delete``: rank 0 only, the other ranks just accept the flag)."""
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is a file; give a folder for the run")
    found = [name for name in RUN_FILES if (out / name).exists()]
    if not found or resume:
        return
    if not overwrite:
        raise RunFolderError(f"--out {out} already holds a training run ({', '.join(found)}): pass --resume to "
                             "continue it, --overwrite to delete it and start again, or choose another --out")
    for name in found if delete else ():
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def changes(saved: dict[str, Any], new: dict[str, Any], allowed: set[str]) -> list[str]:
    """What ``new`` changes that a resumed run must not: one line per field, empty if nothing."""
    out = []
    for name in sorted(set(saved) | set(new)):
        before, after = saved.get(name), new.get(name)
        if isinstance(before, list):
            before = tuple(before)
        if isinstance(after, list):
            after = tuple(after)
        if name in ("resolution", "layers") and after is None:
            continue  # not given: the base model's own, which is what was saved
        if before == after or name in FREE:
            continue
        flag = "--" + name.replace("_", "-")
        if name in FIXED:
            out.append(f"{flag} {_show(before)} -> {_show(after)} (the checkpoint's architecture; cannot change)")
        elif name not in allowed:
            out.append(f"{flag} {_show(before)} -> {_show(after)}")
    return out


def _show(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def check_resume(checkpoint: Path, new: dict[str, Any], allowed: set[str]) -> None:
    saved = json.loads((checkpoint / "config.json").read_text())
    unknown = allowed - set(saved) - set(new)
    if unknown:
        raise RunFolderError(f"--allow-change {' '.join(sorted(unknown))}: no such config field")
    found = changes(saved, new, allowed)
    if found:
        fixable = [c for c in found if "cannot change" not in c]
        hint = (f"; to change them on purpose: --allow-change {' '.join(c.split()[0][2:].replace('-', '_') for c in fixable)}"
                if fixable and len(fixable) == len(found) else "")
        raise RunFolderError(f"--resume: this command changes what {checkpoint.name} was trained with: "
                             f"{'; '.join(found)}. Resume with the same flags{hint}, or start a new --out")
