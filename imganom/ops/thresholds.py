"""Calibration math: thresholds from normal scores, F1-optimal thresholds, score normalisation, and a
bounded-memory reservoir of pixel scores. Pure numpy/scipy/sklearn.

Convention: a score is anomalous when it is strictly greater than the threshold.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats
from scipy.special import expit
from sklearn.metrics import precision_recall_curve


def _finite_1d(values: np.ndarray, what: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError(f"{what} is empty")
    if not np.isfinite(v).all():
        raise ValueError(f"{what} contains NaN or inf values")
    return v


def min_calibration_size(target_fpr: float, confidence: float) -> int:
    """Smallest n for which the distribution-free bound exists: 1 - (1-fpr)^n >= confidence."""
    q = 1.0 - target_fpr
    n = max(1, math.ceil(math.log1p(-confidence) / math.log(q)))
    while stats.binom.cdf(n - 1, n, q) < confidence:  # guard against rounding in the closed form
        n += 1
    return n


def quantile_upper_bound(
    scores: np.ndarray, target_fpr: float, confidence: float = 0.9
) -> tuple[float, dict[str, Any]]:
    """Image threshold from normal scores so that the false-reject rate on normals is <= ``target_fpr``
    with probability ``confidence``.

    Distribution-free: the k-th smallest score, k the smallest index with P(Binomial(n, 1-fpr) < k) >=
    confidence, is an upper confidence bound of the (1-fpr) quantile. If n is too small (k > n), fall back
    to a normal fit: the one-sided tolerance bound mean + t*std (noncentral t), never below max(scores);
    ``info["method"]`` is then ``"gaussian_tail"`` with a ``warning``.
    """
    if not 0 < target_fpr < 1:
        raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    s = np.sort(_finite_1d(scores, "scores"))
    n = s.size
    if n < 2:
        raise ValueError(f"need at least 2 normal scores to calibrate, got {n}")
    q = 1.0 - target_fpr
    mean, std = float(s.mean()), float(s.std(ddof=1))

    k = int(stats.binom.ppf(confidence, n, q)) + 1  # smallest k with cdf(k-1) >= confidence
    while k > 1 and stats.binom.cdf(k - 2, n, q) >= confidence:
        k -= 1
    while stats.binom.cdf(k - 1, n, q) < confidence:
        k += 1

    info: dict[str, Any] = {"n": n, "target_fpr": float(target_fpr), "confidence": float(confidence)}
    if k <= n:
        threshold = float(s[k - 1])
        info.update(method="order_statistic", k=k)
    else:
        # One-sided normal tolerance factor: P(mean + f*std >= true q-quantile) = confidence.
        nc = stats.norm.ppf(q) * math.sqrt(n)
        factor = float(stats.nct.ppf(confidence, df=n - 1, nc=nc) / math.sqrt(n))
        threshold = max(float(s[-1]), mean + factor * std)
        need = min_calibration_size(target_fpr, confidence)
        info.update(
            method="gaussian_tail",
            k=None,
            tolerance_factor=factor,
            min_n=need,
            warning="calibration set too small for a distribution-free bound at this FPR; "
            f"need >= {need} normal images",
        )
    p50, p90, p95, p99 = (float(v) for v in np.quantile(s, [0.5, 0.9, 0.95, 0.99]))
    info.update(
        empirical_fpr=float(np.mean(s > threshold)),
        mean=mean,
        std=std,
        quantiles={"p50": p50, "p90": p90, "p95": p95, "p99": p99},
    )
    return threshold, info


def pixel_threshold(normal_pixel_scores: np.ndarray, quantile: float) -> float:
    """High ``quantile`` of pooled normal pixel scores (any shape; the caller subsamples)."""
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    return float(np.quantile(_finite_1d(normal_pixel_scores, "normal pixel scores"), quantile))


def f1_max_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) maximising F1 for labels 1 = anomalous.

    sklearn's cut means ``score >= t``; the returned threshold is moved halfway down to the next lower
    score so that ``score > threshold`` selects exactly the same items.
    """
    s = _finite_1d(scores, "scores")
    y = np.asarray(labels).ravel()
    if y.shape != s.shape:
        raise ValueError(f"scores ({s.size}) and labels ({y.size}) differ in length")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise ValueError("labels contain a single class; F1 needs both normal and anomalous samples")
    precision, recall, cuts = precision_recall_curve(y, s)
    p, r = precision[:-1], recall[:-1]  # the last point (recall 0) has no threshold
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    i = int(np.argmax(f1))
    cut = float(cuts[i])
    below = s[s < cut]
    threshold = (cut + float(below.max())) / 2 if below.size else float(np.nextafter(cut, -np.inf))
    return threshold, float(f1[i])


def normalize_score(score: float | np.ndarray, threshold: float, scale: float) -> float | np.ndarray:
    """Monotone map to [0, 1] with ``threshold`` -> 0.5: logistic((score - threshold) / scale).

    ``scale`` is typically the std of normal scores; non-positive values are replaced by a tiny epsilon
    relative to the threshold (the map then becomes a near step at the threshold).
    """
    eps = 1e-6 * abs(threshold) if threshold != 0 else 1e-12
    if not scale > eps:  # also catches NaN
        scale = eps
    out = expit((np.asarray(score, dtype=np.float64) - threshold) / scale)
    return float(out) if np.ndim(out) == 0 else out


class ReservoirSampler:
    """Uniform sample (without replacement) of at most ``capacity`` values streamed over many ``add`` calls.

    Random-key method: every value gets a uniform key and the ``capacity`` smallest keys are kept. Values
    whose key cannot beat the current cut-off are dropped on arrival, the rest are buffered and compacted
    with ``argpartition`` once the buffer holds 2x capacity, so memory stays O(capacity). The result is
    deterministic given ``seed`` and the sequence of ``add`` calls.
    """

    def __init__(self, capacity: int = 1_000_000, seed: int = 0):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.seen = 0  # number of values offered so far
        self._rng = np.random.default_rng(seed)
        self._values: list[np.ndarray] = []
        self._keys: list[np.ndarray] = []
        self._buffered = 0
        self._cutoff = np.inf  # largest kept key once the reservoir is full

    def add(self, values: np.ndarray) -> None:
        """Offer every element of ``values`` (any shape) to the sample."""
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size == 0:
            return
        self.seen += v.size
        keys = self._rng.random(v.size)
        if self._cutoff < np.inf:
            hit = keys < self._cutoff
            v, keys = v[hit], keys[hit]
        if v.size:
            self._values.append(v)
            self._keys.append(keys)
            self._buffered += v.size
        if self._buffered >= 2 * self.capacity:
            self._compact()

    def _compact(self) -> None:
        if len(self._values) <= 1 and self._buffered <= self.capacity:
            return
        v, keys = np.concatenate(self._values), np.concatenate(self._keys)
        if v.size > self.capacity:
            idx = np.argpartition(keys, self.capacity - 1)[: self.capacity]
            v, keys = v[idx], keys[idx]
            self._cutoff = float(keys.max())
        self._values, self._keys, self._buffered = [v], [keys], v.size

    def sample(self) -> np.ndarray:
        """Copy of the current sample (at most ``capacity`` values, in no particular order)."""
        self._compact()
        return self._values[0].copy() if self._values else np.empty(0, dtype=np.float64)

    def __len__(self) -> int:
        self._compact()
        return self._buffered
