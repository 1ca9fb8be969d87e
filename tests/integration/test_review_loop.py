"""Closing the loop on real files: ``imganom inspect`` output, decisions marked in ``reviews.jsonl``, then
``calibrate --reviews`` and ``train --resume-from --add-normals`` through the CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import cli_env, imganom_cmd

from imganom.data.synth import make_dataset
from imganom.formats.modelfile import read_meta
from imganom.inference.inspector import Inspector
from imganom.reporting.reviews import REVIEWS_FILE, ReviewStore
from imganom.workflows.calibrate import image_scores


def _run(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run(imganom_cmd(*args), capture_output=True, text=True, env=cli_env(), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.fixture(scope="module")
def reviewed(synth_root: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The synthetic test split plus 24 darker normals (a new lot the model flags: false alarms), inspected
    with the tiny model, and every image marked by a 'reviewer': normal, or defect with its type."""
    root = tmp_path_factory.mktemp("loop")
    make_dataset(root / "lot", n_train=24, n_test_good=0, n_test_defect=0, size=64, seed=5)
    for p in sorted((root / "lot" / "train" / "good").glob("*.png")):
        im = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(p), np.clip(im.astype(int) - 50, 0, 255).astype(np.uint8))
    model = root / "model.safetensors"
    shutil.copy(tiny_model, model)
    res = root / "res"
    _run("inspect", "--model", str(model), "--input", str(root / "lot" / "train" / "good"),
         "--input", str(synth_root / "test"), "--out", str(res), "--no-report")  # fmt: skip
    rows = [json.loads(x) for x in (res / "results.jsonl").read_text().splitlines()]
    store = ReviewStore(res)
    for r in rows:
        kind = Path(r["path"]).parent.name
        if kind == "good":
            store.add(r["id"], "normal", reviewer="qa", score=r["score"], verdict=r["verdict"])
        else:
            store.add(r["id"], "defect", label=kind, reviewer="qa", score=r["score"], verdict=r["verdict"])
    lot = [r for r in rows if "/lot/" in r["path"]]
    assert sum(r["verdict"] == "NG" for r in lot) >= 20  # they really are false alarms
    return {"root": root, "model": model, "res": res, "rows": rows, "lot": lot}


def test_calibrate_on_reviews_reproduces_the_false_reject_rate(reviewed: dict, tmp_path: Path) -> None:
    res, rows = reviewed["res"], reviewed["rows"]
    normals = [Path(r["path"]) for r in rows if Path(r["path"]).parent.name == "good"]
    defects = [r for r in rows if Path(r["path"]).parent.name != "good"]
    out = tmp_path / "m.safetensors"
    r = _run("calibrate", "--model", str(reviewed["model"]), "--reviews", str(res), "--target-fpr", "0.1",
             "--out", str(out))  # fmt: skip
    cal = read_meta(out).calibration
    thr = cal["image_threshold"]
    scores = np.array(list(image_scores(Inspector.load(out), normals).values()))
    frr = float(np.mean(scores > thr))
    n = len(normals)
    assert frr == np.floor(0.1 * n) / n and 0.1 - 1 / n < frr <= 0.1  # as close to 10% as n images allow
    rv = cal["reviews"]
    assert rv["false_reject_rate"] == frr and rv["n_normal"] == n and rv["n_defect"] == len(defects)
    assert rv["sources"][0]["sha256"] == hashlib.sha256((res / REVIEWS_FILE).read_bytes()).hexdigest()
    kinds = {Path(d["path"]).parent.name for d in defects}
    assert set(rv["per_type_recall"]) == kinds and all(v["n"] == 2 for v in rv["per_type_recall"].values())
    assert f"false-reject rate {100 * frr:.1f}%" in r.stderr
    assert all(f"recall {k}" in r.stderr for k in kinds)
    assert json.loads((res / "summary.json").read_text())["reviews"]["normal"] == n  # refreshed

    f1 = tmp_path / "f1.safetensors"
    _run("calibrate", "--model", str(reviewed["model"]), "--reviews", str(res), "--objective", "f1",
         "--out", str(f1))  # fmt: skip
    rv1 = read_meta(f1).calibration["reviews"]
    assert rv1["objective"] == "f1" and 0 < rv1["f1"] <= 1


def test_fine_tuning_on_false_alarms_lowers_their_scores(
    reviewed: dict, synth_root: Path, tmp_path: Path
) -> None:
    from imganom.training.trainer import train

    model, lot = reviewed["model"], reviewed["lot"]
    run = tmp_path / "ft"
    r = _run("train", "--data", str(synth_root), "--resume-from", str(model), "--add-normals",
             str(reviewed["res"]), "--epochs", "4", "--out", str(run), "--device", "cpu")  # fmt: skip
    rep = json.loads((run / "finetune.json").read_text())
    assert rep["added_false_alarms"] >= 8 and rep["held_out_normals"] >= 12
    assert "false-alarm rate on" in r.stderr and rep["before"]["false_alarm_rate"] >= 0.5
    held_ids = set(rep["held_out_ids"])  # the held-out part of the new lot: never trained on
    held = [Path(x["path"]) for x in lot if x["id"] in held_ids]
    assert len(held) >= 8
    tuned = Inspector.load(run / "model.safetensors")
    control_run = train(tuned.cfg, synth_root, tmp_path / "control", device="cpu", progress=False, init=model)
    means = {}
    models = {"before": model, "tuned": run / "model.safetensors", "control": control_run.model_path}
    for name, path in models.items():
        means[name] = float(np.mean(list(image_scores(Inspector.load(path), held).values())))
    assert means["tuned"] < means["before"] and means["tuned"] < means["control"], means
    assert read_meta(run / "model.safetensors").training["fine_tune"]["init"] == str(model)


def test_evaluate_on_reviews_uses_decisions_and_corrected_masks(
    reviewed: dict, synth_root: Path, tmp_path: Path
) -> None:
    res = tmp_path / "res"
    shutil.copytree(reviewed["res"], res)
    rows = reviewed["rows"]
    crack = next(r for r in rows if Path(r["path"]).parent.name == "crack")
    gt = synth_root / "ground_truth" / "crack" / (Path(crack["path"]).stem + "_mask.png")
    ReviewStore(res).add(crack["id"], "defect", label="crack", mask_png=gt.read_bytes())
    _run("evaluate", "--model", str(reviewed["model"]), "--reviews", str(res), "--out", str(tmp_path / "ev"),
         "--no-report", "--workers", "0")  # fmt: skip
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    n_good = sum(Path(r["path"]).parent.name == "good" for r in rows)
    assert m["counts"]["good"] == n_good and m["counts"]["anomalous"] == len(rows) - n_good
    assert m["counts"]["with_mask"] == 1 and m["pixel"]["auroc"] is not None
    assert 0.5 <= m["image"]["auroc"] <= 1.0
