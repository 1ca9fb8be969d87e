"""HTML review report: rendered from real output files and exercised in a real headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from browser import chromium_driver

from imganom.reporting.html import _histogram, write_report
from imganom.reporting.writers import OutputOptions, write_item_outputs

IMAGE_THRESHOLD = 0.5
EVIL_ID = "evil</script><b>x.png"


def _make_rows(out_dir: Path) -> list[dict]:
    """10 inspected images (4 NG, 6 OK) with real output files, plus 2 errors."""
    rng = np.random.default_rng(0)
    ids = ["a.png", "b.png", "sub/c.png", "sub/d.tif", "lot 7/part#2.png", "vol.nii.gz#slice=0003",
           "e.png", "f.png", "sub/deeper/g.png", EVIL_ID]  # fmt: skip
    scores = [0.91, 0.12, 0.65, 0.33, 0.05, 1.7, 0.41, 0.28, 0.52, 0.2]
    rows = []
    for item_id, score in zip(ids, scores, strict=True):
        h, w = int(rng.integers(60, 160)), int(rng.integers(60, 160))
        preview = rng.integers(60, 120, (h, w, 3), dtype=np.uint8)
        yy, xx = np.mgrid[:h, :w]
        amap = (score * np.exp(-((yy - h / 2) ** 2 + (xx - w / 3) ** 2) / (0.02 * h * w))).astype(np.float32)
        verdict = "NG" if score >= IMAGE_THRESHOLD else "OK"
        mask = amap > 0.3 if verdict == "NG" else np.zeros_like(amap, bool)
        every = OutputOptions(overlays="all")  # an overlay for the OK rows too
        outputs = write_item_outputs(out_dir, item_id, preview, amap, mask, threshold=0.3, vmax=1.0,
                                     score=score, verdict=verdict, options=every)  # fmt: skip
        n = int(mask.any())
        regions = [{"id": 1, "bbox": [0, 0, 5, 5], "area": int(mask.sum()), "area_pct": 1.5,
                    "centroid": [2.0, 2.0], "peak": score, "mean": score / 2}] if n else []  # fmt: skip
        rows.append({"id": item_id, "path": f"/data/{item_id}", "status": "ok", "verdict": verdict,
                     "score": score, "norm_score": score / IMAGE_THRESHOLD, "n_regions": n,
                     "max_region_area": int(mask.sum()), "regions": regions, "outputs": outputs,
                     "error": None})  # fmt: skip
    errors = (("broken.png", "cannot decode <b>image</b>"), ("sub/empty.tif", "ImageReadError: empty"))
    for item_id, msg in errors:
        rows.append({"id": item_id, "path": f"/data/{item_id}", "status": "error", "verdict": None,
                     "score": None, "norm_score": None, "n_regions": None, "max_region_area": None,
                     "regions": [], "outputs": {}, "error": msg})  # fmt: skip
    return rows


SUMMARY = {
    "counts": {"total": 12, "ok": 6, "ng": 4, "error": 2},
    "thresholds": {"image": IMAGE_THRESHOLD, "pixel": 0.3},
    "model": {"id": "sha256:abc123", "name": "bottle-vae"},
    "throughput_img_s": 37.5,
    "started": "2025-01-01T10:00:00",
    "finished": "2025-01-01T10:00:01",
    "device": "cpu",
}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("inspect_out")
    rows = _make_rows(out)
    path = write_report(out, rows, SUMMARY, title="Bottle <line 3>")
    return path, rows


def test_report_html_is_self_contained_and_escaped(report: tuple[Path, list[dict]]) -> None:
    path, rows = report
    html = path.read_text(encoding="utf-8")
    assert "<title>Bottle &lt;line 3&gt;</title>" in html
    assert "</script><b>" not in html and "<b>image</b>" not in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # no network resources
    data = json.loads(re.search(r'<script type="application/json" id="rows">(.*?)</script>', html, re.S)[1])
    assert len(data) == len(rows) and EVIL_ID in {d["id"] for d in data}
    assert [d["cat"] for d in data[:2]] == ["error", "error"]
    assert data[2]["img"]["preview"].startswith("previews/") and "%20" in next(
        d["img"]["preview"] for d in data if d["id"].startswith("lot 7/")
    )
    assert not list(path.parent.glob("*.tmp"))


@pytest.fixture(scope="module")
def driver():
    with chromium_driver() as drv:
        yield drv


def _cards(drv) -> list:
    from selenium.webdriver.common.by import By

    return drv.find_elements(By.CSS_SELECTOR, "#gallery .card")


def _wait(drv, js: str, timeout: float = 10.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(drv, timeout).until(lambda d: d.execute_script(js))


def test_report_in_browser(driver, report: tuple[Path, list[dict]], tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    path, rows = report
    driver.get(path.as_uri())
    _wait(driver, "return document.querySelectorAll('#gallery .card').length > 0")

    # Filters (buttons and keys 1-4) show exactly the matching rows.
    expected = {"all": 12, "ng": 4, "ok": 6, "error": 2}
    for f, n in expected.items():
        driver.find_element(By.CSS_SELECTOR, f'.filters button[data-filter="{f}"]').click()
        cards = _cards(driver)
        assert len(cards) == n, f
        assert all(f in ("all", c.get_attribute("data-cat")) for c in cards)
        assert driver.find_element(By.CSS_SELECTOR, f'button[data-filter="{f}"] .n').text == str(n)
    body = driver.find_element(By.TAG_NAME, "body")
    for key, n in zip("2341", [4, 6, 2, 12], strict=True):
        body.send_keys(key)
        assert len(_cards(driver)) == n

    # Sorted: errors first, then score descending.
    cards = _cards(driver)
    cats = [c.get_attribute("data-cat") for c in cards]
    assert cats[:2] == ["error", "error"] and "error" not in cats[2:]
    scores = [float(c.get_attribute("data-score")) for c in cards[2:]]
    assert scores == sorted((r["score"] for r in rows if r["score"] is not None), reverse=True)

    # Every image exists and decodes (scroll each into view so lazy loading starts).
    imgs = driver.find_elements(By.CSS_SELECTOR, "#gallery img")
    assert len(imgs) == 30
    for img in imgs:
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", img)
    _wait(driver, "return [...document.querySelectorAll('#gallery img')].every(i => i.complete)")
    broken = driver.execute_script(
        "return [...document.querySelectorAll('#gallery img')]"
        ".filter(i => !(i.naturalWidth > 0)).map(i => i.src)"
    )
    assert broken == []

    # Hostile ids and messages are text, not markup.
    assert driver.find_elements(By.CSS_SELECTOR, "#gallery b") == []
    assert any(c.text.startswith("ERROR") and "cannot decode <b>image</b>" in c.text for c in _cards(driver))
    assert any(c.get_attribute("data-id") == EVIL_ID for c in _cards(driver))

    # Keyboard: j/k and arrows move the highlight, Enter opens the lightbox, Esc closes it.
    driver.execute_script("window.scrollTo(0, 0)")
    sel = "return [...document.querySelectorAll('#gallery .card.sel')].map(c => c.dataset.pos)"
    body.send_keys("j")
    assert driver.execute_script(sel) == ["0"]
    body.send_keys("j", "j")
    assert driver.execute_script(sel) == ["2"]
    body.send_keys("k")
    assert driver.execute_script(sel) == ["1"]
    body.send_keys(Keys.ARROW_RIGHT)
    assert driver.execute_script(sel) == ["2"]
    body.send_keys(Keys.ENTER)
    lightbox = driver.find_element(By.ID, "lightbox")
    assert lightbox.is_displayed() and cards[2].get_attribute("data-id") in lightbox.text
    assert len(lightbox.find_elements(By.TAG_NAME, "img")) == 3
    body.send_keys(Keys.ESCAPE)
    assert not lightbox.is_displayed()

    # Search narrows by id.
    search = driver.find_element(By.ID, "search")
    search.send_keys("sub/")
    assert sorted(c.get_attribute("data-id") for c in _cards(driver)) == sorted(
        r["id"] for r in rows if "sub/" in r["id"]
    )
    search.send_keys(Keys.BACKSPACE * 4, Keys.ESCAPE)  # typed, so 'input' fires; Esc leaves the box
    assert len(_cards(driver)) == 12

    # Histogram with the image-threshold line at the right place.
    line = driver.find_element(By.ID, "threshold-line")
    assert float(line.get_attribute("data-threshold")) == IMAGE_THRESHOLD
    assert 0 < float(line.get_attribute("x1")) < 1000
    n_bars = len(driver.find_elements(By.CSS_SELECTOR, "#histogram rect"))
    hist = _histogram(rows, IMAGE_THRESHOLD)  # one rect per non-empty OK or NG stack
    assert n_bars == sum((b["ok_h"] > 0) + (b["ng_h"] > 0) for b in hist["bars"]) > 0

    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []

    body.send_keys("j", "j")
    driver.execute_script("window.scrollTo(0, 0)")
    shot = tmp_path / "report.png"
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    shutil.copy(shot, "/tmp/imganom_report.png")


def test_report_with_5000_rows_renders_lazily(driver, report, tmp_path: Path) -> None:
    path0, rows = report
    for sub in ("previews", "overlays", "masks"):  # reuse one item's images for every row
        shutil.copytree(path0.parent / sub, tmp_path / sub)
    template = rows[0]
    many = [{**template, "id": f"img_{i:05d}.png", "score": float(i % 997) / 997,
             "verdict": "NG" if i % 997 >= 499 else "OK"} for i in range(5000)]  # fmt: skip
    path = write_report(tmp_path, many, {"thresholds": {"image": 0.5}})
    t0 = time.perf_counter()
    driver.get(path.as_uri())
    _wait(driver, "return document.querySelectorAll('#gallery .card').length > 0")
    assert time.perf_counter() - t0 < 10
    first = len(_cards(driver))
    assert 0 < first <= 500
    for _ in range(3):
        driver.execute_script("window.scrollTo(0, document.body.scrollHeight)")
        time.sleep(0.3)
    assert first < len(_cards(driver)) < 5000
    from selenium.webdriver.common.by import By

    driver.find_element(By.TAG_NAME, "body").send_keys("2")
    n_ng = sum(r["verdict"] == "NG" for r in many)
    status = driver.execute_script("return document.getElementById('status').textContent")
    assert status == f"{n_ng} of 5000 shown"
    assert len(_cards(driver)) <= 500
    assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []


def test_report_without_rows_or_summary(tmp_path: Path) -> None:
    html = write_report(tmp_path, [], {}).read_text(encoding="utf-8")
    assert 'id="histogram"' not in html and 'data-filter="ng"' in html
    assert re.search(r'<script type="application/json" id="rows">\[\]</script>', html)


def test_render_page_writes_a_template_with_version(tmp_path: Path) -> None:
    from imganom.reporting.html import render_page
    from imganom.utils.version import __version__

    counts = {"total": 0, "ok": 0, "ng": 0, "error": 0}
    ctx = dict(counts={"all": 0, "ng": 0, "ok": 0, "error": 0}, header_counts=counts, thresholds={}, model={},
               throughput=None, started=None, finished=None, extra={}, hist=None, data="[]")  # fmt: skip
    path = render_page("report.html.j2", tmp_path / "sub" / "page.html", title="<My & title>", **ctx)
    html = path.read_text(encoding="utf-8")
    assert path == tmp_path / "sub" / "page.html" and __version__ in html
    assert "&lt;My &amp; title&gt;" in html and "<My & title>" not in html  # autoescaped
    assert [p.name for p in path.parent.iterdir()] == ["page.html"]  # no temp file left behind
