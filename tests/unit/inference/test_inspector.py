"""Inspector: every input kind, real detections with the tiny trained model, calibrated false-reject rate,
tiling/letterbox geometry, input errors, thread safety, determinism, threshold overrides, calibrate CLI."""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import cli_env, imganom_cmd
from PIL import Image

from imganom.config import load_config
from imganom.data.discovery import find_images, scan_mvtec
from imganom.data.preprocess import prepare
from imganom.data.readers import ImageReadError
from imganom.formats.modelfile import read_meta, save_model
from imganom.inference.inspector import Inspector, Result
from imganom.models.vae import ConvVAE
from imganom.workflows.calibrate import calibrate


@pytest.fixture(scope="module")
def insp(tiny_model: Path) -> Inspector:
    return Inspector.load(tiny_model, device="cpu")


@pytest.fixture(scope="module")
def layout(synth_root: Path):
    return scan_mvtec(synth_root)


def _gray(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None and img.ndim == 2
    return img


def test_load_and_predict_path(insp: Inspector, layout) -> None:
    good = next(it for it in layout.test if it.label == 0)
    r = insp.predict(good.path)
    assert isinstance(r, Result)
    assert r.id == str(good.path) and r.meta is not None and r.meta.format == "png"
    assert r.anomaly_map.shape == (64, 64) and r.anomaly_map.dtype == np.float32
    assert r.mask.shape == (64, 64) and r.mask.dtype == np.uint8
    assert np.isfinite(r.score) and np.isfinite(r.norm_score)
    assert r.thresholds == {"image": insp.image_threshold, "pixel": insp.pixel_threshold}
    d = r.to_dict()
    assert d["verdict"] == r.verdict and d["size"] == [64, 64] and d["n_regions"] == len(r.regions)
    assert {"decode", "infer", "post", "total"} <= set(r.timing)


def test_predict_accepts_arrays_pil_and_lists(insp: Inspector, layout) -> None:
    defect = next(it for it in layout.test if it.label == 1)
    gray = _gray(defect.path)
    ref = insp.predict(defect.path).score
    assert insp.predict(gray).score == pytest.approx(ref, rel=1e-6)  # HW uint8
    assert insp.predict(gray[:, :, None]).score == pytest.approx(ref, rel=1e-6)  # HWC, 1 channel
    assert insp.predict(gray[None]).score == pytest.approx(ref, rel=1e-6)  # CHW
    assert insp.predict(gray.astype(np.float32) / 255).score == pytest.approx(ref, rel=1e-6)  # float [0, 1]
    assert insp.predict(np.dstack([gray] * 3)).score == pytest.approx(ref, rel=1e-4)  # RGB -> luma
    assert insp.predict(Image.open(defect.path)).score == pytest.approx(ref, rel=1e-6)
    assert insp.predict(Image.fromarray(np.dstack([gray] * 3))).score == pytest.approx(ref, rel=1e-4)
    assert insp.predict(gray).id == "<input 0>"
    good = next(it for it in layout.test if it.label == 0)
    rs = insp.predict([defect.path, gray, good.path])
    assert isinstance(rs, list) and len(rs) == 3
    assert [r.score for r in rs] == pytest.approx([ref, ref, insp.predict(good.path).score], rel=1e-5)
    assert rs[0].verdict == "NG" and rs[2].verdict == "OK"
    # predict_batch streams in order across several device batches
    many = [it.path for it in layout.test]
    streamed = list(insp.predict_batch(many, batch_size=3))
    assert [r.id for r in streamed] == [str(p) for p in many]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_defects_are_found_where_they_are(insp: Inspector, layout) -> None:
    """Every synthetic defect is NG with a region on its ground-truth mask; every normal test image is OK."""
    assert insp.calibrated
    ious = []
    for it in layout.test:
        r = insp.predict(it.path)
        if it.label == 0:
            assert r.verdict == "OK" and r.regions == [] and r.mask.sum() == 0, (it.id, r.score)
            continue
        gt = _gray(it.mask_path) > 0
        pred = r.mask > 0
        assert r.verdict == "NG" and r.score > insp.image_threshold, (it.id, r.score)
        assert r.regions, it.id
        # the strongest region's box lies on the defect
        x0, y0, x1, y1 = r.regions[0].bbox
        assert gt[y0:y1, x0:x1].any(), it.id
        assert r.regions[0].peak >= insp.pixel_threshold
        ious.append(_iou(pred, gt))
        assert ious[-1] > 0.1, (it.id, ious[-1])
    assert len(ious) == 10 and float(np.mean(ious)) > 0.4, ious


def test_calibrated_false_reject_rate(insp: Inspector, tiny_model: Path, tmp_path: Path) -> None:
    """Thresholds from 40 normals at target_fpr=0.1 reject <= ~20% of 200 fresh normals (sampling error).

    The threshold is a 90% upper confidence bound, so the rate is usually below 0.1 (about 0.05 here), but it
    is a quantile, not the maximum: some fresh normals do exceed it."""
    from imganom.data.synth import make_dataset

    make_dataset(tmp_path / "fresh", n_train=0, n_test_good=240, n_test_defect=0, size=64, seed=11)
    normals = find_images(tmp_path / "fresh" / "test" / "good")
    loaded = Inspector.load(tiny_model, device="cpu")
    cfg = loaded.cfg.calibration.model_copy(update={"target_fpr": 0.1})
    cal, stats = calibrate(loaded, normals[:40], cfg)
    assert loaded.image_threshold == insp.image_threshold  # calibration returns, never mutates
    fresh = loaded.with_calibration(cal, stats)
    assert cal["n_images"] == 40 and cal["image_info"]["method"] == "order_statistic"
    assert fresh.image_threshold == cal["image_threshold"] != insp.image_threshold
    assert fresh.pixel_threshold == cal["pixel_threshold"] and fresh.meta.calibration is cal
    assert cal["image_info"]["empirical_fpr"] <= 0.1
    rejected = [r.is_anomalous for r in fresh.predict_batch(normals[40:], batch_size=16)]
    fpr = float(np.mean(rejected))
    assert len(rejected) == 200 and 0.0 < fpr <= 0.2, fpr
    # the score distribution moved with the data: a threshold far below it would reject everything
    assert cal["normal_scores"]["min"] < cal["image_threshold"] < 2 * cal["normal_scores"]["max"]


# ---------------------------------------------------------------------------------------------- geometry


@pytest.fixture(scope="module")
def geo_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One random-init 32 px model saved with resize = stretch / tile / letterbox (same weights)."""
    d = tmp_path_factory.mktemp("geo")
    torch.manual_seed(0)
    base = load_config("tiny", {"preprocess": {"size": [32, 32]}})
    model = ConvVAE(base.model, 1, (32, 32)).eval()
    cal = {"image_threshold": 0.5, "pixel_threshold": 0.5}
    out = {}
    for mode in ("stretch", "tile", "letterbox"):
        cfg = load_config("tiny", {"preprocess": {"size": [32, 32], "resize": mode}})
        out[mode] = d / f"{mode}.safetensors"
        save_model(out[mode], model, cfg, calibration=cal)
    return out


def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 2.0)
    return (255 * (img - img.min()) / (img.max() - img.min())).astype(np.uint8)


def test_model_sized_image_same_in_tile_and_stretch(geo_models: dict[str, Path]) -> None:
    img = _texture(32, 32)
    a = Inspector.load(geo_models["stretch"], device="cpu").predict(img)
    b = Inspector.load(geo_models["tile"], device="cpu").predict(img)
    np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=1e-5, atol=1e-7)
    assert a.score == pytest.approx(b.score, rel=1e-5)


def test_tiled_large_image_has_original_size_and_no_seams(geo_models: dict[str, Path]) -> None:
    tile = Inspector.load(geo_models["tile"], device="cpu")
    img = _texture(64, 64, seed=1)
    r = tile.predict(img)
    assert r.anomaly_map.shape == (64, 64) and r.mask.shape == (64, 64)
    amap = r.anomaly_map
    assert np.isfinite(amap).all()
    # recompute the per-tile maps: the blend is a convex combination of the tiles covering each pixel ...
    chw = img[None].astype(np.float32) / 255
    views, geom = prepare(chw, tile.cfg.preprocess)
    assert len(geom.tiles) == 9  # 3 x 3 tiles of 32 with >= 25% overlap
    maps = tile.model_maps(torch.from_numpy(views))[0].cpu().numpy()
    lo, hi = np.full((64, 64), np.inf), np.full((64, 64), -np.inf)
    for m, (y, x) in zip(maps, geom.tiles):
        lo[y : y + 32, x : x + 32] = np.minimum(lo[y : y + 32, x : x + 32], m)
        hi[y : y + 32, x : x + 32] = np.maximum(hi[y : y + 32, x : x + 32], m)
    assert (amap >= lo - 1e-6).all() and (amap <= hi + 1e-6).all()
    np.testing.assert_allclose(amap[:8, :8], maps[0][:8, :8], rtol=1e-5)  # covered by one tile only
    # ... and no step appears at tile borders: neighbour differences stay within those inside single tiles
    step = max(np.abs(np.diff(amap, axis=a)).max() for a in (0, 1))
    inside = max(np.abs(np.diff(maps, axis=a)).max() for a in (1, 2))
    assert step <= 1.25 * inside, (step, inside)


def test_letterbox_and_stretch_return_original_size(geo_models: dict[str, Path]) -> None:
    for mode in ("letterbox", "stretch"):
        insp = Inspector.load(geo_models[mode], device="cpu")
        for h, w in ((48, 80), (100, 40), (32, 32)):
            r = insp.predict(_texture(h, w))
            assert r.anomaly_map.shape == (h, w) and r.mask.shape == (h, w), (mode, h, w)
            assert np.isfinite(r.anomaly_map).all()


def test_uncalibrated_model_gives_scores_but_no_verdicts(geo_models: dict[str, Path], tmp_path: Path) -> None:
    src = Inspector.load(geo_models["stretch"], device="cpu")
    p = tmp_path / "raw.safetensors"
    save_model(p, src.model, src.cfg)
    raw = Inspector.load(p, device="cpu")
    assert not raw.calibrated
    r = raw.predict(_texture(32, 32))
    assert np.isfinite(r.score) and np.isnan(r.norm_score)
    assert r.verdict == "OK" and r.mask.sum() == 0 and r.regions == []


# ------------------------------------------------------------------------------------------- bad inputs


def test_bad_inputs_give_clear_errors(tiny_model: Path, layout, tmp_path: Path) -> None:
    insp = Inspector.load(tiny_model, device="cpu")
    good = next(it for it in layout.test if it.label == 0)
    gray = _gray(good.path)
    nan = gray.astype(np.float32) / 255
    nan[3, 5] = np.nan
    with pytest.raises(ImageReadError, match="NaN"):
        insp.predict(nan)
    with pytest.raises(ImageReadError, match="empty"):
        insp.predict(np.zeros((0, 0), np.uint8))
    with pytest.raises(ImageReadError, match="must be HW, HWC or CHW"):
        insp.predict(np.zeros((2, 64, 64, 1), np.uint8))
    with pytest.raises(ImageReadError, match="has 2 channels"):
        insp.predict(np.zeros((2, 64, 64), np.uint8))
    with pytest.raises(TypeError, match="expected a path, numpy array or PIL image"):
        insp.predict(12345)
    with pytest.raises(ImageReadError, match="file not found"):
        insp.predict(tmp_path / "missing.png")

    rgb = np.dstack([gray, gray // 2, 255 - gray])
    rgb_path = tmp_path / "rgb.png"
    cv2.imwrite(str(rgb_path), rgb)
    assert insp.predict(rgb).anomaly_map.shape == (64, 64)  # convert policy: RGB -> gray
    insp.cfg.preprocess.channel_policy = "strict"
    with pytest.raises(ImageReadError, match="has 3 channels, model expects 1"):
        insp.predict(rgb)
    with pytest.raises(ImageReadError, match="has 3 channels, model expects 1") as ei:
        insp.predict(rgb_path)
    assert str(rgb_path) in str(ei.value)
    assert insp.predict(gray).anomaly_map.shape == (64, 64)  # matching channels still fine

    insp.cfg.preprocess.max_pixels = 64 * 64 - 1
    with pytest.raises(ImageReadError, match="max_pixels"):
        insp.predict(gray)
    with pytest.raises(ImageReadError, match="max_pixels"):
        insp.predict(good.path)


# ------------------------------------------------------------------------------- threads, determinism


def test_concurrent_predictions_match_sequential(tiny_model: Path, layout) -> None:
    insp = Inspector.load(tiny_model, device="cpu")
    paths = [it.path for it in layout.test]
    sequential = {str(p): insp.predict(p).score for p in paths}
    results: dict[int, dict[str, float]] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            order = paths[k:] + paths[:k]
            results[k] = {str(p): insp.predict(p).score for p in order}
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(results) == 4
    for k in range(4):
        assert results[k] == sequential, k


def test_same_image_twice_is_identical(insp: Inspector, layout) -> None:
    p = next(it.path for it in layout.test if it.label == 1)
    a, b = insp.predict(p), insp.predict(p)
    assert a.score == b.score
    assert np.array_equal(a.anomaly_map, b.anomaly_map) and np.array_equal(a.mask, b.mask)
    assert [r.to_dict() for r in a.regions] == [r.to_dict() for r in b.regions]


def test_threshold_override_at_load(tiny_model: Path, insp: Inspector, layout) -> None:
    good = next(it.path for it in layout.test if it.label == 0)
    bad = next(it.path for it in layout.test if it.label == 1)
    assert (insp.predict(good).verdict, insp.predict(bad).verdict) == ("OK", "NG")
    lax = Inspector.load(tiny_model, device="cpu", image_threshold=1e6)
    assert lax.image_threshold == 1e6 and lax.pixel_threshold == insp.pixel_threshold
    assert (lax.predict(good).verdict, lax.predict(bad).verdict) == ("OK", "OK")
    strict = Inspector.load(tiny_model, device="cpu", image_threshold=0.0, pixel_threshold=0.0)
    rs = strict.predict([good, bad])
    assert [r.verdict for r in rs] == ["NG", "NG"]
    assert all(r.mask.all() for r in rs)  # every pixel is above a zero pixel threshold
    assert read_meta(tiny_model).calibration["image_threshold"] == insp.image_threshold  # file untouched
    with pytest.raises(ValueError, match="no 'f1_max' thresholds"):
        Inspector.load(tiny_model, device="cpu", threshold_source="f1_max")


def test_calibrate_cli_updates_the_model_file(tiny_model: Path, synth_root: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.safetensors"
    shutil.copyfile(tiny_model, model)
    before = read_meta(model)
    cmd = imganom_cmd("calibrate", "--model", str(model), "--data", str(synth_root), "--target-fpr", "0.05")
    p = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=180)
    assert p.returncode == 0, p.stderr
    assert Path(p.stdout.strip().splitlines()[-1]) == model
    after = read_meta(model)
    cal = after.calibration
    assert cal["target_fpr"] == 0.05 and cal["n_images"] == 8  # the MVTec root's test/good
    assert cal["image_threshold"] != before.calibration["image_threshold"]
    assert after.model_id == before.model_id  # weights untouched
    assert Inspector.load(model, device="cpu").image_threshold == cal["image_threshold"]


def test_score_side_standardisation(tiny_model: Path, layout, tmp_path: Path) -> None:
    """standardize="score" keeps the plain map and masks of "off" and takes the score of "map"."""
    from imganom.formats.modelfile import load_model, save_model
    from imganom.workflows.calibrate import map_statistics

    model, meta, _ = load_model(tiny_model)
    normals = [it.path for it in layout.test if it.label == 0]
    stats = map_statistics(Inspector.load(tiny_model), normals)
    imgs = [it.path for it in layout.test][:8]
    got = {}
    for mode in ("off", "map", "score"):
        cfg = meta.cfg.model_copy(update={"map": meta.cfg.map.model_copy(update={"standardize": mode})})
        p = tmp_path / f"{mode}.safetensors"
        save_model(p, model, cfg, training=meta.training, calibration=meta.calibration, stats=stats)
        insp = Inspector.load(p)
        assert insp.standardize_mode == mode
        got[mode] = insp.predict(imgs)
    for off, std, sc in zip(got["off"], got["map"], got["score"]):
        np.testing.assert_allclose(sc.anomaly_map, off.anomaly_map, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(sc.mask, off.mask)
        assert sc.score == pytest.approx(std.score, rel=1e-5)
    assert any(abs(o.score - s.score) > 1e-3 * abs(o.score) for o, s in zip(got["off"], got["score"]))


def _raw_maps(insp: Inspector, paths: list) -> torch.Tensor:
    """Unsmoothed single-scale maps of model-sized views (the input of the multi-scale combination)."""
    from imganom.data.preprocess import prepare

    pp = insp.cfg.preprocess
    x = torch.from_numpy(np.concatenate([prepare(insp.load_input(q)[0], pp)[0] for q in paths]))
    return insp.raw_maps(x)


def test_multiscale_map_is_max_of_per_scale_z_scores(tiny_model: Path, layout, tmp_path: Path) -> None:
    """map.scales: max over scales of each smoothed map z-scored by the normal statistics of that scale."""
    from imganom.data.preprocess import prepare
    from imganom.formats.modelfile import load_model, save_model
    from imganom.ops.maps import gaussian_blur
    from imganom.workflows.calibrate import map_statistics

    model, meta, _ = load_model(tiny_model)
    cfg = meta.cfg.model_copy(update={"map": meta.cfg.map.model_copy(update={"scales": [3.0]})})
    p = tmp_path / "ms.safetensors"
    save_model(p, model, cfg, training=meta.training, calibration=meta.calibration)
    ms = Inspector.load(p)
    assert ms.scale_sigmas == []  # no statistics yet: the plain single-scale map
    normals = [it.path for it in layout.test if it.label == 0]
    stats = map_statistics(ms, normals)
    save_model(p, model, cfg, training=meta.training, calibration=meta.calibration, stats=stats)
    ms = Inspector.load(p)
    sig = cfg.postprocess.sigma
    assert ms.scale_sigmas == [sig, 3.0]
    # the statistics are what they say: each scale's z-scored normal maps have mean 0 and std 1
    raw_n = _raw_maps(ms, normals)
    for k, s in enumerate([sig, 3.0]):
        z = (gaussian_blur(raw_n, s) - stats["scale_mean"][k]) / stats["scale_std"][k]
        assert abs(float(z.mean())) < 1e-3 and abs(float(z.std()) - 1.0) < 1e-2
    test = [it.path for it in layout.test[:4]]
    raw = _raw_maps(ms, test)
    want = torch.maximum(
        (gaussian_blur(raw, sig) - stats["scale_mean"][0]) / stats["scale_std"][0],
        (gaussian_blur(raw, 3.0) - stats["scale_mean"][1]) / stats["scale_std"][1],
    )
    x = torch.from_numpy(np.concatenate([prepare(ms.load_input(q)[0], ms.cfg.preprocess)[0] for q in test]))
    torch.testing.assert_close(ms.model_maps(x)[0], want, rtol=1e-5, atol=1e-5)


def test_calibration_keeps_statistics_and_threshold_images_apart(
    tiny_model: Path, layout, tmp_path: Path
) -> None:
    """Normal-map statistics never come from the images that set the thresholds (in-sample z-scores are too
    low): from stats_paths, else from every other image; keep_stats reuses the model's own."""
    from imganom.formats.modelfile import load_model, save_model
    from imganom.workflows.calibrate import calibrate

    model, meta, _ = load_model(tiny_model)
    cfg = meta.cfg.model_copy(update={"map": meta.cfg.map.model_copy(update={"standardize": "score"})})
    p = tmp_path / "z.safetensors"
    save_model(p, model, cfg, training=meta.training, calibration=meta.calibration)
    normals = [it.path for it in layout.test if it.label == 0]
    train = sorted((layout.root / "train" / "good").glob("*.png"))
    cal, stats = calibrate(Inspector.load(p), normals, stats_paths=train)
    assert cal["n_images"] == len(normals) and "map_mean" in stats
    cal2, stats2 = calibrate(Inspector.load(p), normals)  # no separate set: halves
    assert cal2["n_images"] == len(normals[1::2])
    assert not torch.equal(stats["map_mean"], stats2["map_mean"])
    save_model(p, model, cfg, training=meta.training, calibration=cal, stats=stats)
    insp = Inspector.load(p)
    cal3, stats3 = calibrate(insp, normals, keep_stats=True)
    assert stats3 == {} and cal3["n_images"] == len(normals)
    assert torch.equal(insp.stats["map_mean"], stats["map_mean"])


def test_with_options_and_roi_give_new_inspectors(tiny_model: Path, layout, tmp_path: Path) -> None:
    """An Inspector never changes: with_options / with_calibration return new ones on the same backend."""
    base = Inspector.load(tiny_model, device="cpu")
    defect = next(it for it in layout.test if it.label == 1)
    gt = _gray(defect.mask_path) > 0
    ys, xs = np.nonzero(gt)
    roi = np.ones((64, 64), bool)
    roi[max(0, ys.min() - 6) : ys.max() + 7, max(0, xs.min() - 6) : xs.max() + 7] = False  # hide the defect
    masked = base.with_options(roi=roi, maps="ng")
    assert base.roi is None and base.maps == "all" and masked.backend is base.backend
    assert (masked.image_threshold, masked.pixel_threshold) == (base.image_threshold, base.pixel_threshold)
    r_base, r_masked = base.predict(defect.path), masked.predict(defect.path)
    assert r_base.verdict == "NG" and r_masked.score < r_base.score
    assert r_masked.anomaly_map is None or not r_masked.mask[~roi].any()
    # the ROI is resized to each map's shape and the border comes off it, scaled like the map
    assert masked.roi_for((128, 128)).shape == (128, 128) and not masked.roi_for((128, 128)).all()
    # a ROI file at load time is the same ROI
    path = tmp_path / "roi.png"
    cv2.imwrite(str(path), roi.astype(np.uint8) * 255)
    from_file = Inspector.load(tiny_model, device="cpu", roi=path)
    assert np.array_equal(from_file.roi, roi) and from_file.predict(defect.path).score == r_masked.score
    lax = base.with_options(image_threshold=1e9)
    assert lax.predict(defect.path).verdict == "OK" and base.predict(defect.path).verdict == "NG"
    with pytest.raises(TypeError, match="unknown option"):
        base.with_options(sigma=3)
