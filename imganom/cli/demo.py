"""``imganom demo``: synthetic data, the shipped demo model, an inspection and its report, offline."""

from __future__ import annotations

from pathlib import Path

import typer

from imganom.cli.common import console, setup


def demo(
    out: Path = typer.Option(Path("imganom-demo"), "--out", "-o", help="Folder for data and results."),
    train_if_missing: bool = typer.Option(
        True,
        "--train-if-missing/--no-train",
        help="Train the demo model if weights/demo.safetensors is absent.",
    ),
) -> None:
    """The whole story offline: synthetic data, the shipped demo model, inspection, report."""
    setup()
    from imganom.workflows.demo import run_demo

    summary, report = run_demo(out, train_if_missing=train_if_missing, log=console.print)
    c = summary["counts"]
    console.print(
        f"[bold]{c['total']} images inspected:[/bold] {c['ok']} OK, {c['ng']} NG, {c['error']} errors"
    )
    print(report)
