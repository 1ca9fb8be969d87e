"""The normals' latent space: statistics fitted on normal latent means, a density score and a 2-D view.

``fit_latent_stats`` (run by calibration on the held-out normals it scores) keeps, as model-file stats
tensors: the mean and the Ledoit-Wolf shrunk precision matrix (a few hundred normals against a 128-d latent:
the plain covariance is near singular), the mean/std of the normals' own Mahalanobis distances (to
standardise the latent score), a 2-D PCA basis and the normals' 2-D points (at most ``MAX_POINTS``) for the
report. A model without them still works: ``has_latent_stats`` is False and the latent views say so.

Latent score = Mahalanobis distance sqrt((z - mean)^T P (z - mean)). Combined score (``combined_score``) =
the sum of the two standardised scores, each z-scored by its normals' mean and std:
(score - normal mean) / normal std + (latent distance - normal mean) / normal std.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

MAX_POINTS = 400
KEYS = ("latent_mean", "latent_precision", "latent_dist", "latent_pca", "latent_pca_mean",
        "latent_normals_2d")  # fmt: skip


def has_latent_stats(stats: Mapping[str, torch.Tensor]) -> bool:
    """True when ``stats`` hold every tensor ``fit_latent_stats`` makes."""
    return all(k in stats for k in KEYS)


def fit_latent_stats(z: np.ndarray) -> dict[str, torch.Tensor]:
    """Latent means (n, D) of normal images, n >= 3 -> the stats tensors (see the module docstring)."""
    from sklearn.covariance import LedoitWolf
    from sklearn.decomposition import PCA

    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or len(z) < 3:
        raise ValueError(f"latent statistics need at least 3 latent vectors (n, D), got shape {z.shape}")
    lw = LedoitWolf().fit(z)
    pca = PCA(n_components=min(2, z.shape[1]), random_state=0).fit(z)
    stats = {
        "latent_mean": torch.from_numpy(lw.location_),
        "latent_precision": torch.from_numpy(lw.precision_),
        "latent_pca": torch.from_numpy(pca.components_),
        "latent_pca_mean": torch.from_numpy(pca.mean_),
    }
    d = mahalanobis(z, stats)
    stats["latent_dist"] = torch.tensor([d.mean(), max(d.std(), 1e-6)])
    pts = pca.transform(z)
    stats["latent_normals_2d"] = torch.from_numpy(pts[:: -(-len(pts) // MAX_POINTS)])
    return {k: v.float() for k, v in stats.items()}


def mahalanobis(z: np.ndarray, stats: Mapping[str, torch.Tensor]) -> np.ndarray:
    """Mahalanobis distances (n,) of latent means (n, D) to the normals."""
    d = np.asarray(z, np.float64) - stats["latent_mean"].double().cpu().numpy()
    p = stats["latent_precision"].double().cpu().numpy()
    return np.sqrt(np.maximum(np.einsum("nd,de,ne->n", d, p, d), 0.0))


def project(z: np.ndarray, stats: Mapping[str, torch.Tensor]) -> np.ndarray:
    """Latent means (n, D) -> their (n, 2) PCA coordinates in the normals' basis."""
    c = stats["latent_pca"].double().cpu().numpy()
    return (np.asarray(z, np.float64) - stats["latent_pca_mean"].double().cpu().numpy()) @ c.T


def combined_score(
    score: np.ndarray,
    latent_dist: np.ndarray,
    score_norm: tuple[float, float],
    dist_norm: tuple[float, float],
) -> np.ndarray:
    """Sum of the standardised reconstruction score and latent distance (``*_norm``: normals' mean, std)."""
    zs = (np.asarray(score, np.float64) - score_norm[0]) / max(score_norm[1], 1e-12)
    zd = (np.asarray(latent_dist, np.float64) - dist_norm[0]) / max(dist_norm[1], 1e-12)
    return zs + zd
