"""Data-parallel training under torchrun (``torch.distributed``, DDP): the glue the trainer needs.

``torchrun --nproc-per-node N -m imganom train ...`` (or ``imganom train --nproc N``, which runs exactly that)
starts N processes; each calls ``context()``, which joins the process group (gloo on the CPU, NCCL on CUDA,
one GPU per local rank). A plain ``imganom train`` has no ``WORLD_SIZE`` in its environment: ``context()``
then returns the single-process context, which initialises nothing and changes nothing (``wrap`` returns the
model, ``shuffling`` the trainer's own shuffled order, the means are the values themselves).

Each rank sees its share of every epoch (``DistributedSampler``, seeded with ``train.seed`` and the epoch);
``train.batch_size`` stays the global batch (each rank takes ``batch_size / world``), DDP averages the
gradients, and rank 0 alone writes the log, checkpoints and the model file. Checkpoints hold the unwrapped
model at epoch boundaries, so ``--resume`` works with any number of processes.
"""

from __future__ import annotations

import atexit
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run: ``rank`` of ``world`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def primary(self) -> bool:
        """True on the process that writes (rank 0; the only one without torchrun)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def device(self, dev: torch.device) -> torch.device:
        """``dev``, or on CUDA under DDP this rank's GPU (``cuda:LOCAL_RANK``)."""
        if self.distributed and dev.type == "cuda":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return dev

    def local_batch(self, batch: int) -> int:
        """This rank's batch for a global ``batch`` (at least 1 under DDP)."""
        return max(1, batch // self.world) if self.distributed else batch

    def local_count(self, n: int) -> int:
        """Images per epoch on this rank (``DistributedSampler`` pads to equal shares)."""
        return math.ceil(n / self.world)

    def wrap(self, model: torch.nn.Module, dev: torch.device) -> torch.nn.Module:
        """``model`` in DDP when distributed (gradients averaged across ranks), else ``model`` itself."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [dev.index] if dev.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def shuffling(self, data: Dataset, generator: torch.Generator, seed: int, epoch: int) -> dict[str, Any]:
        """DataLoader keywords for one epoch's order: the trainer's seeded shuffle in one process, this rank's
        share of a seeded ``DistributedSampler`` permutation under DDP."""
        if not self.distributed:
            return {"shuffle": True, "generator": generator}
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(data, num_replicas=self.world, rank=self.rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return {"sampler": sampler}

    def mean(self, values: dict[str, float], count: int) -> tuple[dict[str, float], int]:
        """Image-weighted means of per-rank ``values`` over all ranks, and the total ``count``."""
        if not self.distributed:
            return values, count
        import torch.distributed as dist

        keys = sorted(values)
        t = torch.tensor([values[k] * count for k in keys] + [float(count)], dtype=torch.float64)
        t = t.to(_comm_device())
        dist.all_reduce(t)
        t = t.cpu()
        total = float(t[-1])
        return {k: float(t[i]) / max(total, 1.0) for i, k in enumerate(keys)}, int(total)

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (e.g. "stop now"), so no rank leaves the loop alone."""
        if not self.distributed:
            return flag
        import torch.distributed as dist

        t = torch.tensor([int(flag)], dtype=torch.int64, device=_comm_device())
        dist.broadcast(t, src=0)
        return bool(t.item())


def _comm_device() -> torch.device:
    import torch.distributed as dist

    nccl = dist.get_backend() == "nccl"
    return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


def context(device: str = "auto") -> DistContext:
    """The single-process context, or under torchrun (``WORLD_SIZE`` > 1) this rank's, joining the process
    group first (once; left at exit): NCCL when training on CUDA, gloo otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    import torch.distributed as dist

    ctx = DistContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and not device.startswith("cpu")
        if cuda and ctx.local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"torchrun started more processes on this node than its {torch.cuda.device_count()} GPUs: "
                "use --nproc-per-node (or --nproc) <= the GPU count, or --device cpu"
            )
        if cuda:
            torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        atexit.register(_leave)
    return ctx


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def is_primary() -> bool:
    """True unless this process is a torchrun rank other than 0."""
    return int(os.environ.get("RANK", "0")) == 0


def world_notes() -> dict[str, Any]:
    """What the model file records about a torchrun run (``training.distributed``); {} in one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return {"distributed": {"world_size": world, "backend": "ddp"}} if world > 1 else {}


def torchrun_command(argv: list[str], nproc: int) -> list[str]:
    """The torchrun command line that runs ``imganom`` with ``argv`` (``--nproc`` removed) in ``nproc``
    processes on this machine (a free rendezvous port: ``--standalone``)."""
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [*run, "-m", "imganom", *args]
