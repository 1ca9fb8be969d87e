"""The model options every inspecting command shares (``cli.options``): ``--model`` as an ``.onnx`` export,
``--roi`` and the option checks, exercised through ``serve`` (real processes on 127.0.0.1), ``watch`` and
``evaluate`` (in-process CLI), each compared with an in-process ``Inspector`` on the same image."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from helpers import cli_env, imganom_cmd
from typer.testing import CliRunner

from imganom.cli.main import app
from imganom.inference.inspector import Inspector
from imganom.ops.postprocess import load_roi

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def setup(small_run: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The shared tiny model, its ONNX export, a half-image ROI mask and a defect image with in-process
    reference results (without and with the ROI)."""
    root = tmp_path_factory.mktemp("model_options")
    onnx = root / "model.onnx"
    r = CliRunner().invoke(app, ["export", "--model", str(small_run["model"]), "--out", str(onnx)])
    assert r.exit_code == 0, r.output
    test = small_run["data"] / "test"
    defect = sorted(p for p in test.glob("*/*.png") if p.parent.name != "good")[0]
    insp = Inspector.load(small_run["model"], device="cpu")
    plain = insp.predict(defect)
    # the ROI is the half of the image without the map's peak, so the score must change
    peak_x = int(np.unravel_index(np.argmax(plain.anomaly_map), plain.anomaly_map.shape)[1])
    outside = np.s_[:, :32] if peak_x < 32 else np.s_[:, 32:]
    mask = np.full((64, 64), 255, np.uint8)
    mask[outside] = 0
    roi = root / "roi.png"
    cv2.imwrite(str(roi), mask)
    insp.roi = load_roi(roi, tuple(insp.cfg.preprocess.size))
    with_roi = insp.predict(defect)
    assert with_roi.score != plain.score  # the ROI matters for this image (else the tests prove nothing)
    return {"model": small_run["model"], "data": small_run["data"], "onnx": onnx, "roi": roi,
            "defect": defect, "plain": plain, "with_roi": with_roi, "root": root,
            "model_id": insp.model_id, "outside": outside}  # fmt: skip


# ------------------------------------------------------------------------------------------- serve


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(log: Path, *args: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(imganom_cmd("serve", "--port", str(port), *args), stdout=fh,
                                stderr=subprocess.STDOUT, env=cli_env())  # fmt: skip
    return proc, f"http://127.0.0.1:{port}"


def _wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 90.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"server not ready after {timeout}s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def servers(setup: dict) -> Iterator[dict[str, str]]:
    """Two ``imganom serve`` processes started together: the ONNX export, and the torch model with --roi."""
    root = setup["root"]
    procs = {
        "onnx": (*_start(root / "onnx.log", "--model", str(setup["onnx"])), root / "onnx.log"),
        "roi": (*_start(root / "roi.log", "--model", str(setup["model"]), "--roi", str(setup["roi"]),
                        "--device", "cpu"), root / "roi.log"),
    }  # fmt: skip
    try:
        for proc, url, log in procs.values():
            _wait_ready(proc, url, log)
        yield {name: url for name, (_, url, _) in procs.items()}
    finally:
        for proc, _, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _inspect(url: str, image: Path, **params: str) -> dict:
    r = httpx.post(url + "/v1/inspect", content=image.read_bytes(), params=params,
                   headers={"Content-Type": "image/png"}, timeout=30)  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()


def test_serve_an_onnx_export(servers: dict[str, str], setup: dict) -> None:
    body = _inspect(servers["onnx"], setup["defect"])
    ref = setup["plain"]
    assert body["score"] == pytest.approx(ref.score, rel=1e-3)
    assert body["verdict"] == ref.verdict
    model = httpx.get(servers["onnx"] + "/v1/model", timeout=10).json()
    assert model["id"] == setup["model_id"] and model["precision"] == "fp32" and model["device"] == "cpu"


def test_serve_roi_changes_the_result(servers: dict[str, str], setup: dict) -> None:
    body = _inspect(servers["roi"], setup["defect"], mask="true")
    ref, plain = setup["with_roi"], setup["plain"]
    assert body["score"] == pytest.approx(ref.score, rel=1e-6) and body["score"] != plain.score
    assert body["n_regions"] == len(ref.regions)
    mask = cv2.imdecode(np.frombuffer(base64.b64decode(body["mask_png_b64"]), np.uint8), cv2.IMREAD_UNCHANGED)
    assert not mask[setup["outside"]].any()  # nothing flagged outside the ROI
    assert np.array_equal(mask > 0, ref.mask > 0)


def test_serve_refuses_a_bad_roi_and_precision(setup: dict, tmp_path: Path) -> None:
    run = CliRunner().invoke
    r = run(app, ["serve", "--model", str(setup["model"]), "--roi", str(tmp_path / "missing.png")])
    assert r.exit_code == 2 and "missing.png" in r.output
    r = run(app, ["serve", "--model", str(setup["model"]), "--precision", "fp64"])
    assert r.exit_code == 2 and "--precision" in r.output


# ------------------------------------------------------------------------------------------- watch, evaluate


def test_watch_takes_roi(setup: dict, tmp_path: Path) -> None:
    in_dir, out = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    (in_dir / "part.png").write_bytes(setup["defect"].read_bytes())
    args = ["watch", str(in_dir), "--model", str(setup["model"]), "--out", str(out),
            "--roi", str(setup["roi"]), "--once", "--settle-s", "0", "--poll-s", "0.05", "--no-report",
            "--device", "cpu"]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    (row,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert row["id"] == "part.png" and row["score"] == pytest.approx(setup["with_roi"].score, rel=1e-6)
    assert row["score"] != setup["plain"].score
    mask = cv2.imread(str(out / row["outputs"]["mask"]), cv2.IMREAD_GRAYSCALE)
    assert not mask[setup["outside"]].any()


def test_evaluate_takes_roi(setup: dict, tmp_path: Path) -> None:
    def scores(out: Path, *extra: str) -> dict[str, float]:
        args = ["evaluate", "--model", str(setup["model"]), "--data", str(setup["data"]), "--out", str(out),
                "--workers", "0", "--worst", "0", "--no-report", "--device", "cpu", *extra]  # fmt: skip
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, r.output
        lines = (out / "scores.csv").read_text().splitlines()[1:]
        return {line.split(",")[0]: float(line.split(",")[3]) for line in lines}

    plain, with_roi = scores(tmp_path / "plain"), scores(tmp_path / "roi", "--roi", str(setup["roi"]))
    assert plain.keys() == with_roi.keys() and len(plain) == 16
    key = setup["defect"].relative_to(setup["data"]).as_posix()  # e.g. test/crack/000.png
    assert with_roi[key] == pytest.approx(setup["with_roi"].score, rel=1e-6)
    assert plain[key] == pytest.approx(setup["plain"].score, rel=1e-6)
    assert plain != with_roi
