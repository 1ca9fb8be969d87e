"""ops.uncertainty and ops.latent on synthetic data: verdict confidence, region confidence, anomaly mass
shares, and the latent density score."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imganom.config import PostprocessConfig
from imganom.ops.latent import combined_score, fit_latent_stats, has_latent_stats, mahalanobis, project
from imganom.ops.postprocess import postprocess
from imganom.ops.uncertainty import (
    mass_shares,
    region_confidence,
    region_pixels,
    score_spread,
    verdict_confidence,
)


def test_confidence_is_monotone_in_distance_to_threshold_on_sampled_scores() -> None:
    """Synthetic images: a score at distance d from the threshold, K sample scores spread around it. The
    confidence grows with d (same spread), shrinks with the spread (same d), and stays in [0, 1]."""
    rng = np.random.default_rng(0)
    thr, k = 5.0, 16
    noise = rng.normal(size=k)  # the same draws for every image: only d changes
    dists = np.linspace(0.0, 3.0, 40)
    for side in (-1, 1):
        scores = [thr + side * d for d in dists]
        conf = [verdict_confidence(s, thr, score_spread(s + 0.4 * noise)) for s in scores]
        assert all(0.0 <= c <= 1.0 for c in conf)
        assert conf[0] == 0.0 and conf[-1] > 0.99
        assert np.all(np.diff(conf) > 0)
    wide = [verdict_confidence(thr + 1.0, thr, s) for s in (0.1, 0.5, 1.0, 2.0)]
    assert np.all(np.diff(wide) < 0)
    assert verdict_confidence(thr + 0.4, thr, 0.4) == pytest.approx(0.6827, abs=1e-4)  # one spread: 68 %
    assert verdict_confidence(6.0, None, 0.3) is None and verdict_confidence(6.0, 5.0, None) is None
    assert verdict_confidence(6.0, 5.0, 0.0) == 1.0 and verdict_confidence(5.0, 5.0, 0.0) == 0.0


def _two_blobs() -> np.ndarray:
    amap = np.zeros((40, 60), np.float32)
    amap[5:12, 5:12] = 3.0  # area 49, excess 2 each
    amap[25:30, 40:50] = 1.5  # area 50, excess 0.5 each
    amap[35, 2] = 1.2  # a single pixel: dropped by min_area, its mass stays in the total
    return amap


def test_region_pixels_confidence_and_mass_shares() -> None:
    amap = _two_blobs()
    cfg = PostprocessConfig(sigma=0, open_radius=0, close_radius=0, min_area=5)
    mask, regions = postprocess(amap, 1.0, cfg)
    assert len(regions) == 2
    pixels = region_pixels(mask, regions)
    assert [p.size for p in pixels] == [r.area for r in regions] == [49, 50]
    # K = 4 samples: region 1 exceeds in all four, region 2 in one (a single pixel is enough)
    exceed = np.zeros((4, *amap.shape), bool)
    exceed[:, 8, 8] = True
    exceed[2, 27, 45] = True
    exceed[1, 0, 0] = True  # outside both regions: counts for neither
    conf = region_confidence(exceed, pixels)
    assert conf == [1.0, 0.25]
    assert all(0.0 <= c <= 1.0 for c in region_confidence(np.random.default_rng(1).random((7, 40, 60)) > 0.9,
                                                          pixels))  # fmt: skip
    total, shares = mass_shares(amap, 1.0, pixels)
    assert total == pytest.approx(49 * 2.0 + 50 * 0.5 + 0.2)
    assert shares == pytest.approx([98 / total, 25 / total])
    assert sum(shares) < 1.0  # the dropped pixel's mass is in no region
    roi = np.ones(amap.shape, bool)
    roi[35, 2] = False
    total, shares = mass_shares(amap, 1.0, pixels, roi)
    assert sum(shares) == pytest.approx(1.0)  # all the mass inside the ROI lies in the regions


def test_latent_mahalanobis_is_higher_for_synthetic_anomalies() -> None:
    rng = np.random.default_rng(0)
    d = 16
    a = rng.normal(size=(d, d)) / 4
    normals = rng.normal(size=(300, d)) @ a + 1.0  # correlated normals
    test_ok = rng.normal(size=(100, d)) @ a + 1.0
    test_bad = test_ok + rng.normal(size=(100, d)) * 0.8  # off the normals' manifold
    stats = fit_latent_stats(normals)
    assert has_latent_stats(stats) and not has_latent_stats({"latent_mean": stats["latent_mean"]})
    assert stats["latent_precision"].shape == (d, d) and stats["latent_pca"].shape == (2, d)
    ok, bad = mahalanobis(test_ok, stats), mahalanobis(test_bad, stats)
    assert np.mean(bad[:, None] > ok[None, :]) > 0.95  # AUROC of the latent score
    assert project(test_ok, stats).shape == (100, 2)
    assert len(stats["latent_normals_2d"]) <= 400
    comb = combined_score(np.array([3.0]), np.array([7.0]), (1.0, 2.0), (5.0, 1.0))
    assert comb.tolist() == [3.0]  # (3 - 1) / 2 + (7 - 5) / 1
    with pytest.raises(ValueError, match="at least 3"):
        fit_latent_stats(normals[:2])
    assert isinstance(stats["latent_mean"], torch.Tensor)
