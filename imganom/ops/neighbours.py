"""Image scores relative to the most similar normal images (``calibration.neighbours``).

A reconstruction model does not find every normal image equally easy: skull-base MRI slices, or tiles of an
unusual size or brightness, score high although normal, and a small defect on an easy image scores lower
than that. So the score is divided by the mean score of the ``k`` training normals whose latent means are
closest (cosine) to the image's: "how many times as anomalous as the normals that look like it".

    relative score = raw score / mean(raw scores of the k nearest normal latents)

Calibration keeps the training normals' unit latent means and raw scores (``fit_reference``, stats tensors
``neighbour_latents`` / ``neighbour_scores``); thresholds are then set on relative scores of held-out normals.
``NeighbourReference`` is the one implementation: the torch backend runs it on the posterior mean and the
ONNX/OpenVINO export traces it (a MatMul, a TopK and a Gather), so every backend scores alike.
Measured in docs/BENCHMARKS.md ("Scores relative to similar normals").
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

KEYS = ("neighbour_latents", "neighbour_scores")
MAX_REFERENCE = 2048  # reference normals kept (an evenly spaced subset beyond): 2048 x D floats in the file
EPS = 1e-6


class NonPositiveScores(ValueError):
    """The score rule gave a normal image a score <= 0: a ratio to its neighbours' mean means nothing."""


def has_reference(stats: Mapping[str, torch.Tensor]) -> bool:
    """True when ``stats`` hold a neighbour reference (``fit_reference``)."""
    return all(k in stats for k in KEYS)


def fit_reference(latents: np.ndarray, scores: np.ndarray, k: int) -> dict[str, torch.Tensor]:
    """Latent means (n, D) and raw image scores (n,) of normal images -> the stats tensors.

    Needs more than ``k`` images and positive scores (a ratio to a non-positive mean means nothing)."""
    z = np.asarray(latents, np.float64)
    s = np.asarray(scores, np.float64)
    if z.ndim != 2 or len(z) != len(s):
        raise ValueError(f"neighbour reference: latents (n, D) and scores (n,) must match, got {z.shape}, "
                         f"{s.shape}")  # fmt: skip
    if len(s) <= k:
        raise ValueError(f"neighbour reference: calibration.neighbours = {k} needs more than {k} normal "
                         f"images, got {len(s)}")  # fmt: skip
    if not np.all(np.isfinite(s)) or s.min() <= 0:
        raise NonPositiveScores(f"neighbour reference: raw scores must be finite and > 0 (min "
                                f"{s.min():.4g}); this score rule can go negative")  # fmt: skip
    if len(s) > MAX_REFERENCE:
        keep = np.linspace(0, len(s) - 1, MAX_REFERENCE).round().astype(int)
        z, s = z[keep], s[keep]
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), EPS)
    return {"neighbour_latents": torch.from_numpy(z).float(), "neighbour_scores": torch.from_numpy(s).float()}


class NeighbourReference(nn.Module):
    """Latent means (N, D) -> the mean raw score (N,) of the ``k`` reference normals nearest in cosine."""

    def __init__(self, stats: Mapping[str, torch.Tensor], k: int):
        super().__init__()
        z, s = stats["neighbour_latents"].float(), stats["neighbour_scores"].float()
        if not 1 <= k <= len(s):
            raise ValueError(f"calibration.neighbours = {k} but the reference holds {len(s)} normal images")
        self.k = int(k)
        self.register_buffer("latents", z.contiguous())
        self.register_buffer("scores", s.contiguous())

    def forward(self, mu: torch.Tensor) -> torch.Tensor:
        z = mu.float().flatten(1)
        z = z / z.norm(dim=1, keepdim=True).clamp_min(EPS)
        idx = (z @ self.latents.t()).topk(self.k, dim=1).indices  # (N, k): most similar first
        return self.scores[idx].mean(1).clamp_min(EPS)


def reference_numpy(mu: np.ndarray, stats: Mapping[str, torch.Tensor], k: int) -> np.ndarray:
    """``NeighbourReference`` in numpy (tests, analysis): (N, D) -> (N,) float64."""
    ref = stats["neighbour_latents"].double().numpy()
    s = stats["neighbour_scores"].double().numpy()
    z = np.asarray(mu, np.float64).reshape(len(mu), -1)
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), EPS)
    idx = np.argsort(-(z @ ref.T), axis=1, kind="stable")[:, :k]
    return np.maximum(s[idx].mean(1), EPS)
