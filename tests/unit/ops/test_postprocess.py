import json

import cv2
import numpy as np
import pytest

from imganom.config import PostprocessConfig
from imganom.ops.postprocess import (
    binarize,
    border_roi,
    find_regions,
    image_score,
    load_roi,
    postprocess,
    structuring_element,
)

NO_MORPH = PostprocessConfig(open_radius=0, close_radius=0, min_area=0)


def two_blobs() -> np.ndarray:
    """60x80 map: 10x20 blob (peak 0.9) at x 10..29, y 5..14; 4x4 blob (peak 0.7) at x 50..53, y 40..43."""
    amap = np.full((60, 80), 0.1, dtype=np.float32)
    amap[5:15, 10:30] = 0.6
    amap[8, 12] = 0.9
    amap[40:44, 50:54] = 0.7
    return amap


def test_region_fields_exact():
    amap = two_blobs()
    mask, regions = postprocess(amap, 0.5, NO_MORPH)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    assert len(regions) == 2
    big, small = regions
    assert (big.id, small.id) == (1, 2)  # ordered by peak, descending
    assert big.bbox == (10, 5, 30, 15)
    assert big.area == 200
    assert big.area_pct == pytest.approx(100 * 200 / (60 * 80))
    assert big.centroid == pytest.approx((19.5, 9.5))
    assert big.peak == pytest.approx(0.9)
    assert big.mean == pytest.approx((199 * 0.6 + 0.9) / 200)
    assert small.bbox == (50, 40, 54, 44)
    assert small.area == 16
    assert small.centroid == pytest.approx((51.5, 41.5))
    assert small.peak == pytest.approx(0.7) and small.mean == pytest.approx(0.7)
    d = big.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert type(d["peak"]) is float and type(d["area"]) is int and type(d["bbox"][0]) is int


def test_regions_ordered_by_peak_not_size():
    amap = two_blobs()
    amap[41, 51] = 2.0  # the small blob now has the highest peak
    _, regions = postprocess(amap, 0.5, NO_MORPH)
    assert [r.area for r in regions] == [16, 200]
    assert [r.id for r in regions] == [1, 2]


def test_min_area_drops_small_blob_from_regions_and_mask():
    amap = two_blobs()
    mask, regions = postprocess(amap, 0.5, NO_MORPH.model_copy(update={"min_area": 17}))
    assert len(regions) == 1 and regions[0].area == 200
    assert mask[40:44, 50:54].sum() == 0
    assert mask.sum() == 200


def test_eight_connectivity_joins_diagonal_pixels():
    mask = np.zeros((10, 10), np.uint8)
    mask[2, 2] = mask[3, 3] = mask[4, 4] = 1
    _, regions = find_regions(mask, np.zeros((10, 10), np.float32), min_area=0)
    assert len(regions) == 1 and regions[0].area == 3


def test_opening_removes_speckle_but_keeps_blob():
    amap = two_blobs()
    amap[20:35:3, 35:45:3] = 0.95  # isolated 1-px speckle away from both blobs
    cfg = PostprocessConfig(open_radius=1, close_radius=0, min_area=0)
    assert binarize(amap, 0.5, PostprocessConfig(open_radius=0, close_radius=0)).sum() > 216
    mask = binarize(amap, 0.5, cfg)
    assert mask[20:35, 35:45].sum() == 0
    assert mask[5:15, 10:30].sum() > 150  # opening trims corners only


def test_closing_fills_pinhole():
    amap = two_blobs()
    amap[10, 20] = 0.0
    assert binarize(amap, 0.5, NO_MORPH)[10, 20] == 0
    assert binarize(amap, 0.5, PostprocessConfig(open_radius=0, close_radius=1))[10, 20] == 1


def test_roi_excludes_blob_and_sets_area_pct():
    amap = two_blobs()
    roi = np.ones(amap.shape, bool)
    roi[:, 40:] = False  # exclude the small blob
    mask, regions = postprocess(amap, 0.5, PostprocessConfig(close_radius=2, min_area=0), roi=roi)
    assert len(regions) == 1 and regions[0].bbox[0] == 10
    assert mask[:, 40:].sum() == 0
    assert regions[0].area_pct == pytest.approx(100 * regions[0].area / roi.sum())


def test_flat_subthreshold_map_has_no_regions():
    amap = np.full((32, 32), 0.3, np.float64)
    mask, regions = postprocess(amap, 0.5, PostprocessConfig())
    assert regions == [] and mask.sum() == 0 and mask.shape == (32, 32)


def test_image_score_max_vs_topk_mean():
    amap = np.zeros((10, 10), np.float32)
    amap.flat[:5] = [5, 4, 3, 2, 1]
    assert image_score(amap, PostprocessConfig(score="max")) == 5
    assert image_score(amap, PostprocessConfig(score="topk_mean", topk=0.03)) == pytest.approx(4.0)
    assert image_score(amap, PostprocessConfig(score="topk_mean", topk=0.001)) == 5  # at least 1 pixel
    assert image_score(amap, PostprocessConfig(score="topk_mean", topk=1.0)) == pytest.approx(0.15)
    roi = np.ones((10, 10), bool)
    roi.flat[0] = False
    assert image_score(amap, PostprocessConfig(score="max"), roi=roi) == 4


def test_image_score_elbo_is_rejected():
    with pytest.raises(ValueError, match="ELBO"):
        image_score(np.zeros((4, 4), np.float32), PostprocessConfig(score="elbo"))


def test_input_validation():
    cfg = PostprocessConfig()
    with pytest.raises(ValueError, match=r"\(10, 10\).*\(12, 12\)"):
        postprocess(np.zeros((12, 12), np.float32), 0.5, cfg, roi=np.ones((10, 10), bool))
    with pytest.raises(ValueError, match="2-D"):
        postprocess(np.zeros((3, 12, 12), np.float32), 0.5, cfg)
    with pytest.raises(ValueError, match="float"):
        postprocess(np.zeros((12, 12), np.uint8), 0.5, cfg)
    bad = np.zeros((12, 12), np.float32)
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        image_score(bad, cfg)


def test_structuring_element_and_border_roi():
    assert structuring_element(0).shape == (1, 1)
    se = structuring_element(2)
    assert se.shape == (5, 5) and se[2, 2] == 1 and se[0, 0] == 0
    assert border_roi((20, 30), 0) is None
    roi = border_roi((20, 30), 3)
    assert roi.shape == (20, 30) and roi.sum() == 14 * 24
    assert not roi[2, 10] and roi[3, 3] and not roi[10, 27]
    with pytest.raises(ValueError):
        border_roi((6, 30), 3)


def test_load_roi_resizes_nearest(tmp_path):
    img = np.zeros((10, 20), np.uint8)
    img[:, 10:] = 7  # right half = inspect (any nonzero value)
    path = tmp_path / "roi.png"
    cv2.imwrite(str(path), img)
    roi = load_roi(path, (40, 80))
    assert roi.dtype == bool and roi.shape == (40, 80)
    assert not roi[:, :40].any() and roi[:, 40:].all()

    color = np.zeros((10, 20, 3), np.uint8)
    color[2:5, 2:5, 0] = 1  # a blue-only nonzero region still counts
    cv2.imwrite(str(tmp_path / "c.png"), color)
    assert load_roi(tmp_path / "c.png", (10, 20)).sum() == 9


def test_load_roi_errors_name_the_file(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="junk.png"):
        load_roi(junk, (8, 8))
    with pytest.raises(ValueError, match="missing.png"):
        load_roi(tmp_path / "missing.png", (8, 8))
    empty = tmp_path / "empty.png"
    cv2.imwrite(str(empty), np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="empty.png"):
        load_roi(empty, (8, 8))
