"""``imganom info``: a model file's metadata as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from imganom.cli.common import fail


def info(model: Path = typer.Argument(..., help="Model file or run directory.")) -> None:
    """Print a model file's metadata as JSON."""
    from dataclasses import asdict

    from imganom.formats.modelfile import ModelFileError, read_meta

    try:
        meta = read_meta(model)
    except ModelFileError as e:
        fail(str(e))
    print(json.dumps(asdict(meta), indent=2, default=str))
