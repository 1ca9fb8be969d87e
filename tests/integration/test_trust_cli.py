"""``imganom inspect`` with the trust views, end to end: Monte-Carlo confidence and review in the CSV/JSONL
and summary, latent means (latents.npy), explanation images; the report's latent projection, confidence
and explanation checked in a real headless Chromium."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from browser import chromium_driver
from helpers import cli_env, imganom_cmd


@pytest.fixture(scope="module")
def run(latent_model: Path, synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from imganom.inference.inspector import Inspector

    out = tmp_path_factory.mktemp("trust") / "out"
    scores = sorted(r.score for r in Inspector.load(latent_model, device="cpu").predict(
        sorted((synth_root / "test").glob("*/*.png"))))  # fmt: skip
    thr = scores[len(scores) // 2]  # one image exactly on the threshold: confidence 0, so review
    cmd = imganom_cmd("inspect", "--model", str(latent_model), "-i", str(synth_root / "test"), "-o", str(out),
                      "--uncertainty-samples", "4", "--review-below", "0.999999", "--latents", "--explain",
                      "--image-threshold", repr(thr), "--workers", "0")  # fmt: skip
    p = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_rows_csv_latents_and_images(run: Path, latent_model: Path) -> None:
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 18
    with open(run / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["id"] for r in table] == [r["id"] for r in rows]
    for r, c in zip(rows, table, strict=True):
        assert 0.0 <= r["confidence"] <= 1.0 and float(c["confidence"]) == pytest.approx(r["confidence"])
        assert c["verdict"] == r["verdict"] in ("OK", "NG", "review")
        u = r["uncertainty"]
        assert u["samples"] == 4 and u["score_spread"] > 0 and u["review_below"] == 0.999999
        want = "review" if r["confidence"] < 0.999999 else ("NG" if u["is_anomalous"] else "OK")
        assert r["verdict"] == want
        e = r["explanation"]
        assert e["recon_term"] + e["kl_term"] == pytest.approx(e["elbo"])
        assert all(0.0 <= g["confidence"] <= 1.0 for g in r["regions"])
        assert (run / r["outputs"]["uncertainty"]).is_file()
        if r["verdict"] != "OK":  # overlays "ng": every image but the OK ones; so are the explanations
            assert (run / r["outputs"]["reconstruction"]).is_file()
            assert (run / r["outputs"]["residual"]).is_file()
        else:
            assert "reconstruction" not in r["outputs"]
    lat = np.load(run / "latents.npy")
    assert lat.shape == (18, len(rows[0]["latent"])) and np.allclose(lat[3], rows[3]["latent"])
    summary = json.loads((run / "summary.json").read_text())
    c = summary["counts"]
    assert c["review"] == sum(r["verdict"] == "review" for r in rows)
    assert c["ok"] + c["ng"] + c["review"] + c["error"] == 18


@pytest.fixture(scope="module")
def driver():
    with chromium_driver() as drv:
        yield drv


def test_report_shows_latent_view_confidence_and_explanation(driver, run: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    lines = (run / "results.jsonl").read_text().splitlines()
    rows = {json.loads(line)["id"]: json.loads(line) for line in lines}
    driver.get((run / "report.html").as_uri())
    WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .card"))
    normals = driver.find_elements(By.CSS_SELECTOR, "#latent-svg circle.lat-normal")
    points = driver.find_elements(By.CSS_SELECTOR, "#latent-svg circle.lat-pt")
    assert len(normals) >= 3 and len(points) == 18
    for p in points:  # coloured by the verdict's category
        r = rows[p.get_attribute("data-id")]
        ng = r["verdict"] == "NG" or (r["verdict"] == "review" and r["uncertainty"]["is_anomalous"])
        assert ("ng" if ng else "ok") in p.get_attribute("class").split()
    # review badges on exactly the review rows; a confidence on every card
    badges = driver.find_elements(By.CSS_SELECTOR, "#gallery .badge.review")
    n_review = sum(r["verdict"] == "review" for r in rows.values())
    assert len(badges) == n_review > 0
    assert driver.find_element(By.CSS_SELECTOR, "#review-count b").text == str(n_review)
    assert all("confidence" in c.text for c in driver.find_elements(By.CSS_SELECTOR, "#gallery .card .stats"))

    # clicking a point of an NG image opens its card in the lightbox, with the explanation
    target = next(p for p in points if rows[p.get_attribute("data-id")]["outputs"].get("reconstruction"))
    tid = target.get_attribute("data-id")
    driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", target)
    WebDriverWait(driver, 10).until(lambda d: not d.find_element(By.ID, "lightbox").get_attribute("hidden"))
    lb = driver.find_element(By.CSS_SELECTOR, "#lightbox .lb")
    assert lb.find_element(By.CSS_SELECTOR, "header .cid").text == tid
    assert driver.find_element(By.CSS_SELECTOR, ".card.sel").get_attribute("data-id") == tid
    expl = lb.find_element(By.ID, "explanation").text
    assert "ELBO" in expl and "reconstruction" in expl and "KL" in expl and "anomaly mass" in expl
    captions = [f.text for f in lb.find_elements(By.CSS_SELECTOR, ".explain-images figcaption")]
    assert captions == ["input", "reconstruction", "residual", "uncertainty"]
    loaded = driver.execute_script(
        "return [...document.querySelectorAll('#lightbox .explain-images img')]"
        ".map(i => i.complete && i.naturalWidth > 0)")
    WebDriverWait(driver, 10).until(lambda d: all(d.execute_script(
        "return [...document.querySelectorAll('#lightbox .explain-images img')]"
        ".map(i => i.complete && i.naturalWidth > 0)")))
    assert len(loaded) == 4
    heads = [th.text for th in lb.find_elements(By.CSS_SELECTOR, "table th")]
    assert "confidence" in heads
    driver.save_screenshot(str(run / "lightbox.png"))


def test_report_without_latent_statistics_says_so(tiny_model: Path, synth_root: Path, tmp_path: Path) -> None:
    """A model calibrated without latent statistics (``tiny_model``) still inspects with ``--latents``; the
    report explains the gap."""
    from imganom.formats.modelfile import load_model
    from imganom.ops.latent import has_latent_stats

    assert not has_latent_stats(load_model(tiny_model)[2])
    out = tmp_path / "out"
    cmd = imganom_cmd("inspect", "--model", str(tiny_model), "-i", str(synth_root / "test" / "good"),
                      "-o", str(out), "--latents", "--workers", "0")  # fmt: skip
    p = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    html = (out / "report.html").read_text()
    assert 'id="latent-note"' in html and "no latent statistics" in html
    assert np.isfinite(np.load(out / "latents.npy")).all()


def test_serve_answers_confidence_review_and_explanation(latent_model: Path, synth_root: Path,
                                                         tmp_path: Path) -> None:  # fmt: skip
    """A real ``imganom serve`` on loopback with sampling on: each response carries the confidence, the
    explanation and region confidences; low-confidence verdicts read 'review' (and count in /metrics)."""
    import httpx
    from serve_process import Server

    args = ("--uncertainty-samples", "4", "--review-below", "0.999999")
    srv = Server(latent_model, tmp_path / "serve.log", *args)
    try:
        srv.wait_ready()
        seen = []
        for p in sorted((synth_root / "test").glob("*/*.png")):
            r = httpx.post(srv.url + "/v1/inspect", content=p.read_bytes(),
                           headers={"Content-Type": "image/png"}, timeout=60)  # fmt: skip
            assert r.status_code == 200, r.text
            body = r.json()
            assert 0.0 <= body["confidence"] <= 1.0
            want = "review" if body["confidence"] < 0.999999 else ("NG" if body["is_anomalous"] else "OK")
            assert body["verdict"] == want
            e = body["explanation"]
            assert e["recon_term"] + e["kl_term"] == pytest.approx(e["elbo"])
            assert all(0.0 <= g["confidence"] <= 1.0 for g in body["regions"])
            seen.append(body["verdict"])
        text = httpx.get(srv.url + "/metrics").text
        assert f'imganom_verdicts_total{{verdict="review"}} {seen.count("review")}' in text
    finally:
        srv.kill()


def test_calibrate_cli_records_latent_statistics(tiny_model: Path, synth_root: Path, tmp_path: Path) -> None:
    """``imganom calibrate`` adds the normals' latent statistics to a model that lacks them (weights, map
    statistics and the model id untouched)."""
    from imganom.formats.modelfile import load_model, read_meta
    from imganom.ops.latent import has_latent_stats

    out = tmp_path / "recal.safetensors"
    cmd = imganom_cmd("calibrate", "--model", str(tiny_model), "--data", str(synth_root / "train" / "good"),
                      "--out", str(out))  # fmt: skip
    p = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    _, _, before = load_model(tiny_model)
    _, _, after = load_model(out)
    assert not has_latent_stats(before) and has_latent_stats(after)
    assert {k for k in after if not k.startswith("latent_")} == set(before)
    assert read_meta(out).model_id == read_meta(tiny_model).model_id
