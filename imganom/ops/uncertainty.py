"""How sure is a verdict, and why this image: Monte-Carlo confidence, region confidence, anomaly mass.

With K latent draws per image (``uncertainty.samples``) each draw gives its own map and score
(``TorchBackend._sampled``); the verdict itself always comes from the posterior-mean map. Here:

* ``verdict_confidence``: z = |score - threshold| / spread, with spread the standard deviation of the K
  sample scores; confidence = erf(z / sqrt 2) = 2 Phi(z) - 1, the probability mass of a normal with that
  spread that lies within the distance to the threshold: 0 on the threshold, 0.68 at one spread, 0.95 at
  two, 1 in the limit. Monotone in the distance, in [0, 1].
* ``region_confidence``: the fraction of the K sample maps in which the region's peak exceeds the pixel
  threshold (sampled reconstructions are blurrier than the mean decode, so this leans high).
* ``mass_shares``: anomaly mass = the map's excess over the pixel threshold summed over the ROI; each
  region's share of it (shares sum to at most 1; the rest lies in pixels that morphology or ``min_area``
  dropped).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from imganom.ops.postprocess import Region


def verdict_confidence(score: float, threshold: float | None, spread: float | None) -> float | None:
    """erf(|score - threshold| / (spread sqrt 2)) in [0, 1]; None without a threshold or a spread. A zero
    spread gives 1 (0 exactly on the threshold)."""
    if threshold is None or spread is None or not math.isfinite(score):
        return None
    d = abs(score - threshold)
    if spread <= 0:
        return 1.0 if d > 0 else 0.0
    return float(math.erf(d / (spread * math.sqrt(2.0))))


def score_spread(sample_scores: np.ndarray) -> float:
    """Sample standard deviation (ddof 1) of the K sample scores (0 for K < 2)."""
    s = np.asarray(sample_scores, dtype=np.float64)
    return float(s.std(ddof=1)) if s.size >= 2 else 0.0


def region_pixels(mask: np.ndarray, regions: list[Region]) -> list[np.ndarray]:
    """Flat pixel indices of each region in ``mask`` (its connected component with the same bbox and area)."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), connectivity=8)
    key = {
        (int(x), int(y), int(x + w), int(y + h), int(a)): lab
        for lab, (x, y, w, h, a) in enumerate(stats.tolist())
        if lab
    }
    flat = labels.ravel()
    out = []
    for r in regions:
        lab = key.get((*r.bbox, r.area))
        out.append(np.flatnonzero(flat == lab) if lab is not None else np.zeros(0, np.int64))
    return out


def region_confidence(exceed: np.ndarray, pixels: list[np.ndarray]) -> list[float]:
    """For each region (flat pixel indices): the fraction of the K samples in which some pixel of the region
    exceeds the pixel threshold (``exceed``: (K, H, W) bool, sample map > threshold), i.e. the region's
    sample peak does; in [0, 1]."""
    flat = exceed.reshape(exceed.shape[0], -1)
    return [float(flat[:, p].any(1).mean()) if p.size else 0.0 for p in pixels]


def mass_shares(
    amap: np.ndarray, threshold: float, pixels: list[np.ndarray], roi: np.ndarray | None = None
) -> tuple[float, list[float]]:
    """(total anomaly mass, each region's share of it): mass = sum of max(map - threshold, 0) over the ROI."""
    excess = np.maximum(amap.astype(np.float64) - threshold, 0.0)
    if roi is not None:
        excess = excess * roi
    flat = excess.ravel()
    total = float(flat.sum())
    return total, [min(1.0, float(flat[p].sum() / total)) if total > 0 else 0.0 for p in pixels]  # rounding
