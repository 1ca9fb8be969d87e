"""Foreground (body / brain tissue) of model input views: the region ``postprocess.roi: auto`` scores.

Medical slices are mostly air: the field-of-view edge, noise in the air and the outline of the head produce
reconstruction error that is not a lesion. The foreground is found in the normalised model input (where
background is near 0) by an intensity threshold and morphology, all in torch on fixed-size tensors so the
``AnomalyHead`` (and so the ONNX export) computes it per image:

    g    = channel mean, 3x3 box-smoothed          (noise in the air does not pass the threshold)
    fg   = g > level * max(g)                      (relative: the same rule for any intensity scale)
    fg   = close(fg, 2 px), then fill holes        (dark ventricles / CSF inside the head stay in)
    fg   = open(fg, 1 px), then erode(fg, erode)   (specks out; erode keeps the outline out of the score)

Hole filling: a pixel is inside when there is foreground to its left, right, above and below (cumulative
sums), which fills every hole of a roughly convex body and needs no connected-component labelling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LEVEL = 0.1  # fraction of the brightest (smoothed) level that counts as tissue
CLOSE_RADIUS = 2
OPEN_RADIUS = 1


def _dilate(m: torch.Tensor, r: int) -> torch.Tensor:
    return F.max_pool2d(m, 2 * r + 1, stride=1, padding=r) if r > 0 else m


def _erode(m: torch.Tensor, r: int) -> torch.Tensor:
    return -F.max_pool2d(-m, 2 * r + 1, stride=1, padding=r) if r > 0 else m


def _fill_holes(m: torch.Tensor) -> torch.Tensor:
    """(N, 1, h, w) float 0/1 -> pixels with foreground on all four sides (themselves included) set."""
    row, col = m.cumsum(3), m.cumsum(2)
    left, up = row > 0, col > 0
    right = (row[..., -1:] - row + m) > 0
    down = (col[..., -1:, :] - col + m) > 0
    return (left & right & up & down).to(m.dtype)


def smoothed_level(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, h, w): the channel mean of views (N, C, h, w), 3x3 box-smoothed (what the threshold sees)."""
    if x.ndim != 4:
        raise ValueError(f"foreground_mask expects (N, C, h, w) views, got shape {tuple(x.shape)}")
    return F.avg_pool2d(x.float().mean(1, keepdim=True), 3, stride=1, padding=1, count_include_pad=False)


def foreground_mask(
    x: torch.Tensor, erode: int = 0, level: float = LEVEL, floor: float | None = None
) -> torch.Tensor:
    """Views (N, C, h, w) in [0, 1] -> bool (N, h, w): True on the body/brain, False on air and background.

    ``erode``: shrink the result by this many pixels (a square structuring element), e.g. to keep the bright
    outline of a head out of the score. ``floor``: an absolute threshold instead of ``level`` times the
    view's own brightest level (a slice of pure noise has a relative 'foreground' too; ``empty_slices``
    compares slices against the dataset). An all-dark view gives an all-False mask."""
    g = smoothed_level(x)
    peak = g.amax(dim=(2, 3), keepdim=True)
    thr = peak * level if floor is None else torch.full_like(peak, floor)
    m = ((g > thr) & (thr > 0)).float()
    m = _erode(_dilate(m, CLOSE_RADIUS), CLOSE_RADIUS)
    m = _fill_holes(m)
    m = _dilate(_erode(m, OPEN_RADIUS), OPEN_RADIUS)
    m = _erode(m, erode)
    return m[:, 0] > 0.5


def foreground_fraction(x: torch.Tensor, floor: float | None = None) -> torch.Tensor:
    """Fraction (N,) of each view covered by the foreground (``foreground_mask`` with ``floor``)."""
    return foreground_mask(x, floor=floor).flatten(1).float().mean(1)


def empty_slices(x: torch.Tensor, min_fraction: float, level: float = LEVEL) -> tuple[torch.Tensor, float]:
    """Which views (N, C, h, w) of a dataset (absolute intensities, e.g. by dtype) are empty: less than
    ``min_fraction`` of the view brighter than ``level`` times the median over views of their brightest
    level; per dataset, so a slice of air and noise (relatively bright somewhere, absolutely dark) is
    recognised as empty. Returns (bool (N,), that absolute threshold: ``foreground_fraction``'s floor)."""
    peak = smoothed_level(x).amax(dim=(1, 2, 3))
    floor = float(peak.median()) * level
    return foreground_fraction(x, floor) < min_fraction, floor
