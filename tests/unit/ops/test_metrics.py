"""Tests for imganom.ops.metrics: hand-computed image metrics, histogram pixel metrics against sklearn and
brute force, streaming AUPRO against the exact reference, exact Dice/IoU, bounded memory."""

from __future__ import annotations

import json
import math
import tracemalloc

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from imganom.ops.metrics import EvalAccumulator, ImageMetrics, PixelMetrics, aupro_reference, roc_points


def _no_nan(obj) -> None:
    """Results must be JSON-serialisable without NaN/inf anywhere."""
    json.dumps(obj, allow_nan=False)


def _blobs(rng: np.random.Generator, h: int, w: int, n: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    for _ in range(n):
        y, x = rng.integers(0, h - 6), rng.integers(0, w - 8)
        m[y : y + rng.integers(1, 6), x : x + rng.integers(1, 8)] = True
    return m


def _pixels(*items: tuple[np.ndarray, np.ndarray | None], **kw) -> PixelMetrics:
    pm = PixelMetrics(**kw)
    for a, m in items:
        pm.add(a, m)
    return pm


# ---------------------------------------------------------------- image level


def test_image_metrics_hand_computed():
    im = ImageMetrics()
    for s, y in [(0.1, 0), (0.4, 0), (0.35, 1), (0.8, 1)]:
        im.add(s, y, "crack" if y else "good")
    r = im.compute(threshold=0.4)
    # pos/neg pairs: 0.35>0.1, 0.35<0.4, 0.8>0.1, 0.8>0.4 -> 3/4
    assert r["auroc"] == pytest.approx(0.75)
    # ranked: 0.8(+) P=1 R=.5, 0.4(-), 0.35(+) P=2/3 R=1 -> AP = .5*1 + .5*2/3
    assert r["ap"] == pytest.approx(0.5 + 1 / 3)
    # t=0.35: TP2 FP1 FN0 -> F1 = 4/5 (t=0.8: 2/3, t=0.4: 1/2, t=0.1: 2/3)
    assert r["f1_max"] == pytest.approx(0.8)
    assert r["f1_max_threshold"] == pytest.approx(0.35)
    # t=0.4 flags 0.4(-) and 0.8(+): TP1 FP1 FN1
    assert r["f1_at_threshold"] == pytest.approx(0.5)
    assert r["fpr_at_threshold"] == pytest.approx(0.5)
    assert r["tpr_at_threshold"] == pytest.approx(0.5)
    assert (r["n_images"], r["n_anomalous"], r["n_good"]) == (4, 2, 2)
    assert r["reasons"] == {}
    _no_nan(r)


def test_image_threshold_is_inclusive_and_ties_count_half():
    im = ImageMetrics()
    for s, y in [(0.5, 0), (0.5, 1), (0.9, 1)]:
        im.add(s, y)
    r = im.compute(threshold=0.5)
    assert r["auroc"] == pytest.approx(0.75)  # tie counts 1/2, 0.9 > 0.5 counts 1
    assert r["tpr_at_threshold"] == 1.0 and r["fpr_at_threshold"] == 1.0  # score >= threshold is anomalous


def test_image_one_class_gives_none_with_reason():
    im = ImageMetrics()
    for s in (0.1, 0.2, 0.7):
        im.add(s, 0)
    r = im.compute(threshold=0.5)
    for k in ("auroc", "ap", "f1_max", "f1_max_threshold", "tpr_at_threshold"):
        assert r[k] is None and r["reasons"][k]
    assert "only good" in r["reasons"]["auroc"]
    assert r["fpr_at_threshold"] == pytest.approx(1 / 3)
    assert r["f1_at_threshold"] == 0.0  # one false positive, nothing to find
    _no_nan(r)
    assert ImageMetrics().compute()["reasons"]["auroc"].endswith("no images")
    assert ImageMetrics().compute()["reasons"]["f1_at_threshold"] == "no threshold"


def test_image_rejects_bad_input():
    im = ImageMetrics()
    with pytest.raises(ValueError, match="label"):
        im.add(0.3, 2)
    with pytest.raises(ValueError, match="finite"):
        im.add(math.nan, 1)
    assert len(im) == 0


# ---------------------------------------------------------------- pixel level


def test_roc_points_match_brute_force_counts():
    rng = np.random.default_rng(1)
    bins, lo, hi = 50, 0.0, 1.0
    pos = (rng.integers(0, bins, 300) + 0.5) / bins  # bin centres: binning is exact
    neg = (rng.integers(0, bins, 900) + 0.5) / bins
    labels = np.r_[np.ones(300), np.zeros(900)]
    pm = _pixels((np.concatenate([pos, neg])[None], labels[None]), lo=lo, hi=hi, bins=bins)
    fpr, tpr = roc_points(pm.pos_hist, pm.neg_hist)
    assert len(fpr) == bins + 1 and (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    for j in range(bins + 1):
        edge = lo + (bins - j) * (hi - lo) / bins  # point j flags the top j bins
        if j == 0:
            edge = np.inf
        assert fpr[j] == pytest.approx(np.mean(neg >= edge)) and tpr[j] == pytest.approx(np.mean(pos >= edge))
    with pytest.raises(ValueError, match="both classes"):
        roc_points(pm.pos_hist, np.zeros(bins))


def test_pixel_auroc_matches_sklearn_pooled():
    rng = np.random.default_rng(2)
    masks = [_blobs(rng, 48, 56, 6) for _ in range(3)] + [np.zeros((48, 56), bool)]
    amaps = [np.clip(0.3 * m + rng.normal(0.4, 0.2, m.shape), 0, 1) for m in masks]
    r = _pixels(*zip(amaps, masks, strict=True)).compute()
    y = np.concatenate([m.ravel() for m in masks])
    s = np.concatenate([a.ravel() for a in amaps])
    assert abs(r["auroc"] - roc_auc_score(y, s)) < 1e-3
    assert 0.6 < r["auroc"] < 0.99  # a non-trivial case
    assert r["n_pixels"] == y.size and r["n_anomalous_pixels"] == y.sum()
    _no_nan(r)


def test_pixel_auroc_and_f1_exact_on_quantised_scores():
    """Scores on bin centres with many ties: histogram AUROC and F1-max equal the exact values."""
    rng = np.random.default_rng(3)
    bins = 20
    masks = [_blobs(rng, 30, 30, 4) for _ in range(2)]
    amaps = [(rng.integers(0, bins, m.shape) + 0.5 + 5 * m).clip(0, bins - 0.5) / bins for m in masks]
    r = _pixels(*zip(amaps, masks, strict=True), bins=bins).compute()
    y = np.concatenate([m.ravel() for m in masks])
    s = np.concatenate([a.ravel() for a in amaps])
    assert r["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    f1 = [2 * np.sum((s >= t) & y) / (np.sum(s >= t) + y.sum()) for t in np.unique(s)]
    assert r["f1_max"] == pytest.approx(max(f1), abs=1e-12)
    t_best = np.unique(s)[int(np.argmax(f1))]
    assert r["f1_max_threshold"] == pytest.approx(t_best - 0.5 / bins)  # lower edge of t_best's bin


def test_dice_iou_exact_at_threshold():
    a = np.array([[0.9, 0.2, 0.7, 0.1]])
    m = np.array([[255, 255, 0, 0]], np.uint8)
    r = _pixels((a, m), threshold=0.7).compute()  # TP1 (0.9) FP1 (0.7 >= 0.7) FN1 (0.2)
    assert r["dice_at_threshold"] == pytest.approx(0.5) and r["iou_at_threshold"] == pytest.approx(1 / 3)
    # pooled over images equals counts on the concatenated pixels, not a mean of per-image scores
    rng = np.random.default_rng(4)
    masks = [_blobs(rng, 20, 20, 3) for _ in range(4)] + [None]
    amaps = [rng.random((20, 20)) for _ in masks]
    r = _pixels(*zip(amaps, masks, strict=True), threshold=0.6).compute()
    p = np.concatenate([a.ravel() >= 0.6 for a in amaps])
    y = np.concatenate([(m if m is not None else np.zeros((20, 20), bool)).ravel() for m in masks])
    tp, fp, fn = np.sum(p & y), np.sum(p & ~y), np.sum(~p & y)
    assert r["dice_at_threshold"] == 2 * tp / (2 * tp + fp + fn)
    assert r["iou_at_threshold"] == tp / (tp + fp + fn)
    assert _pixels((a, m)).compute()["reasons"]["dice_at_threshold"] == "no pixel threshold"


def test_mask_forms_and_shape_errors():
    rng = np.random.default_rng(5)
    a = rng.random((16, 24))
    m = _blobs(rng, 16, 24, 3)
    r_bool = _pixels((a, m)).compute()
    r_255 = _pixels((a, m.astype(np.uint8) * 255)).compute()
    assert r_bool["auroc"] == r_255["auroc"] and r_bool["aupro_0.3"] == r_255["aupro_0.3"]
    none, zeros = _pixels((a, None)), _pixels((a, np.zeros_like(m)))
    assert np.array_equal(none.neg_hist, zeros.neg_hist) and none.pos_hist.sum() == 0
    with pytest.raises(ValueError, match=r"\(16, 20\).*\(16, 24\)"):
        PixelMetrics().add(a, m[:, :20])
    with pytest.raises(ValueError, match="2-D"):
        PixelMetrics().add(a[None], None)
    with pytest.raises(ValueError, match="NaN"):
        PixelMetrics().add(np.full((2, 2), np.nan), None)


def test_pixel_single_class_and_clipping_reported():
    rng = np.random.default_rng(6)
    r = _pixels((rng.random((8, 8)), None), threshold=0.5).compute()
    assert r["auroc"] is None and r["aupro_0.3"] is None and r["f1_max"] is None
    assert r["reasons"]["auroc"] == "no anomalous pixels"
    assert r["reasons"]["aupro_0.3"] == "no anomalous regions"
    assert r["dice_at_threshold"] == 0.0  # false positives only
    _no_nan(r)
    assert PixelMetrics().compute()["reasons"]["auroc"] == "no images"
    r = _pixels((rng.random((8, 8)) * 4 - 1, None)).compute()  # range [-1, 3] vs bins over [0, 1]
    assert r["clipped_below"] > 0.1 and r["clipped_above"] > 0.3 and r["warnings"]


def test_eight_connectivity():
    m = np.zeros((6, 6), bool)
    m[1, 1] = m[2, 2] = True  # diagonal neighbours: one region
    m[4, 4] = True
    assert _pixels((np.zeros((6, 6)), m)).compute()["n_regions"] == 2


# ---------------------------------------------------------------- AUPRO


def _aupro_case(kind: str, rng: np.random.Generator):
    masks = [_blobs(rng, 40, 40, 5) for _ in range(3)] + [np.zeros((40, 40), bool)]
    if kind == "random":
        amaps = [rng.random(m.shape) for m in masks]
    elif kind == "structured":  # anomalies brighter but noisy, with quantised ties
        amaps = [np.round(np.clip(0.35 * m + rng.random(m.shape) * 0.7, 0, 1), 2) for m in masks]
    elif kind == "perfect":
        amaps = [m.astype(float) for m in masks]
    else:  # inverted
        amaps = [1.0 - m for m in masks]
    return amaps, masks


@pytest.mark.parametrize("kind", ["random", "structured", "perfect", "inverted"])
def test_aupro_streaming_matches_reference(kind):
    amaps, masks = _aupro_case(kind, np.random.default_rng(7))
    r = _pixels(*zip(amaps, masks, strict=True)).compute()
    assert r["aupro_0.3"] == pytest.approx(aupro_reference(amaps, masks), abs=1e-2)
    expected = {"perfect": 1.0, "inverted": 0.0}
    if kind in expected:
        assert r["aupro_0.3"] == pytest.approx(expected[kind], abs=1e-9)
    curve = r["pro_curve"]
    assert len(curve["fpr"]) <= 200 and curve["fpr"][0] == 0.0 and curve["fpr"][-1] == pytest.approx(0.3)
    assert np.all(np.diff(curve["fpr"]) >= 0) and np.all(np.diff(curve["pro"]) >= -1e-12)


def test_aupro_random_scores_near_0_15():
    """PRO(fpr) = fpr for scores independent of the mask, so AUPRO@0.3 = (0.3^2 / 2) / 0.3 = 0.15."""
    rng = np.random.default_rng(8)
    masks = [_blobs(rng, 96, 96, 25) for _ in range(4)]
    amaps = [rng.random(m.shape) for m in masks]
    r = _pixels(*zip(amaps, masks, strict=True)).compute()
    assert r["n_regions"] > 50
    assert r["aupro_0.3"] == pytest.approx(0.15, abs=0.01)


def test_aupro_fpr_limit_interpolates_and_names_key():
    amaps, masks = _aupro_case("structured", np.random.default_rng(9))
    pm = _pixels(*zip(amaps, masks, strict=True))
    for limit in (0.05, 0.3, 1.0):
        r = pm.compute(fpr_limit=limit)
        assert r[f"aupro_{limit:g}"] == pytest.approx(aupro_reference(amaps, masks, limit), abs=1e-2)


def test_aupro_step_exactly_at_limit():
    """Normal scores reach FPR 0.3 before any region pixel: zero area, curve ends on the step's top."""
    a = np.array([[0.8, 0.8, 0.8, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.5, 0.5]])
    m = np.array([[0] * 10 + [1, 1]])
    r = _pixels((a, m)).compute()
    assert r["aupro_0.3"] == pytest.approx(0.0, abs=1e-12) and aupro_reference([a], [m]) == 0.0
    assert (r["pro_curve"]["fpr"][-1], r["pro_curve"]["pro"][-1]) == (pytest.approx(0.3), pytest.approx(1.0))


# ---------------------------------------------------------------- memory and aggregation


def test_memory_does_not_grow_with_images():
    rng = np.random.default_rng(10)
    pm = PixelMetrics(threshold=0.5)

    def buffers() -> int:
        return sum(v.nbytes for v in vars(pm).values() if isinstance(v, np.ndarray))

    a = rng.random((256, 256), dtype=np.float32)
    m = _blobs(rng, 256, 256, 10)
    pm.add(a, m)
    size = buffers()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(20):
            pm.add(a, m)
        retained, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert buffers() == size == 3 * 20_000 * 8
    assert retained - before < 20_000  # nothing per pixel (20 x 256^2 pixels) is kept
    assert peak - before < 8 * a.size * 8  # per-image temporaries only
    assert pm.n_images == 21


def test_eval_accumulator_per_type_and_single_binning(monkeypatch):
    rng = np.random.default_rng(11)
    calls = []
    orig_add = PixelMetrics.add
    monkeypatch.setattr(PixelMetrics, "add", lambda self, a, m: (calls.append(1), orig_add(self, a, m)))
    acc = EvalAccumulator(pixel_threshold=0.6, bins=5000)
    items = []
    for i in range(9):
        label, kind = (0, "good") if i < 3 else (1, ["crack", "scratch"][i % 2])
        m = _blobs(rng, 24, 24, 3) if label else None
        a = np.clip(rng.random((24, 24)) * 0.8 + (0.3 * m if label else 0), 0, 1)
        score = float(a.max()) + 0.1 * label * (kind == "crack")
        items.append((score, label, a, m, kind))
        acc.add(score, label, a, m, kind)
    assert len(calls) == 9  # every image binned exactly once
    r = acc.compute(image_threshold=0.9)
    _no_nan(r)

    def direct(keep):
        return _pixels(*[(a, m) for s, y, a, m, t in items if keep(y, t)], threshold=0.6, bins=5000).compute()

    assert r["pixel"]["auroc"] == direct(lambda y, t: True)["auroc"]
    assert r["pixel"]["dice_at_threshold"] == direct(lambda y, t: True)["dice_at_threshold"]
    assert set(r["per_type"]) == {"crack", "scratch"}
    for t, entry in r["per_type"].items():
        sub = [(s, y) for s, y, _, _, tt in items if y == 0 or tt == t]
        assert entry["count"] == sum(y for _, y in sub)
        assert entry["image_auroc"] == pytest.approx(roc_auc_score([y for _, y in sub], [s for s, _ in sub]))
        ref = direct(lambda y, tt, t=t: y == 0 or tt == t)
        assert entry["pixel_auroc"] == ref["auroc"] and entry["aupro_0.3"] == ref["aupro_0.3"]
    assert r["image"]["n_images"] == 9 and r["image"]["tpr_at_threshold"] is not None
    with pytest.raises(ValueError, match="label"):
        acc.add(0.5, 3, a, None)
    assert acc.images.compute()["n_images"] == 9  # a rejected image leaves no trace
    with pytest.raises(ValueError, match="merge"):
        PixelMetrics(bins=10) + PixelMetrics(bins=20)
