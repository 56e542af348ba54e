"""The ranks of a training run: torchrun's process group, and how the ranks agree before they diverge.

Every rank runs the same checks; an error on one stops them all (``agree``) with the same message, printed once
by rank 0 (``stop``). Collectives are called by every rank or by none.
"""

from __future__ import annotations

import gc
import os
import weakref

import torch

from dreamcache.usage import fail
from training.data import DIGEST_BITS
from training.runs import RunFolderError


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; a single process without it."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device


def agree(error: BaseException | None, world: int) -> BaseException | None:
    """The first rank's error, on every rank (None when no rank has one)."""
    if world == 1:
        return error
    errors: list = [None] * world
    torch.distributed.all_gather_object(errors, None if error is None else str(error))
    first = next(((r, e) for r, e in enumerate(errors) if e is not None), None)
    if first is None:
        return None
    return error if error is not None and first[0] == torch.distributed.get_rank() else RunFolderError(
        f"rank {first[0]}: {first[1]}")


def from_rank0(world: int, rank: int, compute):
    """``compute()`` run by rank 0 alone, its result on every rank (reads every rank would repeat: one GET per
    shard instead of one per shard and rank). An error on rank 0 is raised there, and named on the others."""
    if world == 1:
        return compute()
    box: list = [None]
    if rank == 0:
        try:
            box[0] = (True, compute())
        except Exception as e:
            box[0] = (False, f"{type(e).__name__}: {e}")
            torch.distributed.broadcast_object_list(box, src=0)
            raise
    torch.distributed.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise RuntimeError(f"rank 0: {value}")
    return value


def differing(identity: dict, world: int) -> RunFolderError | None:
    """The same error on every rank when the ranks' ``--data`` are not the same committed shards (a node-local
    copy of another version): each rank would read other samples at the same positions."""
    identities: list = [None] * world
    torch.distributed.all_gather_object(identities, identity)
    other = [r for r, i in enumerate(identities) if i != identities[0]]
    if not other:
        return None
    return RunFolderError(f"--data: rank {other[0]} sees {identities[other[0]]}, rank 0 {identities[0]}: every rank "
                          "must read the same committed shards (one dataset URL, or identical copies)")


def stop(world: int, error: BaseException | None) -> int:
    """Ends the process group; rank 0 prints the error (the others' copies would repeat it)."""
    if world > 1:
        torch.distributed.destroy_process_group()
    return fail(error) if error is not None else 2


def all_ranks_digest(mine: int, world: int, device: torch.device) -> int:
    """The digest of every key every rank has seen (a sum modulo 2^48, so it does not depend on the grouping)."""
    if world == 1:
        return mine
    total = torch.tensor([mine], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(total)
    return int(total.item()) % (1 << DIGEST_BITS)


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def end(world: int, ddp: weakref.ref | None = None) -> None:
    """Ends the process group at the end of a run, once the DDP model (``ddp``: a weak reference to it) is gone.
    A DDP Reducer still alive would be the group's last holder and destroy it later holding the GIL, while a gloo
    worker thread may need the GIL to free a finished collective's tensors: the join in the group's destructor
    then never returns (pytorch#56297; seen once at the end of a 2-rank CPU run). Destroyed here, the group is
    freed by its Python binding, which releases the GIL."""
    if world == 1:
        return
    gc.collect()  # DDP's reference cycles, and its Reducer with them, freed now rather than at a later collection
    if ddp is not None and ddp() is not None:
        raise RuntimeError("the DDP model outlives the training loop: drop every reference to it before end()")
    torch.distributed.destroy_process_group()
