"""Streaming evaluation metrics for anomaly detection, following the MVTec AD conventions.

Image level (``ImageMetrics``): AUROC, AP and F1-max over one score per image (scikit-learn), plus F1, FPR
and TPR at a given threshold (``score >= threshold`` means anomalous).

Pixel level (``PixelMetrics``): AUROC, F1-max and AUPRO@0.3 pooled over every pixel of every test image, in
memory that does not depend on the number or size of images. Each image is folded into three fixed histograms
over ``[lo, hi]``: scores of anomalous pixels, scores of normal pixels, and per-region overlap weights (each
ground-truth region adds ``1 / region_size`` per pixel, so a reverse cumulative sum divided by the number of
regions is the mean per-region overlap). Curves use the bin edges as thresholds: they are the exact curves of
scores quantised to the bin width ``(hi - lo) / bins`` (pixels in one bin count as tied; the ROC is the
trapezoid through them). Dice/IoU at the pixel threshold come from exact per-image TP/FP/FN counts.

Metrics that cannot be defined (one class only, no threshold, ...) are ``None`` and ``reasons[key]`` says why;
results never contain NaN and are JSON-serialisable.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

__all__ = ["ImageMetrics", "PixelMetrics", "EvalAccumulator", "roc_points", "aupro_reference"]

CURVE_POINTS = 200  # at most this many points in the curves returned for plotting
UNSPECIFIED_TYPE = "unspecified"  # defect type used for anomalous images added without one


def _type_key(defect_type: str) -> str:
    return defect_type or UNSPECIFIED_TYPE


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) * 0.5))


def _truncate(x: np.ndarray, y: np.ndarray, limit: float) -> tuple[np.ndarray, np.ndarray]:
    """The part of curve (x, y) with x <= limit, ending exactly at ``limit`` (y interpolated linearly).

    ``x`` must be non-decreasing from 0; at a vertical step the last (highest) point at that x is kept.
    """
    n = int(np.searchsorted(x, limit, side="right"))  # x[:n] <= limit
    xs, ys = x[:n], y[:n]
    if n < len(x) and xs[-1] < limit:
        x0, x1, y0, y1 = x[n - 1], x[n], y[n - 1], y[n]
        xs, ys = np.append(xs, limit), np.append(ys, y0 + (y1 - y0) * (limit - x0) / (x1 - x0))
    return xs, ys


def downsample_curve(x: np.ndarray, y: np.ndarray, n: int = CURVE_POINTS) -> tuple[list[float], list[float]]:
    """At most ``n`` points spread evenly along the curve's length, first and last kept (for plotting)."""
    if len(x) > n:
        s = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(x), np.diff(y)))])
        idx = np.unique(np.searchsorted(s, np.linspace(0.0, s[-1], n)).clip(0, len(x) - 1))
        x, y = x[idx], y[idx]
    return [float(v) for v in x], [float(v) for v in y]


def roc_points(pos_hist: np.ndarray, neg_hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC points ``(fpr, tpr)`` from score histograms, thresholds at the bin edges descending.

    Point ``j`` flags the top ``j`` bins as anomalous, so the arrays have ``bins + 1`` entries from (0, 0)
    to (1, 1). Both histograms must be non-empty (ValueError otherwise).
    """
    pos = np.asarray(pos_hist, dtype=np.float64)
    neg = np.asarray(neg_hist, dtype=np.float64)
    if pos.shape != neg.shape or pos.ndim != 1:
        raise ValueError(f"histograms must be 1-D of equal length, got {pos.shape} and {neg.shape}")
    p, n = pos.sum(), neg.sum()
    if p <= 0 or n <= 0:
        raise ValueError(f"ROC needs both classes: {p:g} positive and {n:g} negative counts")
    tp = np.concatenate([[0.0], np.cumsum(pos[::-1])])
    fp = np.concatenate([[0.0], np.cumsum(neg[::-1])])
    return fp / n, tp / p


class ImageMetrics:
    """Accumulates one anomaly score and label (0 good, 1 anomalous) per image; metrics via ``compute``."""

    def __init__(self) -> None:
        self._scores: list[float] = []
        self._labels: list[int] = []
        self._types: list[str] = []

    @staticmethod
    def check(score: float, label: int) -> tuple[float, int]:
        """Validate one (score, label) pair: finite score, label 0 or 1 (ValueError otherwise)."""
        s = float(score)
        if not math.isfinite(s):
            raise ValueError(f"image score must be finite, got {score!r}")
        if label not in (0, 1):
            raise ValueError(f"label must be 0 (good) or 1 (anomalous), got {label!r}")
        return s, int(label)

    def add(self, score: float, label: int, defect_type: str = "") -> None:
        """Record one image's score and ground-truth label."""
        s, y = self.check(score, label)
        self._scores.append(s)
        self._labels.append(y)
        self._types.append(defect_type)

    def __len__(self) -> int:
        return len(self._scores)

    @property
    def defect_types(self) -> list[str]:
        """Sorted defect types of the anomalous images (``"unspecified"`` for those added without one)."""
        return sorted({_type_key(t) for t, y in zip(self._types, self._labels, strict=True) if y == 1})

    def subset(self, defect_type: str) -> ImageMetrics:
        """All good images plus the anomalous images of one defect type (MVTec per-category convention)."""
        out = ImageMetrics()
        for s, y, t in zip(self._scores, self._labels, self._types, strict=True):
            if y == 0 or _type_key(t) == defect_type:
                out.add(s, y, t)
        return out

    def compute(self, threshold: float | None = None) -> dict[str, Any]:
        """AUROC, AP, F1-max (and its threshold); F1, FPR and TPR at ``threshold`` when given."""
        s = np.asarray(self._scores, dtype=np.float64)
        y = np.asarray(self._labels, dtype=np.int64)
        n_pos = int(y.sum())
        n_neg = len(y) - n_pos
        out: dict[str, Any] = {
            "n_images": len(y), "n_anomalous": n_pos, "n_good": n_neg, "threshold": threshold,
            "auroc": None, "ap": None, "f1_max": None, "f1_max_threshold": None,
            "f1_at_threshold": None, "fpr_at_threshold": None, "tpr_at_threshold": None,
        }  # fmt: skip
        reasons: dict[str, str] = {}
        if n_pos and n_neg:
            out["auroc"] = float(roc_auc_score(y, s))
            out["ap"] = float(average_precision_score(y, s))
            prec, rec, thr = precision_recall_curve(y, s)
            prec, rec = prec[:-1], rec[:-1]  # the last point (recall 0) has no threshold
            denom = prec + rec
            f1 = np.divide(2 * prec * rec, denom, out=np.zeros_like(denom), where=denom > 0)
            i = int(np.argmax(f1))
            out["f1_max"], out["f1_max_threshold"] = float(f1[i]), float(thr[i])
        else:
            only = "no images" if not len(y) else f"only {'good' if n_neg else 'anomalous'} images"
            why = f"needs both classes: {only}"
            reasons.update(dict.fromkeys(("auroc", "ap", "f1_max", "f1_max_threshold"), why))
        if threshold is None:
            for k in ("f1_at_threshold", "fpr_at_threshold", "tpr_at_threshold"):
                reasons[k] = "no threshold"
        else:
            pred = s >= threshold
            tp = int(np.count_nonzero(pred & (y == 1)))
            fp = int(np.count_nonzero(pred & (y == 0)))
            fn = n_pos - tp
            if n_pos:
                out["tpr_at_threshold"] = tp / n_pos
            else:
                reasons["tpr_at_threshold"] = "no anomalous images"
            if n_neg:
                out["fpr_at_threshold"] = fp / n_neg
            else:
                reasons["fpr_at_threshold"] = "no good images"
            if 2 * tp + fp + fn:
                out["f1_at_threshold"] = 2 * tp / (2 * tp + fp + fn)
            else:
                reasons["f1_at_threshold"] = "no anomalous images and none flagged"
        out["reasons"] = reasons
        return out


class PixelMetrics:
    """Pooled pixel-level metrics accumulated image by image in O(bins) memory.

    ``[lo, hi]`` should cover the anomaly map's values (e.g. ``[0, 2 * pixel_threshold]`` or a range from
    calibration statistics): scores outside it are clipped into the end bins, which merges them into ties
    (``compute`` reports the clipped fractions and warns). Curve resolution is ``(hi - lo) / bins``.
    ``threshold`` (if given) is the pixel threshold for exact Dice/IoU (``score >= threshold`` is anomalous).
    """

    def __init__(self, lo: float = 0.0, hi: float = 1.0, bins: int = 20_000, threshold: float | None = None):
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ValueError(f"need finite lo < hi, got lo={lo}, hi={hi}")
        if bins < 2:
            raise ValueError(f"bins must be >= 2, got {bins}")
        self.lo, self.hi, self.bins, self.threshold = float(lo), float(hi), int(bins), threshold
        self.pos_hist = np.zeros(self.bins, dtype=np.int64)  # scores of anomalous pixels
        self.neg_hist = np.zeros(self.bins, dtype=np.int64)  # scores of normal pixels
        self.overlap_hist = np.zeros(self.bins, dtype=np.float64)  # sum over regions of count_in_bin / size
        self.n_images = self.n_regions = 0
        self.tp = self.fp = self.fn = 0  # exact counts at ``threshold``
        self.n_below = self.n_above = 0  # pixels clipped into the end bins

    @property
    def bin_width(self) -> float:
        return (self.hi - self.lo) / self.bins

    def _bin_index(self, a: np.ndarray) -> np.ndarray:
        idx = np.subtract(a, self.lo, dtype=np.float64)
        idx *= self.bins / (self.hi - self.lo)
        np.clip(idx, 0, self.bins - 1, out=idx)
        return idx.astype(np.intp).ravel()  # truncation == floor after clipping at 0

    def add(self, amap: np.ndarray, mask: np.ndarray | None) -> None:
        """Fold one image in: ``amap`` (H, W); ``mask`` bool or 0/255 of the same shape, None = all normal."""
        a = np.asarray(amap)
        if a.ndim != 2:
            raise ValueError(f"anomaly map must be 2-D (H, W), got shape {a.shape}")
        m = None
        if mask is not None:
            m = np.asarray(mask)
            if m.shape != a.shape:
                raise ValueError(f"mask shape {m.shape} does not match anomaly map shape {a.shape}")
            m = np.ascontiguousarray(m > 0)
            if not m.any():
                m = None
        if not np.isfinite(a).all():
            raise ValueError("anomaly map contains NaN or inf")
        self.n_below += int(np.count_nonzero(a < self.lo))
        self.n_above += int(np.count_nonzero(a > self.hi))
        idx = self._bin_index(a)
        total = np.bincount(idx, minlength=self.bins)
        if m is None:
            self.neg_hist += total
        else:
            mflat = m.ravel()
            pidx = idx[mflat]
            pos = np.bincount(pidx, minlength=self.bins)
            self.pos_hist += pos
            self.neg_hist += total - pos
            n, labels, stats, _ = cv2.connectedComponentsWithStats(m.view(np.uint8), connectivity=8)
            weights = (1.0 / stats[:, cv2.CC_STAT_AREA].astype(np.float64))[labels.ravel()[mflat]]
            self.overlap_hist += np.bincount(pidx, weights=weights, minlength=self.bins)
            self.n_regions += n - 1
        if self.threshold is not None:
            pred = a >= self.threshold
            n_pred = int(np.count_nonzero(pred))
            tp = int(np.count_nonzero(pred & m)) if m is not None else 0
            n_pos = int(np.count_nonzero(m)) if m is not None else 0
            self.tp += tp
            self.fp += n_pred - tp
            self.fn += n_pos - tp
        self.n_images += 1

    def _check_compatible(self, other: PixelMetrics) -> None:
        mine = (self.lo, self.hi, self.bins, self.threshold)
        theirs = (other.lo, other.hi, other.bins, other.threshold)
        if mine != theirs:
            raise ValueError(f"cannot merge PixelMetrics with (lo, hi, bins, threshold) {mine} and {theirs}")

    def __add__(self, other: PixelMetrics) -> PixelMetrics:
        """A new accumulator holding both sets of images (same lo, hi, bins and threshold required)."""
        self._check_compatible(other)
        out = PixelMetrics(self.lo, self.hi, self.bins, self.threshold)
        out.pos_hist = self.pos_hist + other.pos_hist
        out.neg_hist = self.neg_hist + other.neg_hist
        out.overlap_hist = self.overlap_hist + other.overlap_hist
        for k in ("n_images", "n_regions", "tp", "fp", "fn", "n_below", "n_above"):
            setattr(out, k, getattr(self, k) + getattr(other, k))
        return out

    def compute(self, fpr_limit: float = 0.3) -> dict[str, Any]:
        """Pooled AUROC, AUPRO up to ``fpr_limit`` (normalised to [0, 1]), F1-max, Dice/IoU at the threshold.

        ``pro_curve`` covers FPR in [0, fpr_limit] (the integrated part), ``roc_curve`` the whole ROC;
        both are downsampled to at most 200 points for plotting.
        """
        if not 0 < fpr_limit <= 1:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        key = f"aupro_{fpr_limit:g}"
        n_pos, n_neg = int(self.pos_hist.sum()), int(self.neg_hist.sum())
        n_pix = n_pos + n_neg
        out: dict[str, Any] = {
            "auroc": None, key: None, "f1_max": None, "f1_max_threshold": None,
            "dice_at_threshold": None, "iou_at_threshold": None, "threshold": self.threshold,
            "pro_curve": None, "roc_curve": None, "fpr_limit": fpr_limit,
            "n_images": self.n_images, "n_pixels": n_pix, "n_anomalous_pixels": n_pos,
            "n_regions": self.n_regions,
            "range": [self.lo, self.hi], "bins": self.bins, "bin_width": self.bin_width,
            "clipped_below": self.n_below / n_pix if n_pix else 0.0,
            "clipped_above": self.n_above / n_pix if n_pix else 0.0,
        }  # fmt: skip
        reasons: dict[str, str] = {}
        warnings: list[str] = []
        if self.n_below + self.n_above > 0.001 * n_pix:
            warnings.append(
                f"{out['clipped_below']:.2%} of pixels below lo={self.lo:g} and {out['clipped_above']:.2%} "
                f"above hi={self.hi:g} were clipped into the end bins; curve metrics treat them as ties"
            )
        if n_pos and n_neg:
            fpr, tpr = roc_points(self.pos_hist, self.neg_hist)
            out["auroc"] = _trapezoid(fpr, tpr)
            x, y = downsample_curve(fpr, tpr)
            out["roc_curve"] = {"fpr": x, "tpr": y}
            tp, fp = tpr * n_pos, fpr * n_neg
            f1 = 2 * tp / (tp + fp + n_pos)  # 2TP / (2TP + FP + FN)
            j = int(np.argmax(f1))
            out["f1_max"] = float(f1[j])
            out["f1_max_threshold"] = self.lo + (self.bins - j) * self.bin_width  # lower edge of flagged bins
        else:
            why = "no images" if not n_pix else f"no {'anomalous' if n_neg else 'normal'} pixels"
            reasons.update(dict.fromkeys(("auroc", "f1_max", "f1_max_threshold", "roc_curve"), why))
        if self.n_regions and n_neg:
            fpr = np.concatenate([[0.0], np.cumsum(self.neg_hist[::-1])]) / n_neg
            pro = np.concatenate([[0.0], np.cumsum(self.overlap_hist[::-1])]) / self.n_regions
            xs, ys = _truncate(fpr, pro, fpr_limit)
            out[key] = _trapezoid(xs, ys) / fpr_limit
            x, y = downsample_curve(xs, ys)
            out["pro_curve"] = {"fpr": x, "pro": y}
        else:
            why = "no normal pixels" if self.n_regions else "no anomalous regions"
            why = why if n_pix else "no images"
            reasons[key] = reasons["pro_curve"] = why
        if self.threshold is None:
            reasons["dice_at_threshold"] = reasons["iou_at_threshold"] = "no pixel threshold"
        elif 2 * self.tp + self.fp + self.fn:
            out["dice_at_threshold"] = 2 * self.tp / (2 * self.tp + self.fp + self.fn)
            out["iou_at_threshold"] = self.tp / (self.tp + self.fp + self.fn)
        else:
            why = "no anomalous pixels and none flagged"
            reasons["dice_at_threshold"] = reasons["iou_at_threshold"] = why
        out["reasons"] = reasons
        out["warnings"] = warnings
        return out


class EvalAccumulator:
    """Image metrics, pooled pixel metrics and per-defect-type metrics from one pass over a test set.

    Each image's pixels are binned once: good images (label 0) into one shared ``PixelMetrics``, anomalous
    ones into one per defect type; the global and per-type pixel metrics are sums of these at compute time
    (per type = that type's images + all good images, as for ``ImageMetrics.subset``).
    """

    def __init__(
        self, lo: float = 0.0, hi: float = 1.0, bins: int = 20_000, pixel_threshold: float | None = None
    ):
        self.images = ImageMetrics()
        self._pixel_args = (lo, hi, bins, pixel_threshold)
        self.good_pixels = PixelMetrics(*self._pixel_args)
        self.type_pixels: dict[str, PixelMetrics] = {}

    def add(
        self,
        score: float,
        label: int,
        amap: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        defect_type: str = "",
    ) -> None:
        """Record one test image: score and label, optionally its anomaly map and ground-truth mask."""
        ImageMetrics.check(score, label)  # validate before any state changes
        if amap is not None:
            if label == 0:
                pm = self.good_pixels
            else:
                pm = self.type_pixels.setdefault(_type_key(defect_type), PixelMetrics(*self._pixel_args))
            pm.add(amap, mask)
        self.images.add(score, label, defect_type)

    def pixels(self) -> PixelMetrics:
        """All images' pixel accumulators merged."""
        out = self.good_pixels
        for pm in self.type_pixels.values():
            out = out + pm
        return out

    def compute(self, image_threshold: float | None = None, fpr_limit: float = 0.3) -> dict[str, Any]:
        """Image, pooled pixel and per-defect-type metrics.

        Returns ``{"image": ..., "pixel": ..., "per_type": {type: {count, image_auroc, pixel_auroc, aupro_*,
        reasons}}}``; a type's metrics pool its images with all good images.
        """
        key = f"aupro_{fpr_limit:g}"
        per_type: dict[str, Any] = {}
        for t in self.images.defect_types:
            img = self.images.subset(t).compute()
            entry: dict[str, Any] = {"count": img["n_anomalous"], "image_auroc": img["auroc"]}
            reasons = {"image_auroc": img["reasons"]["auroc"]} if img["auroc"] is None else {}
            if t in self.type_pixels:
                pix = (self.good_pixels + self.type_pixels[t]).compute(fpr_limit)
                entry["pixel_auroc"], entry[key] = pix["auroc"], pix[key]
                if pix["auroc"] is None:
                    reasons["pixel_auroc"] = pix["reasons"]["auroc"]
                if pix[key] is None:
                    reasons[key] = pix["reasons"][key]
            else:
                entry["pixel_auroc"] = entry[key] = None
                reasons["pixel_auroc"] = reasons[key] = "no anomaly maps for this type"
            entry["reasons"] = reasons
            per_type[t] = entry
        return {
            "image": self.images.compute(image_threshold),
            "pixel": self.pixels().compute(fpr_limit),
            "per_type": per_type,
        }


def aupro_reference(amaps: list[np.ndarray], masks: list[np.ndarray], fpr_limit: float = 0.3) -> float:
    """Exact AUPRO by brute force (for tests): each unique score is a threshold, ``score >= t`` anomalous."""
    from scipy import ndimage

    neg, regions = [], []
    for a, m in zip(amaps, masks, strict=True):
        m = np.asarray(m) > 0
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))  # 8-connectivity
        neg.append(a[~m])
        regions += [a[lab == i] for i in range(1, n + 1)]
    neg = np.concatenate(neg)
    fprs, pros = [0.0], [0.0]
    for t in np.unique(np.concatenate([a.ravel() for a in amaps]))[::-1]:
        fprs.append(float(np.mean(neg >= t)))
        pros.append(float(np.mean([np.mean(r >= t) for r in regions])))
        if fprs[-1] >= fpr_limit:
            break
    area = 0.0
    for x0, x1, y0, y1 in zip(fprs[:-1], fprs[1:], pros[:-1], pros[1:], strict=True):
        if x1 > fpr_limit:  # last segment: cut at the limit, interpolating linearly
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit
