"""``Result``: everything known about one inspected image, whichever backend computed its map."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imganom.data.readers import ImageMeta
from imganom.ops.postprocess import Region
from imganom.ops.thresholds import normalize_score
from imganom.ops.uncertainty import verdict_confidence


@dataclass
class Result:
    """Everything known about one inspected image. Maps and masks are at the original resolution."""

    id: str
    score: float
    norm_score: float
    is_anomalous: bool
    anomaly_map: np.ndarray | None  # (H, W) float32, smoothed; None when not requested (Inspector.maps)
    mask: np.ndarray | None  # (H, W) uint8 0/1; None together with anomaly_map
    regions: list[Region]
    thresholds: dict[str, float | None]
    timing: dict[str, float] = field(default_factory=dict)  # milliseconds
    meta: ImageMeta | None = None
    image: np.ndarray | None = None  # the normalised CHW input, for overlays
    size: tuple[int, int] | None = None  # (H, W) of the original; needed when anomaly_map is None
    # torch backend only (``inference.extras``): latent mean, ELBO decomposition + region shares;
    # with uncertainty.samples >= 2: the sample scores' spread, the reconstruction's per-pixel spread (H, W)
    latent: np.ndarray | None = None
    explanation: dict[str, Any] | None = None
    score_spread: float | None = None
    uncertainty_map: np.ndarray | None = None
    review_below: float | None = None  # confidence under which the verdict reads "review" (opt-in)

    @property
    def confidence(self) -> float | None:
        """Confidence in the verdict, in [0, 1] (``ops.uncertainty.verdict_confidence``); None when not
        sampled or uncalibrated."""
        return verdict_confidence(self.score, self.thresholds.get("image"), self.score_spread)

    @property
    def review(self) -> bool:
        """Low confidence near the threshold and ``review_below`` set: a person should look."""
        c = self.confidence
        return self.review_below is not None and c is not None and c < self.review_below

    @property
    def verdict(self) -> str:
        """"NG" | "OK", or "review" where ``review`` (``is_anomalous`` still holds the thresholded call)."""
        if self.review:
            return "review"
        return "NG" if self.is_anomalous else "OK"

    def to_dict(self, regions: bool = True) -> dict[str, Any]:
        """JSON-safe summary (no arrays)."""
        d = {
            "id": self.id,
            "verdict": self.verdict,
            "score": self.score,
            "norm_score": self.norm_score,
            "n_regions": len(self.regions),
            "max_region_area": max((r.area for r in self.regions), default=0),
            "image_threshold": self.thresholds.get("image"),
            "pixel_threshold": self.thresholds.get("pixel"),
            "size": list(self.anomaly_map.shape if self.anomaly_map is not None else self.size or ()),
            "timing_ms": self.timing,
        }
        if self.score_spread is not None:
            d.update(confidence=self.confidence, score_spread=self.score_spread)
            d["is_anomalous"] = self.is_anomalous
        if self.explanation is not None:
            d["explanation"] = self.explanation
        if regions:
            d["regions"] = [r.to_dict() for r in self.regions]
        return d


def verdict(score: float, threshold: float | None, scale: float | None) -> tuple[float, bool]:
    """(normalised score, NG?) at the image threshold; (nan, False) when uncalibrated. ``scale``: the
    calibration's score spread (None: 10 % of the threshold)."""
    if threshold is None:
        return float("nan"), False
    scale = scale or max(abs(threshold) * 0.1, 1e-6)
    return float(normalize_score(score, threshold, scale)), bool(score > threshold)
