"""What the Inspector accepts as an image: a path, a numpy array (HW, HWC or CHW) or a PIL image, decoded
into the model's normalised CHW float32 with the model's channel count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from imganom.config import Config
from imganom.data.readers import ImageMeta, ImageReadError, normalize_intensity, read_image, read_options

InputLike = str | Path | np.ndarray | Any  # path, array (HW, HWC or CHW) or PIL image


def as_chw(x: np.ndarray, cfg: Config, name: str) -> np.ndarray:
    """A user array (HW, HWC with C<=4, or CHW) -> normalised float32 CHW with the model's channels."""
    a = np.asarray(x)
    if a.ndim == 2:
        a = a[None]
    elif a.ndim == 3 and a.shape[-1] <= 4 and a.shape[0] > 4:
        a = a.transpose(2, 0, 1)
    elif a.ndim != 3:
        raise ImageReadError(name, f"array must be HW, HWC or CHW, got shape {a.shape}")
    if a.size == 0:
        raise ImageReadError(name, "empty image")
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise ImageReadError(name, "contains NaN/Inf pixel values")
    a = normalize_intensity(a, cfg.preprocess.intensity, a.dtype)
    want = cfg.preprocess.channels
    if a.shape[0] != want and cfg.preprocess.channel_policy == "strict":
        raise ImageReadError(name, f"has {a.shape[0]} channels, model expects {want} (channel_policy=strict)")
    if a.shape[0] != want:
        if a.shape[0] == 1 and want == 3:
            a = np.repeat(a, 3, axis=0)
        elif a.shape[0] in (3, 4) and want == 1:
            a = (0.299 * a[0] + 0.587 * a[1] + 0.114 * a[2])[None]
        elif a.shape[0] == 4 and want == 3:
            a = a[:3]
        else:
            raise ImageReadError(name, f"has {a.shape[0]} channels, model expects {want}")
    return np.ascontiguousarray(a, dtype=np.float32)


def load_input(x: InputLike, cfg: Config, name: str | None = None) -> tuple[np.ndarray, ImageMeta]:
    """Decode a path / array / PIL image into the model's normalised CHW float32 and its metadata."""
    pp = cfg.preprocess
    if isinstance(x, (str, Path)):
        return read_image(x, **read_options(pp))
    name = name or "<array>"
    if hasattr(x, "mode") and hasattr(x, "size") and not isinstance(x, np.ndarray):  # PIL image
        x = np.asarray(x)
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a path, numpy array or PIL image, got {type(x).__name__}")
    chw = as_chw(x, cfg, name)
    if chw.shape[1] * chw.shape[2] > pp.max_pixels:
        raise ImageReadError(name, f"{chw.shape[2]}x{chw.shape[1]} exceeds max_pixels={pp.max_pixels}")
    meta = ImageMeta(
        path=name,
        original_size=tuple(chw.shape[1:]),
        dtype=str(np.asarray(x).dtype),
        channels=chw.shape[0],
        format="array",
    )
    return chw, meta
