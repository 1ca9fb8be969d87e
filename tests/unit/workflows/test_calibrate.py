"""Calibration on the session's synthetic images: thresholds from normal scores and pixels, normal-map
statistics that are what they claim, and an Inspector that is never changed by calibrating it."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from imganom.data.discovery import scan_mvtec
from imganom.data.preprocess import prepare
from imganom.formats.modelfile import load_model, save_model
from imganom.inference import Inspector
from imganom.ops.thresholds import quantile_upper_bound
from imganom.workflows.calibrate import calibrate, map_statistics


@pytest.fixture(scope="module")
def normals(synth_root: Path) -> list[Path]:
    return sorted((synth_root / "train" / "good").glob("*.png"))


@pytest.fixture(scope="module")
def zscore_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's tiny model with score-side standardisation and a second smoothing scale, no stats."""
    model, meta, _ = load_model(tiny_model)
    mcfg = meta.cfg.map.model_copy(update={"standardize": "score", "scales": [3.0]})
    path = tmp_path_factory.mktemp("calib") / "z.safetensors"
    save_model(path, model, meta.cfg.model_copy(update={"map": mcfg}), calibration=meta.calibration)
    return path


def _snapshot(insp: Inspector) -> dict:
    return {
        "thresholds": (insp.image_threshold, insp.pixel_threshold, insp.score_scale),
        "calibration": copy.deepcopy(insp.meta.calibration),
        "stats": {k: v.clone() for k, v in insp.stats.items()},
        "modes": (insp.standardize_mode, insp.scale_sigmas),
        "config": insp.cfg.model_dump(),
    }


def test_thresholds_come_from_the_normal_scores_and_pixels(tiny_model: Path, normals: list[Path]) -> None:
    insp = Inspector.load(tiny_model, device="cpu")
    before = _snapshot(insp)
    cal, stats = calibrate(insp, normals[:24])
    assert stats == {}  # no standardisation, no scales: nothing to measure
    assert _snapshot(insp) == before  # returned, not applied
    new = insp.with_calibration(cal)
    assert (new.image_threshold, new.pixel_threshold) == (cal["image_threshold"], cal["pixel_threshold"])
    results = new.predict(normals[:24])
    scores = np.array([r.score for r in results])
    thr, _ = quantile_upper_bound(scores, cal["target_fpr"], cal["confidence"])
    assert cal["image_threshold"] == pytest.approx(thr) and cal["n_images"] == 24
    assert cal["image_threshold"] >= np.quantile(scores, 1 - cal["target_fpr"], method="lower")
    pix = np.concatenate([r.anomaly_map.ravel() for r in results])  # all of them: under the reservoir size
    above = float(np.mean(pix > cal["pixel_threshold"]))
    assert above <= 1 - cal["pixel_quantile"] + 1e-4 and cal["pixel_threshold"] <= pix.max()
    assert cal["normal_scores"]["max"] == pytest.approx(scores.max())
    assert sum(r.is_anomalous for r in results) <= 2  # its own calibration images are (nearly) all OK


def test_statistics_are_the_normal_maps_mean_and_spread(zscore_model: Path, normals: list[Path]) -> None:
    insp = Inspector.load(zscore_model, device="cpu")
    assert insp.standardize_mode == "off" and insp.scale_sigmas == []  # no statistics yet
    before = _snapshot(insp)
    stats = map_statistics(insp, normals[:16], batch_size=5)
    views = np.concatenate([prepare(insp.load_input(p)[0], insp.cfg.preprocess)[0] for p in normals[:16]])
    raw = insp.raw_maps(torch.from_numpy(views)).double()
    torch.testing.assert_close(stats["map_mean"].double(), raw.mean(0), rtol=1e-4, atol=1e-6)  # batch 5 vs 16
    floor = float(raw.std(0).mean()) * 0.1 + 1e-6
    torch.testing.assert_close(stats["map_std"].double(), raw.std(0).clamp_min(floor), rtol=1e-3, atol=1e-6)
    from imganom.ops.maps import gaussian_blur

    for k, s in enumerate([insp.cfg.postprocess.sigma, 3.0]):
        b = gaussian_blur(raw.float(), s).double()
        assert float(stats["scale_mean"][k]) == pytest.approx(float(b.mean()), rel=1e-4)
        assert float(stats["scale_std"][k]) == pytest.approx(float(b.std(unbiased=False)), rel=1e-3)
    assert _snapshot(insp) == before


def test_calibrating_a_standardised_model_leaves_the_inspector_alone(
    zscore_model: Path, normals: list[Path], synth_root: Path
) -> None:
    insp = Inspector.load(zscore_model, device="cpu")
    before = _snapshot(insp)
    probe = normals[-1]
    score_before = insp.predict(probe).score
    labeled = [(it.path, it.label) for it in scan_mvtec(synth_root).test]
    cal, stats = calibrate(insp, normals[:12], stats_paths=normals[12:36], labeled=labeled)
    assert set(stats) == {"map_mean", "map_std", "scale_mean", "scale_std"} and cal["n_images"] == 12
    assert _snapshot(insp) == before and insp.predict(probe).score == score_before
    new = insp.with_calibration(cal, stats)
    assert new.standardize_mode == "score" and new.scale_sigmas == [insp.cfg.postprocess.sigma, 3.0]
    assert new.backend.model is insp.backend.model and new.backend.lock is insp.backend.lock
    assert new.predict(probe).score != score_before  # scored from the standardised map now
    # the F1-max thresholds are those of the calibrated model: its statistics, its pixel threshold
    assert cal["f1_max"]["pixel_threshold"] == cal["pixel_threshold"]
    f1 = insp.with_calibration(cal, stats).with_options(image_threshold=cal["f1_max"]["image_threshold"])
    ng = np.array([r.is_anomalous for r in f1.predict([p for p, _ in labeled])])
    y = np.array([lab for _, lab in labeled], bool)
    tp, fp, fn = int((ng & y).sum()), int((ng & ~y).sum()), int((~ng & y).sum())
    assert 2 * tp / (2 * tp + fp + fn) == pytest.approx(cal["f1_max"]["f1"])  # same scores as calibration
    # recalibrating thresholds only keeps the statistics it is given
    cal2, stats2 = calibrate(new, normals[:12], keep_stats=True)
    assert stats2 == {} and cal2["image_threshold"] == pytest.approx(cal["image_threshold"])
