"""3-D lesions of a mask volume: connected components across slices, sized in mm^3 from the affine.

Pure numpy/scipy on a stored grid (X, Y, Z): ``find_lesions`` labels the mask with 26-connectivity by
default (``connectivity`` 1 = faces, 2 = faces and edges, 3 = also corners, as ``ndimage.generate_binary_
structure``), and describes each component: voxel count, volume (voxels x |det| of the affine's linear part,
so anisotropic and oblique grids are exact), bounding box in voxel indices (inclusive) and in patient mm
(the box's corner voxel centres mapped by the affine, min/max per axis), centroid, peak score and where.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage


@dataclass
class Lesion:
    """One 3-D connected component of a mask volume."""

    index: int  # 1-based, ordered by peak score (highest first)
    voxels: int
    volume_mm3: float
    bbox_voxel: list[list[int]]  # [[i0, j0, k0], [i1, j1, k1]], inclusive
    bbox_mm: list[list[float]]  # [[x0, y0, z0], [x1, y1, z1]] in the affine's space (min, max)
    centroid_mm: list[float]
    peak_score: float
    peak_voxel: list[int]
    slices: list[int]  # [first, last] along the inspected axis

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def voxel_volume(affine: np.ndarray) -> float:
    """mm^3 of one voxel: |det| of the affine's 3 x 3 part."""
    return float(abs(np.linalg.det(np.asarray(affine, np.float64)[:3, :3])))


def to_patient(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """Voxel indices (N, 3) -> patient mm (N, 3)."""
    a = np.asarray(affine, np.float64)
    return np.asarray(ijk, np.float64) @ a[:3, :3].T + a[:3, 3]


def label_volume(mask: np.ndarray, connectivity: int = 3) -> tuple[np.ndarray, int]:
    """(labels int32, count) of the nonzero voxels of a 3-D mask."""
    if mask.ndim != 3:
        raise ValueError(f"expected a 3-D mask, got shape {mask.shape}")
    if connectivity not in (1, 2, 3):
        raise ValueError(f"connectivity must be 1, 2 or 3, got {connectivity}")
    labels, n = ndimage.label(np.asarray(mask) > 0, ndimage.generate_binary_structure(3, connectivity))
    return labels.astype(np.int32, copy=False), int(n)


def find_lesions(
    mask: np.ndarray,
    scores: np.ndarray,
    affine: np.ndarray,
    *,
    axis: int = 2,
    connectivity: int = 3,
    labels: tuple[np.ndarray, int] | None = None,
) -> list[Lesion]:
    """The 3-D lesions of ``mask`` (X, Y, Z) with their peak ``scores`` (same shape), highest peak first.

    ``axis``: the inspected slice axis (for ``Lesion.slices``); ``labels``: a ``label_volume`` to reuse.
    """
    if scores.shape != mask.shape:
        raise ValueError(f"scores {scores.shape} and mask {mask.shape} differ in shape")
    lab, n = labels if labels is not None else label_volume(mask, connectivity)
    if n == 0:
        return []
    vox_mm3 = voxel_volume(affine)
    idx = np.arange(1, n + 1)
    counts = ndimage.sum_labels(np.ones(lab.shape, np.int32), lab, idx)
    peaks = ndimage.maximum(scores, lab, idx)
    peak_pos = ndimage.maximum_position(scores, lab, idx)
    centroids = ndimage.center_of_mass(np.ones(lab.shape, np.float32), lab, idx)
    boxes = ndimage.find_objects(lab, n)
    out = []
    for j in range(n):
        box = boxes[j]
        lo = np.array([s.start for s in box])
        hi = np.array([s.stop - 1 for s in box])
        corners = np.array([[(lo, hi)[b >> d & 1][d] for d in range(3)] for b in range(8)])
        mm = to_patient(affine, corners)
        out.append(
            Lesion(
                0, int(counts[j]), round(float(counts[j]) * vox_mm3, 4),
                [lo.tolist(), hi.tolist()],
                [np.round(mm.min(0), 3).tolist(), np.round(mm.max(0), 3).tolist()],
                np.round(to_patient(affine, np.array([centroids[j]]))[0], 3).tolist(),
                float(peaks[j]), [int(v) for v in peak_pos[j]], [int(lo[axis]), int(hi[axis])],
            )  # fmt: skip
        )
    out.sort(key=lambda les: -les.peak_score)
    for i, les in enumerate(out, 1):
        les.index = i
    return out
