"""Anomaly map -> binary mask, connected regions and an image score.

Input is an already-smoothed map at original image resolution. Convention throughout the package:
a pixel (or image) is anomalous when its value is strictly greater than the threshold.
An optional ROI is a bool HxW array, True = inspect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from os import PathLike
from typing import Any

import cv2
import numpy as np

from imganom.config import PostprocessConfig


@dataclass
class Region:
    """One connected anomalous region; ``id`` 1..n ordered by peak score, highest first."""

    id: int
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (x1/y1 exclusive)
    area: int  # pixels
    area_pct: float  # % of the image, or of the ROI when one is given
    centroid: tuple[float, float]  # x, y
    peak: float  # max map value in the region
    mean: float  # mean map value in the region
    confidence: float | None = None  # fraction of Monte-Carlo samples where it exceeds (ops.uncertainty)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (plain Python ints/floats, lists for tuples); ``confidence`` only when measured."""
        conf = {} if self.confidence is None else {"confidence": float(self.confidence)}
        return {
            "id": int(self.id),
            "bbox": [int(v) for v in self.bbox],
            "area": int(self.area),
            "area_pct": float(self.area_pct),
            "centroid": [float(v) for v in self.centroid],
            "peak": float(self.peak),
            "mean": float(self.mean),
            **conf,
        }


def _check_map(amap: np.ndarray) -> np.ndarray:
    amap = np.asarray(amap)
    if amap.ndim != 2:
        raise ValueError(f"anomaly map must be 2-D (H, W), got shape {amap.shape}")
    if not np.issubdtype(amap.dtype, np.floating):
        raise ValueError(f"anomaly map must be a float array, got dtype {amap.dtype}")
    if not np.isfinite(amap).all():
        raise ValueError("anomaly map contains NaN or inf values")
    return amap


def _check_roi(roi: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if roi is None:
        return None
    roi = np.asarray(roi)
    if roi.shape != tuple(shape):
        raise ValueError(f"ROI shape {roi.shape} does not match anomaly map shape {tuple(shape)}")
    return roi.astype(bool, copy=False)


def structuring_element(radius: int) -> np.ndarray:
    """Elliptical (disc-like) kernel of size 2*radius+1; radius 0 gives a 1x1 kernel."""
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    d = 2 * int(radius) + 1
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (d, d))


def binarize(
    amap: np.ndarray, threshold: float, cfg: PostprocessConfig, roi: np.ndarray | None = None
) -> np.ndarray:
    """Threshold (``amap > threshold``) inside the ROI, then opening (drops speckle) and closing (fills
    pinholes and joins near fragments). Returns uint8 0/1; the ROI is re-applied after closing."""
    amap = _check_map(amap)
    roi = _check_roi(roi, amap.shape)
    mask = amap > threshold
    if roi is not None:
        mask &= roi
    mask = mask.astype(np.uint8)
    if cfg.open_radius > 0:
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, structuring_element(cfg.open_radius))
    if cfg.close_radius > 0:
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, structuring_element(cfg.close_radius))
        if roi is not None:
            mask[~roi] = 0
    return mask


def find_regions(
    mask: np.ndarray, amap: np.ndarray, min_area: int, roi: np.ndarray | None = None
) -> tuple[np.ndarray, list[Region]]:
    """8-connected components of ``mask`` with area >= ``min_area``, scored from ``amap``.

    Returns the mask with the small components removed (uint8 0/1) and the regions, peak descending.
    """
    amap = _check_map(amap)
    mask = np.asarray(mask)
    if mask.shape != amap.shape:
        raise ValueError(f"mask shape {mask.shape} does not match anomaly map shape {amap.shape}")
    roi = _check_roi(roi, amap.shape)
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(
        (mask > 0).astype(np.uint8), connectivity=8, ltype=cv2.CV_32S
    )
    areas = stats[:, cv2.CC_STAT_AREA]
    keep = np.flatnonzero(areas[1:] >= min_area) + 1  # label 0 is background
    lut = np.zeros(n, dtype=np.uint8)
    lut[keep] = 1
    clean = lut[labels]
    if keep.size == 0:
        return clean, []

    inside = labels > 0  # only foreground pixels: usually a small fraction of the image
    lab, vals = labels[inside], amap[inside].astype(np.float64)
    sums = np.bincount(lab, weights=vals, minlength=n)
    peaks = np.full(n, -np.inf)
    np.maximum.at(peaks, lab, vals)
    denom = float(roi.sum()) if roi is not None else float(amap.size)
    order = keep[np.argsort(-peaks[keep], kind="stable")]  # ties keep label (raster) order

    # Plain lists: per-region work in Python is far cheaper on lists than on numpy scalars.
    st, cen, pk = stats.tolist(), centroids.tolist(), peaks.tolist()
    mean = (sums / np.maximum(areas, 1)).tolist()
    regions = []
    for rid, lab_id in enumerate(order.tolist(), start=1):
        x, y, w, h, area = st[lab_id]
        regions.append(
            Region(
                id=rid,
                bbox=(x, y, x + w, y + h),
                area=area,
                area_pct=100.0 * area / denom if denom > 0 else 0.0,
                centroid=(cen[lab_id][0], cen[lab_id][1]),
                peak=pk[lab_id],
                mean=mean[lab_id],
            )
        )
    return clean, regions


def image_score(amap: np.ndarray, cfg: PostprocessConfig, roi: np.ndarray | None = None) -> float:
    """Image-level score from the (ROI) pixels: ``max`` or mean of the top ``cfg.topk`` fraction.

    The host path's score; ``device_post.image_scores_t`` is the device one (same ``max``; top-k mean in
    another summation order, ~1e-15 apart), kept both so that the CPU results stay what they were."""
    amap = _check_map(amap)
    roi = _check_roi(roi, amap.shape)
    values = amap[roi] if roi is not None else amap.ravel()
    if values.size == 0:
        raise ValueError("ROI is empty: no pixels to score")
    if cfg.score == "max":
        return float(values.max())
    if cfg.score == "topk_mean":
        k = max(1, math.ceil(cfg.topk * values.size))
        top = np.partition(values, values.size - k)[values.size - k :]
        return float(top.astype(np.float64).mean())
    if cfg.score == "elbo":
        raise ValueError("score 'elbo' comes from the model's ELBO, not the anomaly map; compute it there")
    raise ValueError(f"unknown score method {cfg.score!r}")


def border_roi(shape: tuple[int, int], border: int) -> np.ndarray | None:
    """Bool mask that excludes ``border`` pixels along every edge; ``None`` (no ROI) when border is 0."""
    if border < 0:
        raise ValueError(f"border must be >= 0, got {border}")
    if border == 0:
        return None
    h, w = shape
    if 2 * border >= min(h, w):
        raise ValueError(f"border {border} leaves nothing to inspect in a {h}x{w} image")
    roi = np.zeros((h, w), dtype=bool)
    roi[border : h - border, border : w - border] = True
    return roi


def load_roi(path: str | PathLike[str], shape: tuple[int, int]) -> np.ndarray:
    """Read a ROI mask image (nonzero in any colour channel = inspect; alpha is ignored) and resize it to
    ``shape`` (H, W) with nearest neighbour. Raises ValueError naming the file if unreadable or empty."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)  # imdecode: also handles non-ASCII paths
    except OSError as e:
        raise ValueError(f"cannot read ROI mask {path}: {e}") from None
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None:
        raise ValueError(f"cannot read ROI mask {path}: not a supported image")
    if img.ndim == 3:
        img = img[..., :3].any(axis=2) if img.shape[2] == 4 else img.any(axis=2)
    mask = (img != 0).astype(np.uint8)
    h, w = shape
    if mask.shape != (h, w):
        mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    if not mask.any():
        raise ValueError(f"ROI mask {path} is empty (no nonzero pixels to inspect)")
    return mask.astype(bool)


def postprocess(
    amap: np.ndarray, pixel_threshold: float, cfg: PostprocessConfig, roi: np.ndarray | None = None
) -> tuple[np.ndarray, list[Region]]:
    """Binarize at ``pixel_threshold`` and extract regions of at least ``cfg.min_area`` pixels."""
    mask = binarize(amap, pixel_threshold, cfg, roi)
    return find_regions(mask, amap, cfg.min_area, roi)
