"""Pseudo anomalies: every family changes exactly its mask, visibly, deterministically per seed."""

from __future__ import annotations

import numpy as np
import pytest

from imganom.data.pseudo import FAMILIES, MASK_TOL, add_pseudo_anomaly, perlin_noise, pseudo_anomalies
from imganom.data.synth import normal_image


def _normals(n: int, channels: int, size: tuple[int, int] = (64, 80)) -> list[np.ndarray]:
    h, w = size
    return [
        normal_image(np.random.default_rng(i), size, "grain", channels)
        .reshape(h, w, channels)
        .transpose(2, 0, 1)
        for i in range(n)
    ]


@pytest.mark.parametrize("channels", [1, 3])
def test_every_family_changes_exactly_its_visible_mask(channels: int) -> None:
    imgs = _normals(4, channels)
    samples = pseudo_anomalies(imgs, seed=3)
    assert [s.family for s in samples[:4]] == list(FAMILIES) and len(samples) == 4 * len(FAMILIES)
    for s in samples:
        clean = imgs[s.source]
        assert s.image.shape == clean.shape and s.image.dtype == np.float32
        assert 0.0 <= s.image.min() and s.image.max() <= 1.0
        diff = np.abs(s.image - clean).max(0)
        assert s.mask.any(), s.family
        np.testing.assert_array_equal(s.mask, diff > 0)  # exact: changed pixels == mask
        assert diff[s.mask].min() > MASK_TOL
        assert s.mask.mean() < 0.5  # a defect, not a new image
        assert diff[s.mask].mean() > 0.04, s.family  # visible


def test_same_seed_same_anomalies_other_seed_other_anomalies() -> None:
    imgs = _normals(3, 1)
    a, b, c = pseudo_anomalies(imgs, seed=0), pseudo_anomalies(imgs, seed=0), pseudo_anomalies(imgs, seed=1)
    assert all(np.array_equal(x.image, y.image) and np.array_equal(x.mask, y.mask) for x, y in zip(a, b))
    assert sum(np.array_equal(x.mask, y.mask) for x, y in zip(a, c)) < len(a) // 2
    # an image's anomalies do not depend on how many images come after it
    first = pseudo_anomalies(imgs[:2] + [imgs[1]], seed=0)
    assert np.array_equal(first[0].image, a[0].image)


def test_families_differ_in_shape() -> None:
    imgs = _normals(6, 1, (64, 64))
    s = pseudo_anomalies(imgs, seed=0)
    area = {f: np.mean([x.mask.mean() for x in s if x.family == f]) for f in FAMILIES}
    assert area["scratch"] < area["blob"] and area["scratch"] < area["cutpaste"]  # thin lines vs regions


def test_bad_arguments() -> None:
    img = _normals(1, 1)[0]
    with pytest.raises(ValueError, match="unknown pseudo-anomaly family"):
        add_pseudo_anomaly(img, np.random.default_rng(0), "hole")
    with pytest.raises(ValueError, match="CHW"):
        add_pseudo_anomaly(img[0], np.random.default_rng(0), "blob")
    with pytest.raises(ValueError, match="donor shape"):
        add_pseudo_anomaly(img, np.random.default_rng(0), "cutpaste", donor=img[:, :10])


def test_perlin_noise_is_smooth_and_bounded() -> None:
    n = perlin_noise(np.random.default_rng(0), 64, 96, (4, 6))
    assert n.shape == (64, 96) and np.abs(n).max() < 1.0 and n.std() > 0.05
    assert np.abs(np.diff(n, axis=1)).max() < 0.2  # continuous at the pixel scale
