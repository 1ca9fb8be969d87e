"""``imganom review``: the real CLI server on loopback, driven in a real headless Chromium."""

from __future__ import annotations

import http.client
import json
import subprocess
from pathlib import Path

import cv2
import httpx
import pytest
from browser import chromium_driver
from helpers import cli_env, imganom_cmd
from review_data import ReviewServer, make_results, write_rows

from imganom.reporting.reviews import REVIEWS_FILE, ReviewStore

BADGES = (
    "return [...document.querySelectorAll('#gallery .card')]"
    ".map(c => [c.dataset.id, c.querySelector('.decision')?.textContent || ''])"
)


@pytest.fixture(scope="module")
def driver():
    with chromium_driver() as drv:
        yield drv


@pytest.fixture
def app(tmp_path: Path):
    res = tmp_path / "res"
    rows = make_results(res)
    srv = ReviewServer(res, tmp_path / "review.log", "--reviewer", "ann")
    srv.wait_ready()
    try:
        yield srv, res, rows
    finally:
        srv.stop()


def _wait(drv, js: str, timeout: float = 10.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(drv, timeout).until(lambda d: d.execute_script(js))


def _current(drv) -> str:
    return drv.execute_script("return window.imganomReview.state.item && window.imganomReview.state.item.id")


def _press(drv, *keys: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    for k in keys:
        ActionChains(drv).send_keys(k).perform()


def _settle(drv, item_id: str) -> None:
    st = "window.imganomReview.state"
    _wait(
        drv,
        f"return {st}.item && {st}.item.id === {json.dumps(item_id)} && !{st}.busy"
        " && document.querySelector('#world img.base')?.complete",
    )


def test_review_in_browser(driver, app) -> None:
    from selenium.webdriver.common.action_chains import ActionChains, ScrollOrigin
    from selenium.webdriver.common.by import By

    srv, res, rows = app
    ids = [r["id"] for r in rows]  # make_results writes them highest score first; the error row last
    driver.get(srv.url + "/")
    _wait(driver, "return document.querySelectorAll('#queue .card').length === 9")
    _settle(driver, ids[0])
    assert driver.find_element(By.ID, "reviewer").get_attribute("value") == "ann"
    assert len(driver.find_elements(By.CSS_SELECTOR, "#viewer table.regions")) == 0  # no regions in this set

    _press(driver, "j")
    _settle(driver, ids[1])
    _press(driver, "j", "k")
    _settle(driver, ids[1])
    _press(driver, "k")
    _settle(driver, ids[0])

    # overlay opacity, contour toggle, zoom
    driver.execute_script("const o = document.getElementById('opacity'); o.value = '0.9';"
                          "o.dispatchEvent(new Event('input'))")  # fmt: skip
    assert driver.execute_script("return document.querySelector('#world .heat').style.opacity") == "0.9"
    _press(driver, "c")
    assert driver.execute_script("return document.querySelector('#world .contour').style.display") == "none"
    _press(driver, "c")
    before = driver.execute_script("return window.imganomReview.state.zoom")
    stage = driver.find_element(By.ID, "stage")
    ActionChains(driver).scroll_from_origin(ScrollOrigin.from_element(stage), 0, -300).perform()
    _wait(driver, f"return window.imganomReview.state.zoom > {before} * 1.2")

    _press(driver, "1")  # ids[0]: defect, then the next image
    _settle(driver, ids[1])
    label = driver.find_element(By.ID, "label")
    label.send_keys("scratch")
    _press(driver, "\ue00c")  # Escape leaves the box
    _press(driver, "1")
    _settle(driver, ids[2])
    _press(driver, "2")  # ids[2]: normal (a false alarm: it was NG)
    _settle(driver, ids[3])

    # ids[3]: paint a mask correction, then defect
    _press(driver, "e")
    driver.execute_script("document.getElementById('brush').value = '30'")
    stage = driver.find_element(By.ID, "stage")
    zoom = driver.execute_script("return window.imganomReview.state.zoom")  # screen px per image px
    ActionChains(driver).move_to_element_with_offset(
        stage, int(-8 * zoom), int(15 * zoom)
    ).click_and_hold().move_by_offset(
        int(16 * zoom), 0
    ).release().perform()  # along image row 39, columns 16-32
    assert driver.execute_script("return window.imganomReview.state.dirty") is True
    _press(driver, "e", "1")
    _settle(driver, ids[4])
    _press(driver, "3")  # ids[4]: skip
    _settle(driver, ids[5])
    _press(driver, "k", "u")  # ... and undo it
    _wait(driver, "return !document.querySelector('#queue .card[data-pos=\"4\"] .decision')")

    latest = ReviewStore(res).latest()
    assert {k: v["decision"] for k, v in latest.items()} == {ids[0]: "defect", ids[1]: "defect",
                                                              ids[2]: "normal", ids[3]: "defect"}  # fmt: skip
    assert latest[ids[1]]["label"] == "scratch" and latest[ids[0]]["reviewer"] == "ann"
    assert latest[ids[2]]["verdict"] == "NG" and latest[ids[2]]["model_id"] == "sha256:test"
    assert latest[ids[0]]["score"] == rows[0]["score"]
    painted = cv2.imread(str(res / latest[ids[3]]["mask"]), cv2.IMREAD_GRAYSCALE)
    original = cv2.imread(str(res / rows[3]["outputs"]["mask"]), cv2.IMREAD_GRAYSCALE)
    assert painted.shape == original.shape and original[39].max() == 0
    assert (painted[39, 18:30] == 255).all() and (painted[original > 0] == 255).all()
    assert [r["decision"] for r in ReviewStore(res).history(ids[4])] == ["skip", "undo"]

    # reload: the decisions come back from the server
    driver.refresh()
    _wait(driver, "return document.querySelectorAll('#queue .card').length === 9")
    badges = [b for _, b in driver.execute_script(BADGES.replace("#gallery", "#queue"))]
    assert badges[:5] == ["defect", "defect: scratch", "normal", "defect", ""]
    driver.find_element(By.CSS_SELECTOR, '.filters button[data-filter="unreviewed"]').click()
    _wait(driver, "return document.querySelectorAll('#queue .card').length === 5")
    driver.find_element(By.ID, "search").send_keys("broken")
    _wait(driver, "return document.querySelectorAll('#queue .card').length === 1")
    assert "4 reviewed" in driver.find_element(By.ID, "agreement").text
    assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []

    srv.stop()  # a graceful stop refreshes summary.json and report.html
    summary = json.loads((res / "summary.json").read_text())
    assert summary["reviews"]["reviewed"] == 4 and summary["reviews"]["false_reject_rate"] == 1.0
    report = (res / "report.html").read_text()
    assert 'id="review-stats"' in report and "1 of 1 confirmed normal" in report
    driver.get((res / "report.html").as_uri())  # the static report shows the same badges
    _wait(driver, "return document.querySelectorAll('#gallery .card').length === 9")
    shown = dict(driver.execute_script(BADGES))
    assert shown[ids[1]] == "defect: scratch" and shown[ids[2]] == "normal" and shown[ids[4]] == ""


def test_two_tabs_writing_at_once_lose_nothing(driver, app) -> None:
    srv, res, rows = app
    ids = [r["id"] for r in rows]
    burst = """
      const [ids, who, reps] = [arguments[0], arguments[1], arguments[2]];
      window.__done = false;
      const jobs = [];
      const post = (id) => fetch("api/decisions", {method: "POST",
        headers: {"Content-Type": "application/json"},
        body: JSON.stringify({id, decision: "defect", reviewer: who})});
      for (let k = 0; k < reps; k++) for (const id of ids) jobs.push(post(id));
      Promise.all(jobs).then((r) => { window.__done = r.every((x) => x.ok); });
    """
    handles = []
    for _ in range(2):
        if handles:
            driver.switch_to.new_window("tab")
        driver.get(srv.url + "/")
        _wait(driver, "return document.querySelectorAll('#queue .card').length === 9")
        handles.append(driver.current_window_handle)
    for h, who in zip(handles, ("tab-a", "tab-b"), strict=True):  # both bursts in flight together
        driver.switch_to.window(h)
        driver.execute_script(burst, ids, who, 5)
    for h in handles:
        driver.switch_to.window(h)
        _wait(driver, "return window.__done === true", 30)
    # and one keyboard decision per tab
    for h in handles:
        driver.switch_to.window(h)
        _press(driver, "2")
    _wait(driver, "return fetch('api/info').then(r => r.json()).then(i => i.reviews.normal === 1)")
    lines = (res / REVIEWS_FILE).read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert len(recs) == 2 * 5 * len(ids) + 2
    assert sum(r["reviewer"] == "tab-a" for r in recs) == sum(r["reviewer"] == "tab-b" for r in recs) == 45
    driver.close()
    driver.switch_to.window(handles[0])


def test_paths_outside_the_folder_are_refused(app) -> None:
    srv, res, rows = app
    (res.parent / "secret.txt").write_text("no")
    ok = httpx.get(f"{srv.url}/files/{rows[0]['outputs']['mask']}")
    assert ok.status_code == 200 and ok.content.startswith(b"\x89PNG")
    for path in ("/files/../secret.txt", "/files/%2e%2e/secret.txt", "/files/..%2fsecret.txt",
                 "/files//etc/passwd", "/files/masks/../../secret.txt"):  # fmt: skip
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
        conn.request("GET", path)  # sent as written (httpx would normalise the dots)
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status in (403, 404) and b"no" != body, path
        assert resp.status == 403 or b"not_found" in body, path
    assert httpx.get(f"{srv.url}/files/{REVIEWS_FILE}").status_code == 404
    rebound = httpx.get(f"{srv.url}/api/info", headers={"Host": "evil.example:8765"})
    assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "forbidden_host"
    assert httpx.get(f"http://localhost:{srv.port}/api/info").status_code == 200
    bad = httpx.post(f"{srv.url}/api/decisions", json={"id": "nope.png", "decision": "defect"})
    assert bad.status_code == 422
    form = httpx.post(f"{srv.url}/api/decisions", data={"id": rows[0]["id"], "decision": "defect"})
    assert form.status_code == 415  # a cross-site form cannot post a decision
    assert not (res / REVIEWS_FILE).exists()


def test_beyond_loopback_needs_the_token(driver, tmp_path: Path) -> None:
    res = tmp_path / "res"
    make_results(res, n=3)
    refused = subprocess.run(imganom_cmd("review", str(res), "--host", "0.0.0.0"), env=cli_env(),
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert refused.returncode == 2 and "--token" in refused.stderr + refused.stdout
    srv = ReviewServer(res, tmp_path / "log", "--host", "0.0.0.0", "--token", "s3cret")
    try:
        srv.wait_ready()
        for path in ("/", "/api/info", "/api/queue", "/static/review.js", "/files/summary.json"):
            assert httpx.get(srv.url + path).status_code == 401, path
        assert httpx.get(srv.url + "/api/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(srv.url + "/api/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.post(srv.url + "/api/decisions", json={"id": "lot0/img000.png", "decision": "defect"}
                          ).status_code == 401  # fmt: skip
        driver.get(srv.url + "/?token=s3cret")  # sets the cookie; the page then works
        _wait(driver, "return document.querySelectorAll('#queue .card').length === 4")
        assert "token" not in driver.current_url
    finally:
        srv.stop()


def test_queue_pages_10000_rows(tmp_path: Path) -> None:
    res = tmp_path / "res"
    rows = [{"id": f"img{i:05d}.png", "status": "ok", "score": (i * 7919 % 10000) / 10000,
             "norm_score": None, "verdict": "NG" if (i * 7919 % 10000) / 10000 > 0.5 else "OK", "outputs": {}}
            for i in range(10_000)]  # fmt: skip
    write_rows(res, rows)
    for i in range(0, 300, 3):
        ReviewStore(res).add(rows[i]["id"], "normal")
    srv = ReviewServer(res, tmp_path / "log")
    try:
        srv.wait_ready()
        page = httpx.get(srv.url + "/api/queue", params={"offset": 100, "limit": 50}).json()
        assert page["total"] == 10_000 and len(page["items"]) == 50 and page["offset"] == 100
        scores = [x["score"] for x in page["items"]]
        assert scores == sorted(scores, reverse=True) and scores[0] == 1 - 101 / 10000
        near = httpx.get(srv.url + "/api/queue", params={"sort": "uncertainty", "limit": 4}).json()["items"]
        assert [abs(x["score"] - 0.5) for x in near] == sorted(abs(x["score"] - 0.5) for x in near)
        assert abs(near[0]["score"] - 0.5) <= 1e-4
        un = httpx.get(srv.url + "/api/queue", params={"filter": "unreviewed", "limit": 500}).json()
        assert un["total"] == 9_900 and len(un["items"]) == 500
        assert httpx.get(srv.url + "/api/queue", params={"filter": "reviewed"}).json()["total"] == 100
        assert httpx.get(srv.url + "/api/queue", params={"q": "img0424"}).json()["total"] == 10
        assert httpx.get(srv.url + "/api/queue", params={"limit": 5000}).status_code == 422
        last = httpx.get(srv.url + "/api/queue", params={"offset": 9990, "limit": 50}).json()
        assert len(last["items"]) == 10
    finally:
        srv.stop()
