"""The ``imganom train`` progress bar (rich), fed by the trainer's progress callback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from imganom.cli.common import console
from imganom.training.trainer import EpochProgress, ProgressFn


@contextmanager
def train_progress(enabled: bool = True) -> Iterator[ProgressFn | None]:
    """A callback for ``train(progress=...)`` that draws one bar per epoch; None when not ``enabled``."""
    if not enabled:
        yield None
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[ips]:.0f} img/s"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    with bar:
        task = bar.add_task("train", total=None, loss=float("nan"), ips=0.0)

        def update(p: EpochProgress) -> None:
            desc = f"epoch {p.epoch}/{p.epochs}"
            bar.update(
                task, description=desc, completed=p.done, total=p.total, loss=p.loss, ips=p.images_per_s
            )

        yield update
