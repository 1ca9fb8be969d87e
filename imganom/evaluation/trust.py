"""Evaluation of the trust views: the latent-density score and the verdict confidence, on a labelled test set.

* ``latent``: Mahalanobis distance of each test image's latent mean to the normals' latents (``ops.latent``)
  as an image score, alone and combined with the reconstruction score (sum of the two standardised scores,
  each by its normals' mean and std: the calibration's normal scores, the normals' latent distances), with
  the AUROC of each and of the reconstruction score.
* ``uncertainty``: with Monte-Carlo sampling, the verdict error rate per confidence bin, and the AUROC of
  the confidence for telling right verdicts from wrong ones (0.5: confidence says nothing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from imganom.ops.latent import combined_score, has_latent_stats, mahalanobis

CONFIDENCE_BINS = (0.0, 0.5, 0.9, 0.99, 1.0)


def safe_auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC, or None when ``labels`` hold a single class."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels)
    return float(roc_auc_score(y, np.asarray(scores, np.float64))) if len(np.unique(y)) == 2 else None
COMBINATION = "(score - normal mean) / normal std + (latent distance - normal mean) / normal std"


def latent_metrics(
    stats: Mapping[str, torch.Tensor],
    calibration: Mapping[str, Any] | None,
    scores: np.ndarray,
    labels: np.ndarray,
    latents: Sequence[np.ndarray | None],
) -> dict[str, Any]:
    """AUROC of the latent distance, the combined score and the reconstruction score (see the module)."""
    if not has_latent_stats(stats):
        return {"available": False, "reason": "the model has no latent statistics (recalibrate it: "
                "imganom calibrate --restat, or train it again)"}  # fmt: skip
    if not latents or any(z is None for z in latents):
        return {"available": False, "reason": "this backend gives no latent means (use --backend torch)"}
    dist = mahalanobis(np.stack(latents), stats)
    out: dict[str, Any] = {
        "available": True,
        "score": "Mahalanobis distance of the latent mean to the normals' latents (Ledoit-Wolf covariance)",
        "latent_auroc": safe_auroc(labels, dist),
        "reconstruction_auroc": safe_auroc(labels, scores),
    }
    ns = (calibration or {}).get("normal_scores") or {}
    if ns.get("std"):
        dn = stats["latent_dist"].double().tolist()
        comb = combined_score(scores, dist, (ns["mean"], ns["std"]), (dn[0], dn[1]))
        out.update(combination=COMBINATION, combined_auroc=safe_auroc(labels, comb))
    return out


def confidence_metrics(
    scores: np.ndarray, labels: np.ndarray, confidences: Sequence[float | None], threshold: float | None
) -> dict[str, Any] | None:
    """Verdict error rate per confidence bin; None without confidences or a threshold."""
    if threshold is None or not confidences or any(c is None for c in confidences):
        return None
    conf = np.asarray(confidences, np.float64)
    wrong = (np.asarray(scores) > threshold) != (np.asarray(labels) == 1)
    bins = []
    for lo, hi in zip(CONFIDENCE_BINS[:-1], CONFIDENCE_BINS[1:]):
        sel = (conf >= lo) & ((conf < hi) if hi < 1.0 else (conf <= hi))
        n = int(sel.sum())
        bins.append({"range": [lo, hi], "n": n, "errors": int(wrong[sel].sum()),
                     "error_rate": float(wrong[sel].mean()) if n else None})  # fmt: skip
    return {
        "bins": bins,
        "error_rate": float(wrong.mean()),
        "confidence_auroc_correct": safe_auroc((~wrong).astype(int), conf),
    }
