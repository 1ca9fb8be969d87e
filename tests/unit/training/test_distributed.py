"""``training.distributed`` outside torchrun: the single-process context changes nothing; the torchrun command
line ``imganom train --nproc N`` runs."""

from __future__ import annotations

import sys

import torch

from imganom.training.distributed import DistContext, context, torchrun_command, world_notes


def test_single_process_context_is_a_no_op(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = context("cpu")
    assert ctx == DistContext() and ctx.primary and not ctx.distributed
    assert not torch.distributed.is_initialized()  # no process group in one process
    model = torch.nn.Linear(2, 2)
    assert ctx.wrap(model, torch.device("cpu")) is model
    g = torch.Generator()
    assert ctx.shuffling([1, 2, 3], g, 0, 5) == {"shuffle": True, "generator": g}
    assert ctx.local_batch(16) == 16 and ctx.local_count(10) == 10
    assert ctx.mean({"loss": 1.5}, 7) == ({"loss": 1.5}, 7) and ctx.agree(True) is True
    assert world_notes() == {}


def test_ranks_split_the_global_batch_and_the_epoch() -> None:
    ctx = DistContext(rank=1, world=4, local_rank=1)
    assert not ctx.primary and ctx.distributed
    assert ctx.local_batch(16) == 4 and ctx.local_batch(2) == 1
    assert ctx.local_count(10) == 3  # DistributedSampler pads to equal shares
    order = ctx.shuffling(list(range(10)), torch.Generator(), seed=3, epoch=2)["sampler"]
    again = ctx.shuffling(list(range(10)), torch.Generator(), seed=3, epoch=2)["sampler"]
    assert list(order) == list(again) and len(list(order)) == 3  # seeded: every rank agrees on the split


def test_torchrun_command_drops_nproc() -> None:
    cmd = torchrun_command(["train", "--data", "d", "--nproc", "2", "--epochs", "3", "--nproc=2"], 2)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=2" in cmd and "--standalone" in cmd
    assert cmd[cmd.index("-m", 3) :] == ["-m", "imganom", "train", "--data", "d", "--epochs", "3"]
