"""Post-processing in torch on the device: threshold + morphology masks and image scores (N, H, W) at once.

Same masks and scores as ``ops.postprocess`` (OpenCV/numpy), for the CUDA pipeline."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from imganom.config import PostprocessConfig
from imganom.ops.postprocess import structuring_element


@lru_cache(maxsize=32)
def ellipse_rows(radius: int) -> tuple[int, ...]:
    """Half-width of each row of OpenCV's elliptical structuring element of this radius (2r+1 rows).

    Every row of ``cv2.getStructuringElement(MORPH_ELLIPSE, ...)`` is a run of ones centred on the middle
    column (radius 1 is the 3x3 cross, radius 2 a 5x5 disc without its four corner triples); checked here.
    """
    se = structuring_element(radius).astype(bool)
    r = int(radius)
    rows = []
    for row in se:
        a = int(row.sum()) // 2
        expect = np.zeros(2 * r + 1, bool)
        expect[r - a : r + a + 1] = True
        if not np.array_equal(row, expect):  # pragma: no cover - OpenCV's ellipse is always row-convex
            raise ValueError(f"structuring element of radius {radius} is not a stack of centred runs")
        rows.append(a)
    return tuple(rows)


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of (N, 1, H, W) 0/1 floats with the ellipse of ``radius``; outside = background.

    The element is a stack of centred horizontal runs, so dilation = max over its rows of a 1-D max-pool
    of the correspondingly shifted image rows: ``2r+1`` pools, exact.
    """
    if radius <= 0:
        return mask
    h, w = mask.shape[-2:]
    r = int(radius)
    p = F.pad(mask, (r, r, r, r), value=0.0)
    out: torch.Tensor | None = None
    for i, a in enumerate(ellipse_rows(r)):
        rows = p[:, :, i : i + h, :]
        if a:
            rows = F.max_pool2d(rows, kernel_size=(1, 2 * a + 1), stride=1)
        rows = rows[:, :, :, r - a : r - a + w]
        out = rows if out is None else torch.maximum(out, rows)
    return out


def erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary erosion (the ellipse is symmetric: erosion = complement of the dilated complement); pixels
    outside the image count as foreground, i.e. they do not erode the border (OpenCV's default)."""
    if radius <= 0:
        return mask
    return 1.0 - dilate(1.0 - mask, radius)


def binarize_t(
    maps: torch.Tensor, threshold: float, cfg: PostprocessConfig, roi: torch.Tensor | None = None
) -> torch.Tensor:
    """``postprocess.binarize`` for a batch of maps (N, H, W) on any device -> (N, H, W) uint8 0/1.

    ``maps > threshold`` inside the ROI (bool (H, W)), opening with ``open_radius``, closing with
    ``close_radius``, ROI re-applied after closing. Same masks as OpenCV, bit for bit.
    Why two implementations: this one runs where the maps are (CUDA); OpenCV's stays for the host path,
    24-70x faster than these pools on one CPU thread (128-1024 px maps, radii 1-2).
    """
    if maps.dim() != 3:
        raise ValueError(f"maps must be (N, H, W), got shape {tuple(maps.shape)}")
    m = maps > threshold
    if roi is not None:
        m = m & roi
    # 0/1 are exact in half precision: half the memory traffic of float32 on the GPU
    m = m.to(torch.float16 if m.is_cuda else torch.float32)[:, None]
    if cfg.open_radius > 0:
        m = dilate(erode(m, cfg.open_radius), cfg.open_radius)
    if cfg.close_radius > 0:
        m = erode(dilate(m, cfg.close_radius), cfg.close_radius)
        if roi is not None:
            m = m * roi
    return m[:, 0].to(torch.uint8)


def image_scores_t(
    maps: torch.Tensor, cfg: PostprocessConfig, roi: torch.Tensor | None = None, n_roi: int | None = None
) -> torch.Tensor:
    """``postprocess.image_score`` for a batch of maps (N, H, W) -> (N,) float64, without leaving the device.

    ``max``: exactly numpy's value. ``topk_mean``: the same top-k values averaged in float64 (agrees to
    ~1e-15 relative; only the summation order differs). ``n_roi`` (ROI pixel count, known on the host)
    avoids a device sync; pixels outside the ROI are set to -inf so they are never picked.
    Why two implementations: this one is the head's (exported graph, device path); numpy's partition-based
    ``postprocess.image_score`` stays for the host path, whose topk_mean it reproduces only to ~1e-15.
    """
    if cfg.score == "elbo":
        raise ValueError("score 'elbo' comes from the model's ELBO, not the anomaly map; compute it there")
    n = maps.shape[-2] * maps.shape[-1] if roi is None else (n_roi if n_roi is not None else int(roi.sum()))
    if n == 0:
        raise ValueError("ROI is empty: no pixels to score")
    v = maps if roi is None else maps.masked_fill(~roi, float("-inf"))
    v = v.flatten(1)
    if cfg.score == "max":
        return v.amax(1).double()
    if cfg.score == "topk_mean":
        k = max(1, math.ceil(cfg.topk * n))
        return v.topk(k, dim=1, sorted=False).values.double().mean(1)
    raise ValueError(f"unknown score method {cfg.score!r}")

