"""Helpers shared by the test modules (paths, the CLI command and its environment)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository
PACKAGE = ROOT / "imganom"
TINY_EPOCHS = 4  # epochs of the session's tiny model (conftest.tiny_model)


def cli_env() -> dict[str, str]:
    """Environment for ``imganom`` subprocesses: quiet albumentations, few threads, no colour codes."""
    env = dict(os.environ)
    env.update(NO_ALBUMENTATIONS_UPDATE="1", OMP_NUM_THREADS="1", NO_COLOR="1", COLUMNS="200")
    return env


def imganom_cmd(*args: str) -> list[str]:
    """The installed ``imganom`` console script next to this interpreter (falls back to ``-m``)."""
    exe = Path(sys.executable).with_name("imganom")
    if exe.is_file():
        return [str(exe), *args]
    return [sys.executable, "-m", "imganom.cli", *args]
