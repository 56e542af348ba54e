"""A run folder belongs to one run, and a resume continues it only where the result is the same.

``--out`` (a folder or an object-store URL) holds one training run: its config, checkpoints, adapters and
validation grids (and TensorBoard's logs when it is a folder). Starting where a run already is needs
``--resume`` (continue it) or ``--overwrite`` (delete that run's files, and only those, then start). Rank 0
alone checks and writes ``--out``; the other ranks never read it (their nodes may not see it).

``--resume`` compares the command with the newest checkpoint and refuses what would make the resumed run
differ from the uninterrupted one, naming each change and why; ``--allow-change NAME`` accepts one on
purpose. Free: how long to train, how to log, where the data and the run are, and how the loader works
(``num_workers``): what a step sees is a function of the seed, the step and the rank's share of the global
batch only (training/data.py), so these change nothing, bit for bit. Refused by default:
  - what a step computes (``lr``, ``global_batch``, ``seed``, dropout, ``bf16``, ``tf32``, ...);
  - ``micro_batch`` and the world size (``world_size``): every step sees the same samples and draws, but the
    gradient is summed in another order (another micro-batch grouping, another reduction over ranks), so the
    result differs in the last bits;
  - the dataset (``dataset``): another set of committed shards is another order (a copy elsewhere is the same);
  - the target latents (``latents``, checked once the VAE is loaded): read from the cache or encoded on the fly.
The architecture (base model, adapter layers, fusion, resolution) can never change: the checkpoint would not load.
"""

from __future__ import annotations

from typing import Any

from dreamcache.cards import written_here
from dreamcache.store import Store

RUN_FILES = ("config.json", "adapters.safetensors", "checkpoints", "tensorboard", "validation")
CARD = "README.md"  # the model card beside the adapters, the run's when the toolkit wrote it
# Free on resume: how long the run goes, how it logs, where things are and how the loader works.
FREE = frozenset({"data", "out", "max_steps", "log_every", "num_workers", "val_samples", "val_steps", "latents",
                  "keep_checkpoints", "checkpoint_every", "tensorboard"})
FIXED = frozenset({"base", "layers", "resolution", "fusion"})  # the checkpoint's architecture
# Why a field outside FREE changes the result, where it is not the plain "a step computes something else".
WHY = {"micro_batch": ("the same samples and draws per step, the gradient summed in another order: the result "
                       "differs in the last bits"),
       "grad_checkpointing": "the same loss, recomputed: the gradient may differ in the last bits",
       "tf32": "matmul precision on the GPU",
       "compile": "the same computation compiled: the result differs in the last bits",
       "compile_backend": "the same computation compiled: the result differs in the last bits",
       "channels_last": "the same computation in another memory layout: the result differs in the last bits",
       "reference_latents": ("each reference one of K augmentations drawn in advance, or a fresh one every step: "
                             "the steps see other reference views")}
# Fields added after checkpoints were written without them: such a checkpoint ran with the default.
ADDED = {"compile": False, "compile_backend": "inductor", "reference_latents": False, "channels_last": False}
RUN_FIELDS = frozenset({"world_size", "dataset", "latents"})  # --allow-change names recorded in run.json


class RunFolderError(ValueError):
    pass


def prepare(store: Store, resume: bool, overwrite: bool) -> None:
    """Checks that ``store`` may be used as asked; with ``overwrite``, deletes the previous run's files."""
    if store.fs.isfile(store.root):
        raise RunFolderError(f"--out {store.uri} is a file; give a folder for the run")
    found = [name for name in RUN_FILES if store.exists(name)]
    if found and store.exists(CARD) and written_here(store.read_bytes(CARD).decode("utf-8", "replace")):
        found.append(CARD)  # the run's model card (a README.md of the user's own is not the run's)
    if not found or resume:
        return
    if not overwrite:
        raise RunFolderError(f"--out {store.uri} already holds a training run ({', '.join(found)}): pass --resume "
                             "to continue it, --overwrite to delete it and start again, or choose another --out")
    for name in found:
        store.fs.rm(store.path(name), recursive=True)


def changes(saved: dict[str, Any], new: dict[str, Any], allowed: set[str]) -> list[str]:
    """What ``new`` changes that a resumed run must not: one line per field, empty if nothing."""
    out = []
    for name in sorted(set(saved) | set(new)):
        before, after = saved.get(name, ADDED.get(name)), new.get(name)
        if isinstance(before, list):
            before = tuple(before)
        if isinstance(after, list):
            after = tuple(after)
        if name in ("resolution", "layers") and after is None:
            continue  # not given: the base model's own, which is what was saved
        if before == after or name in FREE:
            continue
        if name == "compile_backend" and not saved.get("compile") and not new.get("compile"):
            continue  # a backend never used
        flag = "--" + name.replace("_", "-")
        if name in FIXED:
            out.append(f"{flag} {_show(before)} -> {_show(after)} (the checkpoint's architecture; cannot change)")
        elif name not in allowed:
            out.append(f"{flag} {_show(before)} -> {_show(after)}" + (f" ({WHY[name]})" if name in WHY else ""))
    return out


def run_changes(saved: dict[str, Any] | None, now: dict[str, Any], allowed: set[str]) -> list[str]:
    """What the run itself changes (run.json: world size, dataset) that an exact resume must not."""
    if saved is None:
        return [] if "dataset" in allowed else [(
            "dataset: the checkpoint does not record its data order (written by an earlier trainer), so the resumed "
            "run would see other samples")]
    out = []
    if saved["world_size"] != now["world_size"] and "world_size" not in allowed:
        out.append(f"world_size {saved['world_size']} -> {now['world_size']} ranks (the same samples and draws per "
                   "step, each rank a contiguous share of the global batch, the gradient reduced in another order: "
                   "the result differs in the last bits)")
    if saved["dataset"] != now["dataset"] and "dataset" not in allowed:
        out.append(f"dataset {_dataset(saved['dataset'])} -> {_dataset(now['dataset'])} (other committed shards: "
                   "another order, other samples at every step)")
    return out


def latents_change(saved: dict[str, Any] | None, used: str, allowed: set[str]) -> list[str]:
    """The latents' source on resume ("cache" | "vae", and "cache+K reference views" with --reference-latents)
    against the checkpoint's."""
    if saved is None or saved.get("latents", used) == used or "latents" in allowed:
        return []
    return [(f"latents {saved['latents']} -> {used} (targets read from the latent cache or VAE-encoded: they differ "
             "at fp16 precision; references from K views drawn in advance: another K draws others; --no-latents, "
             "--reference-latents or python -m training.encode decide which)")]


def _dataset(d: dict[str, Any]) -> str:
    return f"{d['shards']} shards/{d['samples']} samples/{d['sha256']}"


def _show(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def refuse(found: list[str], checkpoint: str) -> None:
    """Raises the one error that names every refused change, and how to accept those that may change."""
    if not found:
        return
    fixable = [c for c in found if "cannot change" not in c]
    names = [c.split()[0].removeprefix("--").removesuffix(":").replace("-", "_") for c in fixable]
    hint = (f"; to change them on purpose: --allow-change {' '.join(names)}"
            if fixable and len(fixable) == len(found) else "")
    raise RunFolderError(f"--resume: this command changes what {checkpoint} was trained with: {'; '.join(found)}. "
                         f"Resume with the same flags{hint}, or start a new --out")


def check_resume(checkpoint: str, saved: dict[str, Any], run: dict[str, Any] | None, new: dict[str, Any],
                 now: dict[str, Any], allowed: set[str]) -> None:
    """Refuses a resume from ``checkpoint`` (its config ``saved`` and run.json ``run``: ``checkpoints.read_run``)
    whose config (``new``) or run (``now``: world size, dataset) differs from the checkpoint's in what is not
    free, unless ``allowed``."""
    unknown = allowed - set(saved) - set(new) - RUN_FIELDS
    if unknown:
        raise RunFolderError(f"--allow-change {' '.join(sorted(unknown))}: no such config field (or world_size, "
                             "dataset, latents)")
    refuse(changes(saved, new, allowed) + run_changes(run, now, allowed), checkpoint)
