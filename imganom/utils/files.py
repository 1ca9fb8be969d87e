"""Atomic file writes and JSON conversion shared by every writer (never a half-written file)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path in ``path``'s folder (parents created) that replaces ``path`` when the block ends
    without an error, and is removed otherwise: for writers that take a file name (safetensors, onnx)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes, *, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (``atomic_path``): readers see the old file or the whole new one.
    ``fsync=True`` also makes the content durable before the rename (the results tables, not each image)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def to_jsonable(obj: Any) -> Any:
    """Plain-JSON copy: numpy scalars/arrays unwrapped, Paths as str, NaN/inf as None."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return obj.as_posix()
    return obj


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON, atomically and durably."""
    text = json.dumps(to_jsonable(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    atomic_write_bytes(Path(path), text.encode("utf-8"), fsync=True)
