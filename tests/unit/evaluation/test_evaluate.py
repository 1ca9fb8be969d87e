"""``imganom evaluate``: metric plumbing end to end with stand-in predictors whose maps are known (perfect,
random), mask handling (missing, resized, unreadable images), and the real tiny model through the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from imganom.cli.main import app
from imganom.config import load_config
from imganom.data.discovery import scan_mvtec
from imganom.data.synth import make_dataset
from imganom.evaluation.evaluate import evaluate, histogram_range, read_mask, stratified_order
from imganom.inference.inspector import Result

REQUIRED = {
    "image": {"auroc", "ap", "f1_max", "f1_at_threshold", "fpr_at_threshold", "tpr_at_threshold"},
    "pixel": {"auroc", "aupro_0.3", "f1_max", "dice_at_threshold", "iou_at_threshold"},
    "counts": {"good", "anomalous", "with_mask"},
    "threshold": {"image", "pixel", "source"},
}
PER_TYPE_KEYS = {"image_auroc", "pixel_auroc", "aupro_0.3", "count"}
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}


class StandIn:
    """Predictor whose anomaly map is ``make_map(ground_truth, rng)``; score = max of the map."""

    def __init__(self, root: Path, make_map: Callable[[np.ndarray, np.random.Generator], np.ndarray]):
        self.cfg = load_config("tiny")
        self.image_threshold, self.pixel_threshold = 0.5, 0.5
        self.masks = {it.id: it.mask_path for it in scan_mvtec(root).test}
        self.make_map, self.rng = make_map, np.random.default_rng(0)

    def predict_arrays(self, items, keep_image=False, decode_ms=None) -> list[Result]:
        out = []
        for item_id, chw, meta in items:
            gt = np.zeros(chw.shape[1:], bool)
            if self.masks.get(item_id) is not None:
                gt = read_mask(self.masks[item_id], chw.shape[1:])[0]
            amap = self.make_map(gt, self.rng).astype(np.float32)
            s = float(amap.max())
            pthr = np.inf if self.pixel_threshold is None else self.pixel_threshold
            mask = (amap >= pthr).astype(np.uint8)
            thr = {"image": self.image_threshold, "pixel": self.pixel_threshold}
            out.append(
                Result(item_id, s, s, s >= 0.5, amap, mask, [], thr, {}, meta, chw if keep_image else None)
            )
        return out


def perfect(gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return gt.astype(np.float32)


def random_map(gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return rng.random(gt.shape)


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    make_dataset(root, n_train=40, n_test_good=6, n_test_defect=10, size=64, seed=0)
    return root


@pytest.fixture(scope="session")
def labelled(tmp_path_factory) -> Path:
    """A larger test split (no training images needed) for the stand-in predictors."""
    root = tmp_path_factory.mktemp("labelled")
    make_dataset(root, n_train=0, n_test_good=24, n_test_defect=24, size=64, seed=1)
    return root


@pytest.fixture(scope="session")
def model_path(synth, tmp_path_factory) -> Path:
    from imganom.formats.modelfile import update_calibration
    from imganom.inference.inspector import Inspector
    from imganom.training.trainer import train
    from imganom.workflows.calibrate import calibrate

    res = train(
        load_config("tiny", {"train": {"epochs": 3}}), synth, tmp_path_factory.mktemp("run"), progress=False
    )
    insp = Inspector.load(res.model_path)
    cal, stats = calibrate(insp, res.val_paths)
    update_calibration(res.model_path, cal, stats)
    return res.model_path


def _check_shape(m: dict) -> None:
    for section, keys in REQUIRED.items():
        assert keys <= set(m[section]), f"{section} lacks {keys - set(m[section])}"
    for t, entry in m["per_type"].items():
        assert PER_TYPE_KEYS <= set(entry), t
    assert isinstance(m["throughput_img_s"], float) and m["throughput_img_s"] > 0
    assert isinstance(m["model"], dict)
    json.dumps(m, allow_nan=False)


# ------------------------------------------------------------------------------------------ building blocks


def test_read_mask_threshold_and_resize(tmp_path):
    m = np.zeros((10, 20), np.uint8)
    m[2:4, 3:6], m[6, 1:3], m[8, 8] = 255, 100, 128  # anti-aliased 100 is background, 128 is defect
    cv2.imwrite(str(tmp_path / "m.png"), m)
    got, note = read_mask(tmp_path / "m.png", (10, 20))
    assert note is None and got.dtype == bool and got.sum() == 6 + 1
    big, note = read_mask(tmp_path / "m.png", (20, 40))  # nearest: each pixel becomes a 2x2 block
    assert "resized" in note and big.shape == (20, 40) and big.sum() == 4 * 7
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert read_mask(tmp_path / "bad.png", (10, 20)) == (None, "unreadable mask")


def test_histogram_range_and_stratified_order(labelled):
    assert histogram_range(0.5, 0.0, 1.0) == (0.0, 2.0)  # 4 * threshold wins
    assert histogram_range(0.1, -0.2, 3.0) == pytest.approx((-0.3, 4.5))  # 1.5 * seen wins
    assert histogram_range(None, 0.0, 0.0) == (0.0, 1.0)  # never empty
    order = stratified_order(scan_mvtec(labelled).test)
    first = [it.defect_type for it in order[:6]]
    assert first == ["good", "contamination", "crack", "hole", "scratch", "spot"]


# ------------------------------------------------------------------------------------------ stand-in maps


def test_perfect_map_scores_one(labelled, tmp_path):
    m = evaluate(StandIn(labelled, perfect), labelled, tmp_path, batch_size=8, worst=3, workers=0)
    _check_shape(m)
    assert m["image"]["auroc"] == 1.0 and m["image"]["ap"] == 1.0 and m["image"]["f1_max"] == 1.0
    assert m["pixel"]["auroc"] == pytest.approx(1.0) and m["pixel"]["aupro_0.3"] == pytest.approx(1.0)
    assert m["pixel"]["dice_at_threshold"] == 1.0 and m["pixel"]["iou_at_threshold"] == 1.0
    assert (m["image"]["fpr_at_threshold"], m["image"]["tpr_at_threshold"]) == (0.0, 1.0)
    assert set(m["per_type"]) == {"contamination", "crack", "hole", "scratch", "spot"}
    for entry in m["per_type"].values():
        assert entry["count"] > 0 and entry["image_auroc"] == 1.0 and entry["aupro_0.3"] == pytest.approx(1.0)
    assert m["counts"] == {**m["counts"], "good": 24, "anomalous": 24, "with_mask": 24, "errors": 0}
    assert m["pixel"]["n_pixels"] == 48 * 64 * 64  # every pixel of every image, at original size
    assert m["missing_masks"] == [] and m["warnings"] == []
    assert m["reasons"] == {"image": {}, "pixel": {}, "per_type": {}}
    assert json.loads((tmp_path / "metrics.json").read_text()) == m
    assert len((tmp_path / "scores.csv").read_text().splitlines()) == 49
    # worst cases: three of each, overlays written and embedded in the self-contained report
    assert [len(m["worst"][k]) for k in ("false_positives", "false_negatives")] == [3, 3]
    for case in m["worst"]["false_positives"] + m["worst"]["false_negatives"]:
        assert (tmp_path / case["overlay"]).stat().st_size > 100
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 + 6  # four plots + six overlays
    assert 'id="per-type"' in html and "test/" in html and 'src="worst/' not in html


def test_uncalibrated_predictor_gives_reasons(labelled, tmp_path):
    pred = StandIn(labelled, perfect)
    pred.image_threshold = pred.pixel_threshold = None
    m = evaluate(pred, labelled, tmp_path, worst=1, workers=0)
    assert m["image"]["auroc"] == 1.0 and m["pixel"]["aupro_0.3"] == pytest.approx(1.0)
    for key in ("f1_at_threshold", "fpr_at_threshold", "tpr_at_threshold"):
        assert m["image"][key] is None and m["reasons"]["image"][key] == "no threshold"
    assert m["pixel"]["dice_at_threshold"] is None and m["reasons"]["pixel"]["dice_at_threshold"]
    assert m["threshold"]["image"] is None and m["pixel"]["range"] == [0.0, 1.5]  # 1.5 x first batch max
    assert (tmp_path / "report.html").is_file()


def test_random_map_is_chance(labelled, tmp_path):
    m = evaluate(StandIn(labelled, random_map), labelled, tmp_path, batch_size=16, worst=0, workers=2)
    assert m["pixel"]["auroc"] == pytest.approx(0.5, abs=0.02)
    assert m["pixel"]["aupro_0.3"] == pytest.approx(0.15, abs=0.02)  # PRO(fpr) ~ fpr -> 0.045 / 0.3
    assert 0.2 < m["image"]["auroc"] < 0.8  # 24 vs 24 images: chance level within sampling noise
    assert m["pixel"]["clipped_above"] == 0.0
    assert m["settings"]["workers"] == 2 and m["worst"] == {"false_positives": [], "false_negatives": []}


def test_missing_resized_and_unreadable(labelled, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(labelled, root)
    (root / "ground_truth/crack/000_mask.png").unlink()
    big = cv2.imread(str(root / "ground_truth/spot/001_mask.png"), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(root / "ground_truth/spot/001_mask.png"), cv2.resize(big, (128, 128), cv2.INTER_NEAREST))
    (root / "test/good/003.png").write_bytes(b"broken")
    m = evaluate(StandIn(root, perfect), root, tmp_path / "out", workers=0)
    assert m["missing_masks"] == ["test/crack/000.png"]
    assert m["counts"]["with_mask"] == 23 and m["counts"]["anomalous"] == 24 and m["counts"]["good"] == 23
    assert m["per_type"]["crack"]["count"] == m["per_type"]["spot"]["count"]  # image metrics still count it
    assert m["pixel"]["n_images"] == 46  # neither the maskless defect image nor the unreadable one
    assert [e["id"] for e in m["errors"]] == ["test/good/003.png"]
    assert any("resized" in w and "test/spot/001.png" in w for w in m["warnings"])
    assert any("no usable mask" in w for w in m["warnings"])
    # nearest-neighbour resizing of an exact 2x mask is lossless, so the perfect map stays perfect
    assert m["pixel"]["auroc"] == pytest.approx(1.0) and m["pixel"]["aupro_0.3"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------ real model, CLI


def test_cli_real_model(model_path, synth, tmp_path):
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "imganom.cli",
           "evaluate", "--model", str(model_path), "--data", str(synth),
           "--out", str(out), "--batch-size", "8", "--worst", "4"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "metrics.json").read_text())
    _check_shape(m)
    assert set(m["per_type"]) == {"contamination", "crack", "hole", "scratch", "spot"}
    assert m["counts"]["good"] == 6 and m["counts"]["anomalous"] == 10 and m["counts"]["with_mask"] == 10
    assert (
        m["threshold"]["source"] == "normal" and m["threshold"]["image"] > 0 and m["threshold"]["pixel"] > 0
    )
    assert m["model"]["name"] == "tiny" and m["model"]["calibrated"]
    assert m["image"]["auroc"] > 0.6 and m["pixel"]["auroc"] > 0.7  # visible synthetic defects
    assert all(m[s][k] is not None for s in ("image", "pixel") for k in REQUIRED[s])
    html = (out / "report.html").read_text()
    assert "Worst false negatives" in html and html.count("data:image/png;base64,") == 4 + 8
    assert "image AUROC" in proc.stderr


def test_cli_good_only_gives_nulls_with_reasons(model_path, tmp_path):
    root = tmp_path / "good_only"
    make_dataset(root, n_train=2, n_test_good=5, n_test_defect=0, size=64, seed=3)
    out = tmp_path / "eval"
    args = ["evaluate", "-m", str(model_path), "--data", str(root), "--out", str(out), "--workers", "0"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    _check_shape(m)
    for key in ("auroc", "ap", "f1_max", "tpr_at_threshold"):
        assert m["image"][key] is None and m["reasons"]["image"][key]
    assert "only good images" in m["reasons"]["image"]["auroc"]
    assert m["image"]["fpr_at_threshold"] is not None  # defined: good images exist
    for key in ("auroc", "aupro_0.3", "f1_max"):
        assert m["pixel"][key] is None and m["reasons"]["pixel"][key]
    assert m["per_type"] == {} and m["counts"]["anomalous"] == 0
    html = (out / "report.html").read_text()
    assert 'title="needs both classes: only good images"' in html and "no anomalous images" in html


def test_cli_usage_errors(model_path, synth, tmp_path):
    run = CliRunner().invoke
    base = ["evaluate", "-m", str(model_path), "--out", str(tmp_path / "o"), "--workers", "0"]
    assert run(app, [*base, "--data", str(tmp_path / "nope")]).exit_code == 2
    assert run(app, [*base, "--data", str(synth), "--threshold-source", "best"]).exit_code == 2
    res = run(
        app, [*base, "--data", str(synth), "--threshold-source", "f1_max"]
    )  # model has no F1 thresholds
    assert res.exit_code == 2 and "f1_max" in res.output
    res = run(
        app, ["evaluate", "-m", str(tmp_path / "missing.safetensors"), "--data", str(synth), "--out", "x"]
    )
    assert res.exit_code == 2
