"""Checkpoints of a training run, on local disk or an object store: written with a completion marker last,
found again by listing, loaded by rank 0 and broadcast to every rank.

    OUT/checkpoints/step-00001000/adapters.safetensors   the adapters, with their metadata (base, layers, ...)
                                  trainer.pt             the optimizer state
                                  config.json            the resolved TrainConfig
                                  run.json               the step, world size, dataset, data position and digest
                                  COMPLETE               written last: only then is the folder a checkpoint
    OUT/adapters.safetensors                              the newest adapters, replaced whole
    OUT/README.md                                         their model card (dreamcache/cards.py), replaced with them

On a filesystem the folder is filled under a temporary name and renamed into place; on an object store, where a
rename is a copy, each file is staged on local disk and uploaded to its final key, then ``COMPLETE`` is
written. A checkpoint is whatever ``COMPLETE`` marks, in both cases (torchtitan's rule).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import posixpath
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from dreamcache.adapter import save_adapters
from dreamcache.cards import model_card, written_here
from dreamcache.hub import CARD_FILE
from dreamcache.store import Store, atomic_folder
from manifests.schema import read_index
from training.config import TrainConfig
from training.distributed import agree, all_ranks_digest
from training.runs import RunFolderError, latents_change, refuse

CHECKPOINTS, COMPLETE = "checkpoints", "COMPLETE"


class CheckpointManager:
    """The checkpoints as the training loop uses them: the state a run resumes from (read by rank 0 from its
    ``--out``, which only rank 0 need hold, and broadcast to every rank) and one every ``--checkpoint-every``
    steps and at the last (written by rank 0)."""

    def __init__(self, out: Store, cfg: TrainConfig, rank: int, world: int, device: torch.device):
        self.out, self.cfg, self.rank, self.world, self.device = out, cfg, rank, world, device

    def resume(self, name: str | None, latents: str, allowed: set[str]) -> dict[str, Any] | None:
        """Checkpoint ``name``'s state (``load_checkpoint``) on every rank, or None to start at step 0 (no
        ``name``). ``latents``: where this run's target latents come from ("cache" or "vae"), which a resume may
        change only when ``allowed``. Raises RunFolderError on every rank when rank 0 cannot resume."""
        state, error = None, None
        if self.rank == 0 and name:
            try:
                refuse(latents_change(read_run(self.out, name)[1], latents, allowed), name)
                state = load_checkpoint(self.out, name)
            except RunFolderError as e:
                error = e
            except Exception as e:  # noqa: BLE001 - every rank must hear of it, or they wait in the broadcast forever
                where = self.out.url(CHECKPOINTS, name)
                if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):  # the store failed, not the file
                    error = RunFolderError(f"checkpoint {where} could not be read ({type(e).__name__}: {e}): the store "
                                           "failed, not the checkpoint; run the same command again once it answers")
                else:
                    error = RunFolderError(f"checkpoint {where} cannot be loaded ({type(e).__name__}: {e}); move that "
                                           "folder aside to resume from the one before it")
        error = agree(error, self.world)
        if error is not None:
            raise error
        if self.world > 1:  # rank 0's checkpoint (or None) on every rank: all start from the same step and weights
            state = broadcast_state(state, self.device)
        return state

    def due(self, step: int) -> bool:
        return step % self.cfg.checkpoint_every == 0 or step == self.cfg.max_steps

    def save(self, unet, opt, run: dict[str, Any]) -> int:
        """Checkpoint ``run["step"]``, with the digest of the keys every rank has read (a collective: every rank
        calls it); returns that digest."""
        digest = all_ranks_digest(run["digest"], self.world, self.device)
        if self.rank == 0:
            save_checkpoint(self.out, unet, opt, self.cfg, {**run, "digest": f"{digest:012x}"})
        return digest


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(store: Store) -> list[str]:
    """Names of the complete checkpoints, oldest first (one listing)."""
    store.fs.invalidate_cache()  # an object store's listing cache may predate the last upload
    found = store.fs.glob(store.path(CHECKPOINTS, "step-*", COMPLETE))
    return sorted(posixpath.basename(posixpath.dirname(p.rstrip("/"))) for p in found)


def newest_checkpoint(store: Store) -> str | None:
    done = complete_checkpoints(store)
    return done[-1] if done else None


def recipe_metadata(cfg: TrainConfig) -> dict[str, str]:
    """What personalisation and generation must repeat, stored with the adapters (the fusion is saved with
    the adapters themselves)."""
    return {"resolution": str(cfg.resolution), "cache_timestep": str(cfg.cache_timestep),
            "cache_prompt": cfg.cache_prompt, "references": str(cfg.references)}


def save_checkpoint(store: Store, unet, opt, cfg: TrainConfig, run: dict[str, Any]) -> str:
    """Writes checkpoint ``run["step"]`` and OUT/adapters.safetensors; returns the checkpoint's URL. Rank 0
    alone writes checkpoints."""
    step = run["step"]
    name = checkpoint_name(step)
    config = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    meta = {"base": cfg.base, "step": str(step), **recipe_metadata(cfg),
            "config_sha256": hashlib.sha256(config.encode()).hexdigest()[:16]}

    def fill(folder: Path) -> None:
        save_adapters(unet, str(folder / "adapters.safetensors"), meta)
        torch.save({"optimizer": opt.state_dict(), "step": step}, folder / "trainer.pt")
        (folder / "config.json").write_text(config)
        (folder / "run.json").write_text(json.dumps(run, indent=1, sort_keys=True))

    if not store.object_store:  # filled beside, renamed into place; COMPLETE inside before the rename
        with atomic_folder(store.path(CHECKPOINTS, name), only_writer=True) as tmp:
            fill(Path(tmp))
            (Path(tmp) / COMPLETE).write_text("ok\n")
        adapters = Path(store.path(CHECKPOINTS, name, "adapters.safetensors"))
        store.write_atomic(adapters.read_bytes(), "adapters.safetensors")
        write_card(store, adapters, cfg, run)
    else:  # staged on local disk, each file uploaded to its final key, COMPLETE last
        with tempfile.TemporaryDirectory(prefix="dreamcache-checkpoint-") as tmp:
            fill(Path(tmp))
            for file in sorted(Path(tmp).iterdir()):
                store.upload(str(file), CHECKPOINTS, name, file.name)
            store.write_atomic(b"ok\n", CHECKPOINTS, name, COMPLETE)
            store.upload(str(Path(tmp) / "adapters.safetensors"), "adapters.safetensors")
            write_card(store, Path(tmp) / "adapters.safetensors", cfg, run)
    if cfg.keep_checkpoints:
        prune_checkpoints(store, cfg.keep_checkpoints)
    return store.url(CHECKPOINTS, name)


def write_card(store: Store, adapters: Path, cfg: TrainConfig, run: dict[str, Any]) -> None:
    """OUT/README.md: the model card of the adapter file ``adapters`` (local: the checkpoint's copy), trained by
    ``cfg`` as far as ``run``. A README.md the toolkit did not write is the user's and stays; a card that cannot
    be made is a warning, never the end of a run."""
    from dreamcache.generation import file_sha256, read_safetensors

    try:
        if store.exists(CARD_FILE) and not written_here(store.read_bytes(CARD_FILE).decode("utf-8", "replace")):
            print(f"warning: {store.url(CARD_FILE)} is not a model card this toolkit wrote: left as it is (python -m "
                  "training.export writes the card into a folder of its own)", file=sys.stderr, flush=True)
            return
        meta, _ = read_safetensors(adapters, "adapter file", "write the checkpoint again", tensors=False)
        name = store.url() if store.local else "adapters.safetensors"  # an object store: once downloaded
        text = model_card(meta, training_facts(cfg, run), name=name, sha256=file_sha256(adapters))
        store.write_atomic(text.encode(), CARD_FILE)
    except Exception as e:  # noqa: BLE001 - the card describes the checkpoint; it must not stop the run
        print(f"warning: the model card was not written ({type(e).__name__}: {e})", file=sys.stderr, flush=True)


def training_facts(cfg: TrainConfig | dict[str, Any], run: dict[str, Any] | None) -> dict[str, Any]:
    """What a model card says of the training: data, its identity and pipeline fingerprint, steps, batch, rate."""
    config = cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg)
    facts = {"data": config.get("data"), "dataset": (run or {}).get("dataset"), "steps": (run or {}).get("step"),
             "global_batch": config.get("global_batch"), "lr": config.get("lr")}
    try:  # the pipeline's fingerprint of the dataset's configuration, where its dataset.json can be read
        index = read_index(Store(config["data"])) if config.get("data") else None
        facts["data_fingerprint"] = index.get("fingerprint") if isinstance(index, dict) else None
    except Exception:  # noqa: BLE001 - a fact a card can do without
        facts["data_fingerprint"] = None
    return {k: v for k, v in facts.items() if v is not None}


def read_run(store: Store, name: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the checkpoint's config, its run.json; None for a checkpoint written before run.json existed)."""
    config = json.loads(store.read_bytes(CHECKPOINTS, name, "config.json"))
    run = None
    if store.exists(CHECKPOINTS, name, "run.json"):
        run = json.loads(store.read_bytes(CHECKPOINTS, name, "run.json"))
    return config, run


def load_checkpoint(store: Store, name: str) -> dict[str, Any]:
    """{"adapters": state dict, "optimizer": state dict, "step": int, "run": run.json (None if the checkpoint
    predates it)}, every tensor on the CPU."""
    from safetensors.torch import load

    trainer = torch.load(io.BytesIO(store.read_bytes(CHECKPOINTS, name, "trainer.pt")), map_location="cpu",
                         weights_only=True)
    return {"adapters": load(store.read_bytes(CHECKPOINTS, name, "adapters.safetensors")),
            "optimizer": trainer["optimizer"], "step": trainer["step"], "run": read_run(store, name)[1]}


def prune_checkpoints(store: Store, keep: int) -> list[str]:
    """Deletes all but the ``keep`` newest complete checkpoints (the newest is written before any is deleted,
    so a crash here leaves at least ``keep``); returns what was deleted."""
    old = complete_checkpoints(store)[:-keep]
    for name in old:
        store.remove(CHECKPOINTS, name, COMPLETE)  # first: a half-deleted folder is never taken for a checkpoint
        store.fs.rm(store.path(CHECKPOINTS, name), recursive=True)
    return old


def broadcast_state(state: dict[str, Any] | None, device: torch.device) -> dict[str, Any]:
    """Rank 0's ``state`` (nested dicts and lists of tensors and plain values) on every rank: its structure in
    one object broadcast, then each tensor (through ``device``: NCCL moves GPU tensors only). Tensors come back
    on the CPU, as ``load_checkpoint`` gives them to rank 0."""
    import torch.distributed as dist

    tensors: list[torch.Tensor] = []

    def strip(x):
        if isinstance(x, torch.Tensor):
            tensors.append(x)
            return _Slot(len(tensors) - 1, tuple(x.shape), x.dtype)
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(strip(v) for v in x)
        return x

    rank = dist.get_rank()
    box = [strip(state) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0, device=device)
    received = []
    for slot in _slots(box[0]):
        t = tensors[slot.index].to(device) if rank == 0 else torch.empty(slot.shape, dtype=slot.dtype, device=device)
        dist.broadcast(t, src=0)
        received.append(t.cpu())

    def fill(x):
        if isinstance(x, _Slot):
            return received[x.index]
        if isinstance(x, dict):
            return {k: fill(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(fill(v) for v in x)
        return x

    return fill(box[0])


@dataclasses.dataclass(frozen=True)
class _Slot:
    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def _slots(x) -> list[_Slot]:
    """Every _Slot in a structure, in index order."""
    if isinstance(x, _Slot):
        return [x]
    values = x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple)) else ()
    return sorted((s for v in values for s in _slots(v)), key=lambda s: s.index)
