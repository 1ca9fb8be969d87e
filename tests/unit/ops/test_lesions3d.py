"""3-D lesions: connected across slices, sized in mm^3 from the affine, boxes in voxels and patient mm."""

from __future__ import annotations

import math

import numpy as np
import pytest

from imganom.data.phantom import Sphere, head_phantom
from imganom.ops.lesions3d import find_lesions, label_volume, voxel_volume


def test_phantom_lesion_volume_in_mm3_with_anisotropic_spacing() -> None:
    ph = head_phantom((64, 64, 16), (1.0, 1.0, 3.0), [Sphere((32, 32, 8), 5.0), Sphere((18, 44, 4), 4.0)])
    mask = ph.lesion_mask > 0
    scores = np.where(mask, ph.lesion_mask, 0).astype(np.float32)
    lesions = find_lesions(mask, scores, ph.affine)
    assert len(lesions) == 2
    by_peak = {round(les.peak_score): les for les in lesions}
    for k, sph in enumerate(ph.lesions, 1):
        les = by_peak[k]
        assert les.volume_mm3 == pytest.approx(ph.lesion_volume_mm3(k))  # voxels x 3 mm^3, exactly
        assert les.volume_mm3 == pytest.approx(4 / 3 * math.pi * sph.radius_mm**3, rel=0.12)  # the sphere
        assert les.slices[1] - les.slices[0] + 1 == les.bbox_voxel[1][2] - les.bbox_voxel[0][2] + 1
        assert les.slices[1] - les.slices[0] <= 2 * sph.radius_mm / 3 + 1  # 3 mm slices: few of them
        centre = (ph.affine @ [*sph.center, 1])[:3]
        assert np.allclose(les.centroid_mm, centre, atol=0.6)
        lo, hi = np.array(les.bbox_mm)
        assert np.all(lo < centre) and np.all(centre < hi)
        assert hi[2] - lo[2] == pytest.approx(3.0 * (les.slices[1] - les.slices[0]))
    assert lesions[0].index == 1 and lesions[0].peak_score == 2.0  # ordered by peak score


def test_components_connect_across_slices_and_connectivity_counts() -> None:
    m = np.zeros((8, 8, 4), np.uint8)
    m[2, 2, 0] = m[2, 2, 1] = 1  # one lesion over two slices
    m[5, 5, 2] = m[6, 6, 3] = 1  # touching only at a corner
    assert label_volume(m, 3)[1] == 2
    assert label_volume(m, 1)[1] == 3
    lesions = find_lesions(m, m.astype(np.float32), np.diag([0.5, 0.5, 2.0, 1.0]), connectivity=1)
    assert sorted(les.voxels for les in lesions) == [1, 1, 2]
    assert sorted(les.volume_mm3 for les in lesions) == [0.5, 0.5, 1.0]


def test_oblique_affine_voxel_volume_and_empty_mask() -> None:
    c, s = math.cos(0.3), math.sin(0.3)
    a = np.diag([1.0, 2.0, 3.0, 1.0])
    a[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ a[:3, :3]
    assert voxel_volume(a) == pytest.approx(6.0)
    assert find_lesions(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), a) == []
    with pytest.raises(ValueError, match="differ in shape"):
        find_lesions(np.zeros((4, 4, 4)), np.zeros((4, 4, 3)), a)
