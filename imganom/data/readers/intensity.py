"""Raw pixel values -> float32 in [0, 1] (``normalize_intensity``), and back to 8-bit RGB for previews."""

from __future__ import annotations

import numpy as np

from imganom.config import IntensityConfig

PERCENTILE_SAMPLE = 1 << 24  # percentiles of larger images use an evenly strided sample of this size
_FLOAT32_SAFE = 1e30  # windows within +-this are computed in float32 without overflow


def normalize_intensity(arr: np.ndarray, cfg: IntensityConfig, dtype: np.dtype) -> np.ndarray:
    """Map raw pixel values to float32 in [0, 1] according to ``cfg.mode``.

    'dtype': unsigned ints / dtype max, floats kept if already in [0, 1] else min-max, signed ints min-max.
    'percentile': window [p_low, p_high] computed per image over all channels together (keeps the colour
    balance). 'fixed': window [low, high] in raw units. 'foreground': per channel, [low, high] robust
    standard deviations around the foreground median (``foreground_window``). Flat images give zeros.
    ``dtype`` selects the 'dtype' rule (pass the stored dtype); NaN/Inf values raise ``ValueError``.
    """
    dt = np.dtype(dtype)
    if arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    if arr.dtype.kind not in "uif":
        raise ValueError(f"unsupported pixel dtype {arr.dtype}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError("contains NaN/Inf pixel values")
    if cfg.mode == "fixed":
        return window(arr, cfg.low, cfg.high)
    if cfg.mode == "percentile":
        lo, hi = np.percentile(_sample(arr), [cfg.low, cfg.high])
        return window(arr, float(lo), float(hi))
    if cfg.mode == "foreground":
        return foreground_window(arr, cfg.low, cfg.high)
    if dt.kind == "b":
        return _float32(arr)
    if dt.kind == "u":
        return window(arr, 0.0, float(np.iinfo(dt).max))
    lo, hi = float(arr.min()), float(arr.max())
    if dt.kind == "f" and lo >= 0.0 and hi <= 1.0:
        return _float32(arr)
    return window(arr, lo, hi)


def _sample(arr: np.ndarray) -> np.ndarray:
    """All values of ``arr`` flattened, or an evenly strided sample of ``PERCENTILE_SAMPLE`` of them."""
    flat = arr.reshape(-1)
    return flat[:: -(-flat.size // PERCENTILE_SAMPLE)] if flat.size > PERCENTILE_SAMPLE else flat


FOREGROUND_LEVEL = 0.1  # tissue: channel mean above p1 + this fraction of (p99 - p1)


def foreground_window(arr: np.ndarray, low: float, high: float) -> np.ndarray:
    """Intensity mode 'foreground' on CHW (or HW) raw values: each channel windowed to
    [median + low * s, median + high * s], median and s (IQR / 1.349, a robust standard deviation) taken over
    the image's foreground pixels only (channel mean above ``FOREGROUND_LEVEL`` of its p1..p99 range); the
    window never starts below the median of the background (air stays 0).

    Air does not enter the statistics and a bright lesion (a minority of the tissue) barely moves a median
    or an IQR, so unlike a percentile window it neither sets the top of the range nor compresses the rest
    of the tissue. Channels are windowed separately (MRI sequences have unrelated scales)."""
    chw = arr[None] if arr.ndim == 2 else arr
    g = chw.mean(0, dtype=np.float64)
    p1, p99 = np.percentile(_sample(g), [1, 99])
    fg = g > p1 + FOREGROUND_LEVEL * (p99 - p1)
    if not fg.any():  # flat image: all background
        fg = np.ones_like(fg)
    out = np.empty(chw.shape, np.float32)
    for c, plane in enumerate(chw):
        q25, med, q75 = np.percentile(_sample(plane[fg]), [25, 50, 75])
        s = float(q75 - q25) / 1.349 or float(np.std(plane[fg]))
        air = float(np.median(plane[~fg])) if not fg.all() else -np.inf
        lo = max(float(med) + low * s, air)  # air is 0 even where tissue varies more than |low| SDs
        out[c] = window(plane, lo, max(float(med) + high * s, lo))
    return out[0] if arr.ndim == 2 else out


def window(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """(x - lo) / (hi - lo) clipped to [0, 1] as float32; a degenerate window thresholds at lo (flat -> 0).

    Windows reaching beyond ``_FLOAT32_SAFE`` (float data near the float32/float64 limits) are computed in
    float64 scaled by the window's magnitude, so nothing overflows into Inf/NaN."""
    if not hi > lo:
        return _float32(arr > lo)
    scale = max(abs(lo), abs(hi))
    with np.errstate(over="ignore"):  # float64 beyond float32's range casts to +-Inf, then clips to 0 or 1
        if scale < _FLOAT32_SAFE:
            x = _float32(arr)
            x -= np.float32(lo)
            x /= np.float32(hi - lo)
        else:
            x = np.array(arr, dtype=np.float64, order="C")
            x /= scale
            x -= lo / scale
            x /= hi / scale - lo / scale
    np.clip(x, 0.0, 1.0, out=x)
    return _float32(x) if x.dtype != np.float32 else x


def _float32(arr: np.ndarray) -> np.ndarray:
    """A new C-contiguous float32 copy (whatever the strides of ``arr``: one copy, not two)."""
    return np.array(arr, dtype=np.float32, order="C")


def to_uint8_preview(chw: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB for overlays: 1-2 channels show the first as gray, 3+ channels show the first three."""
    a = np.asarray(chw, dtype=np.float32)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[0] == 0:
        raise ValueError(f"expected a CHW or HW array, got shape {a.shape}")
    a = a[:3] if a.shape[0] >= 3 else a[:1]
    u8 = (np.clip(np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if len(u8) == 1:  # gray: converted once, repeated as bytes (1/3 of the float work)
        return np.repeat(u8[0][:, :, None], 3, axis=2)
    return np.ascontiguousarray(u8.transpose(1, 2, 0))
