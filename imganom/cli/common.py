"""What every ``imganom`` command shares: the stderr console, exit codes, ``fail`` and logging setup."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, NoReturn

import typer
from rich.console import Console

console = Console(stderr=True)
EXIT_RUNTIME, EXIT_USAGE, EXIT_NG, EXIT_INTERRUPTED = 1, 2, 3, 130


def fail(msg: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print ``error: msg`` to stderr and exit with ``code`` (2: usage/config/model error, 1: runtime)."""
    console.print(f"[red]error:[/red] {msg}")
    raise typer.Exit(code)


def setup(verbose: bool = False) -> None:
    """Quiet third-party noise and configure logging (INFO with ``--verbose``)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )


def progress_bar(label: str, *columns: Any) -> Any:
    """A rich progress bar on stderr (label, bar, done/total, ``columns``, elapsed), drawn only on a TTY."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        *columns,
        TimeElapsedColumn(),
        console=console,
        disable=not sys.stderr.isatty(),
    )
