"""What a training run reports: a line every ``--log-every`` steps (loss, samples/s, memory, skipped samples)
and the same scalars in TensorBoard, from rank 0; with --compile, the graphs compiled and any recompile."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from dreamcache.store import Store
from training.config import TrainConfig


class Metrics:
    """The loop's reporting. ``log`` is called by every rank at every step: on a logging step the ranks' loss
    and skipped samples are averaged and summed (one collective; none on the other steps)."""

    def __init__(self, cfg: TrainConfig, out: Store, rank: int, world: int, device: torch.device):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.folder = tensorboard_dir(cfg, out)
        self.writer = _tensorboard(self.folder) if rank == 0 else None
        self.started, self.seen = time.monotonic(), 0
        self.graphs: int | None = None  # --compile: graphs of the training steps, counted after the first step
        self.recompiles = self.elsewhere = 0  # graphs compiled after the first step; during checkpoints

    def start(self) -> None:
        """The loop begins: samples/s counts from here (not the models' loading, the loader's start, validation's)."""
        self.started, self.seen = time.monotonic(), 0

    def count(self, samples: int) -> None:
        """``samples`` more trained on, over every rank."""
        self.seen += samples

    def log(self, step: int, loss: torch.Tensor, skipped: int) -> None:
        """``loss``: this rank's mean over the step's micro-batches, a tensor on the device, read (a host
        synchronisation) on logging steps only; ``skipped``: this rank's replaced samples."""
        cfg = self.cfg
        if cfg.compile:
            self._graphs(step)
        if step % cfg.log_every and step != cfg.max_steps:
            return
        if self.world > 1:  # the mean loss over ranks, not rank 0's, and every rank's skipped samples
            stats = torch.stack([loss.detach().double(), torch.tensor(float(skipped), dtype=torch.float64,
                                                                        device=loss.device)])
            torch.distributed.all_reduce(stats)
            loss, skipped = stats[0].item() / self.world, int(stats[1].item())
        else:
            loss = float(loss)
        if self.rank != 0:
            return
        rate = self.seen / (time.monotonic() - self.started)
        mem = torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else 0.0
        print(f"step {step}/{cfg.max_steps} loss {loss:.4f} lr {cfg.lr:g} {rate:.1f} samples/s "
              f"mem {mem:.1f} GiB skipped {skipped}", flush=True)
        for k, v in {"loss": loss, "lr": cfg.lr, "samples_per_s": rate, "memory_gib": mem, "skipped": skipped}.items():
            self.scalar(f"train/{k}", v, step)

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.writer:
            self.writer.add_scalar(name, value, step)

    def _graphs(self, step: int) -> None:
        """--compile: the graphs the first step compiled, then a warning for every step that compiled more."""
        from training.models import compiled_graphs

        now = compiled_graphs() - self.elsewhere
        if self.graphs is None:
            self.graphs = now
            if self.rank == 0:
                print(f"torch.compile: {now} graph(s) for the training step ({self.cfg.compile_backend})", flush=True)
        elif now > self.graphs:
            self.recompiles += now - self.graphs
            if self.rank == 0:
                print(f"warning: torch.compile compiled {now - self.graphs} more graph(s) at step {step}: an input's "
                      "shape, type or grad mode changed since the first step", flush=True)
            self.graphs = now

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (checkpoints, validation) is not training time: samples/s leaves it out, and the
        graphs validation compiles are not the training step's."""
        from training.models import compiled_graphs

        paused, graphs = time.monotonic(), compiled_graphs()
        try:
            yield
        finally:
            self.started += time.monotonic() - paused
            self.elsewhere += compiled_graphs() - graphs

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.cfg.compile and self.rank == 0 and self.graphs is not None:
            print(f"torch.compile: {self.graphs} graph(s) for the training step; {self.recompiles} compiled after "
                  "the first step", flush=True)


def tensorboard_dir(cfg: TrainConfig, out: Store) -> str:
    """TensorBoard writes local files: --tensorboard, OUT/tensorboard, or for a run on an object store
    ./tensorboard/<bucket>/<prefix>."""
    if cfg.tensorboard:
        return cfg.tensorboard
    if out.local:
        return out.path("tensorboard")
    return str(Path("tensorboard") / out.uri.split("://", 1)[1].strip("/"))


def _tensorboard(folder: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(folder)
