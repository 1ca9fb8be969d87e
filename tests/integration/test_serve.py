"""imganom serve: real ``imganom serve`` processes on 127.0.0.1, real HTTP requests with real image bytes.

Two servers start in parallel from one tiny trained model: ``main`` (small body / pixel / queue limits,
a 20 ms batch window) and ``term`` (1.5 s batch window, so requests are still waiting when it gets
SIGTERM). Every JSON response is checked against the server's own /openapi.json.
"""

from __future__ import annotations

import base64
import io
import math
import re
import signal
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
import tifffile
from PIL import Image
from serve_process import Server

pytestmark = pytest.mark.timeout(120)
HTTP = httpx.Client(timeout=30, limits=httpx.Limits(max_connections=128))  # thread-safe, shared by all tests


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def trained(small_run: dict[str, Path]) -> dict[str, Path]:
    """The shared tiny model (conftest ``small_run``): calibrated, an uncalibrated copy, its data."""
    return small_run


@pytest.fixture(scope="session")
def servers(trained: dict[str, Path]) -> Iterator[dict[str, Server]]:
    m, root = trained["model"], trained["root"]
    srv = {
        "main": Server(m, root / "main.log", "--max-body-mb", "0.5", "--max-pixels", "1000000",
                       "--max-wait-ms", "20", "--max-queue", "16", "--docs"),
        "term": Server(m, root / "term.log", "--max-batch", "64", "--max-wait-ms", "1500"),
    }  # fmt: skip
    try:
        for s in srv.values():
            s.wait_ready()
        yield srv
    finally:
        for s in srv.values():
            s.kill()


@pytest.fixture(scope="session")
def main(servers: dict[str, Server]) -> str:
    return servers["main"].url


@pytest.fixture(scope="session")
def openapi(main: str) -> dict:
    r = HTTP.get(main + "/openapi.json")
    assert r.status_code == 200
    return r.json()


# ------------------------------------------------------------------------------------------- images


@pytest.fixture(scope="session")
def images(trained: dict[str, Path]) -> dict[str, bytes]:
    data = trained["data"] / "test"
    good = cv2.imread(str(sorted((data / "good").glob("*.png"))[0]), cv2.IMREAD_GRAYSCALE)
    defect = cv2.imread(str(sorted(p for p in data.rglob("*.png") if p.parent.name != "good")[0]), 0)

    def png(a: np.ndarray) -> bytes:
        return cv2.imencode(".png", a)[1].tobytes()

    jpg, tif, tif5 = io.BytesIO(), io.BytesIO(), io.BytesIO()
    Image.fromarray(np.dstack([good] * 3)).save(jpg, "JPEG", quality=95)
    tifffile.imwrite(tif, good.astype(np.uint16) * 257)
    tifffile.imwrite(tif5, np.stack([good] * 5))
    full = png(good)
    return {
        "good": full, "defect": png(defect), "jpeg": jpg.getvalue(), "tiff16": tif.getvalue(),
        "tiff5": tif5.getvalue(), "truncated": full[: len(full) // 2],
        "wide": png(cv2.resize(defect, (80, 48))), "big": png(cv2.resize(defect, (512, 512))),
        "huge_header": _png_header(100_000, 100_000), "over_max_pixels": _png_header(2000, 2000),
        "dicom": _dicom(good.astype(np.uint16) * 257),
        "dicom3": _dicom(np.stack([good.astype(np.uint16)] * 3)),
    }  # fmt: skip


def _dicom(pixels: np.ndarray) -> bytes:
    """Uncompressed 16-bit DICOM bytes: one frame (H, W) or a multi-frame stack (F, H, W)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = (
        SecondaryCaptureImageStorage,
        generate_uid(),
    )
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("upload.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation = "OT", 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _png_header(w: int, h: int) -> bytes:
    """A tiny PNG whose IHDR claims w x h (only a few bytes of pixel data follow)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


# ------------------------------------------------------------------------------------------- schema check


def _schema_errors(x: Any, schema: dict, root: dict, path: str = "$") -> list[str]:
    """Errors of ``x`` against an OpenAPI 3.1 / JSON-schema subset ($ref, anyOf, type, enum, const,
    properties, required, additionalProperties, items); jsonschema is not a dependency."""
    if "$ref" in schema:
        node: Any = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        return _schema_errors(x, node, root, path)
    if "anyOf" in schema:
        options = [_schema_errors(x, s, root, path) for s in schema["anyOf"]]
        return [] if any(not o for o in options) else [f"{path}: matches no anyOf option: {options}"]
    errs: list[str] = []
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    t = schema.get("type")
    if t == "integer":
        ok = isinstance(x, int) and not isinstance(x, bool)
    elif t == "number":
        ok = isinstance(x, (int, float)) and not isinstance(x, bool)
    else:
        ok = t is None or isinstance(x, types[t])
    if not ok:
        return [f"{path}: expected {t}, got {type(x).__name__} {x!r:.80}"]
    if "enum" in schema and x not in schema["enum"]:
        errs.append(f"{path}: {x!r} not in {schema['enum']}")
    if "const" in schema and x != schema["const"]:
        errs.append(f"{path}: {x!r} != {schema['const']!r}")
    if isinstance(x, dict):
        props = schema.get("properties", {})
        errs += [f"{path}: missing required {k!r}" for k in schema.get("required", []) if k not in x]
        for k, v in x.items():
            if k in props:
                errs += _schema_errors(v, props[k], root, f"{path}.{k}")
            elif schema.get("additionalProperties") is False:
                errs.append(f"{path}: unexpected key {k!r}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errs += _schema_errors(v, schema["additionalProperties"], root, f"{path}.{k}")
    if isinstance(x, list) and "items" in schema:
        for i, v in enumerate(x):
            errs += _schema_errors(v, schema["items"], root, f"{path}[{i}]")
    return errs


def check(r: httpx.Response, openapi: dict, path: str, method: str = "post") -> dict:
    """The JSON body of ``r``, asserted to match the schema documented for its status code."""
    responses = openapi["paths"][path][method]["responses"]
    assert str(r.status_code) in responses, f"{r.status_code} not documented for {method} {path}: {r.text}"
    schema = responses[str(r.status_code)]["content"]["application/json"]["schema"]
    body = r.json()
    assert _schema_errors(body, schema, openapi) == []
    return body


def post(url: str, data: bytes, ctype: str = "image/png", **params: Any) -> httpx.Response:
    return HTTP.post(url + "/v1/inspect", content=data, headers={"Content-Type": ctype}, params=params)


def metrics(url: str) -> dict[str, float]:
    text = HTTP.get(url + "/metrics").text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def _png_array(b64: str) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_UNCHANGED)


# ------------------------------------------------------------------------------------------- tests


def test_health_ready_and_model(main: str, openapi: dict, trained: dict[str, Path]) -> None:
    from imganom.formats.modelfile import read_meta

    meta = read_meta(trained["model"])
    assert check(HTTP.get(main + "/healthz"), openapi, "/healthz", "get")["status"] == "ok"
    assert check(HTTP.get(main + "/readyz"), openapi, "/readyz", "get")["status"] == "ready"
    info = check(HTTP.get(main + "/v1/model"), openapi, "/v1/model", "get")
    assert info["id"] == meta.model_id and info["name"] == "tiny"
    assert info["thresholds"] == {"image": meta.calibration["image_threshold"],
                                  "pixel": meta.calibration["pixel_threshold"]}  # fmt: skip
    assert info["calibration"]["n_images"] == meta.calibration["n_images"]
    assert info["input"] == {"size": [64, 64], "channels": 1, "resize": "stretch", "intensity": "dtype",
                             "max_pixels": 1_000_000, "max_bytes": 64 * 2**20}  # fmt: skip
    assert info["versions"]["imganom"] and info["training"]
    assert info["backend"]["name"] == "torch" and info["backend"]["device"] == "cpu"


def test_openapi_documents_the_endpoint(openapi: dict) -> None:
    op = openapi["paths"]["/v1/inspect"]["post"]
    content = op["requestBody"]["content"]
    assert {"multipart/form-data", "image/png", "image/jpeg", "image/tiff", "application/dicom"} <= set(
        content
    )
    assert {"200", "400", "401", "408", "413", "415", "422", "503", "504"} <= set(op["responses"])
    assert {p["name"] for p in op["parameters"]} == {"mask", "overlay", "regions", "image_threshold",
                                                       "pixel_threshold"}  # fmt: skip


def test_png_multipart_and_raw_agree(main: str, openapi: dict, images: dict[str, bytes]) -> None:
    raw = post(main, images["good"])
    body = check(raw, openapi, "/v1/inspect")
    assert raw.headers["x-request-id"] == body["id"]
    files = {"file": ("part.png", images["good"], "image/png")}
    mp = HTTP.post(main + "/v1/inspect", files=files, headers={"X-Request-ID": "line-7.cam:2"})
    body2 = check(mp, openapi, "/v1/inspect")
    assert body2["id"] == "line-7.cam:2"
    assert body["score"] == pytest.approx(body2["score"], rel=1e-5)
    assert body["verdict"] == body2["verdict"] and body["verdict"] in ("OK", "NG")
    assert body["image"] == {"width": 64, "height": 64, "channels": 1, "format": "png"}
    assert body["model"]["name"] == "tiny" and body["latency_ms"] > 0
    assert "mask_png_b64" not in body and "overlay_png_b64" not in body
    assert body["n_regions"] == len(body["regions"])


def test_jpeg_tiff16_and_dicom(main: str, openapi: dict, images: dict[str, bytes]) -> None:
    ref = post(main, images["good"]).json()["score"]
    jpg = check(post(main, images["jpeg"], "image/jpeg"), openapi, "/v1/inspect")
    assert jpg["image"] == {"width": 64, "height": 64, "channels": 3, "format": "jpeg"}
    tif = check(post(main, images["tiff16"], "image/tiff"), openapi, "/v1/inspect")
    assert tif["image"]["format"] == "tiff" and tif["image"]["channels"] == 1
    assert tif["score"] == pytest.approx(ref, rel=1e-3)  # x*257/65535 == x/255: same pixels
    dcm = check(post(main, images["dicom"], "application/dicom"), openapi, "/v1/inspect")
    assert dcm["image"]["format"] == "dicom" and dcm["score"] == pytest.approx(ref, rel=1e-3)
    assert math.isfinite(jpg["score"]) and jpg["score"] == pytest.approx(ref, rel=0.5)


def test_mask_and_overlay_are_pngs_of_the_original_size(main: str, openapi: dict, images: dict) -> None:
    r = check(post(main, images["wide"], mask=True, overlay=True, regions=False), openapi, "/v1/inspect")
    mask, overlay = _png_array(r["mask_png_b64"]), _png_array(r["overlay_png_b64"])
    assert mask.shape == (48, 80) and set(np.unique(mask)) <= {0, 255}
    assert overlay.shape == (48, 80, 3)
    assert "regions" not in r and r["n_regions"] >= 0
    assert (mask > 0).any() == (r["n_regions"] > 0)


def test_threshold_override_is_per_request(main: str, openapi: dict, images: dict[str, bytes]) -> None:
    base = post(main, images["defect"]).json()
    s = base["score"]
    ng = check(post(main, images["defect"], image_threshold=s - 1e-3), openapi, "/v1/inspect")
    assert ng["verdict"] == "NG" and ng["is_anomalous"] and ng["norm_score"] > 0.5
    assert ng["thresholds"] == {"image": s - 1e-3, "pixel": base["thresholds"]["pixel"]}
    ok = post(main, images["defect"], image_threshold=s + 1.0).json()
    assert ok["verdict"] == "OK" and ok["norm_score"] < 0.5
    full = post(main, images["defect"], pixel_threshold=-1e9, mask=True).json()
    assert full["n_regions"] == 1 and (_png_array(full["mask_png_b64"]) == 255).all()
    after = post(main, images["defect"], mask=True).json()  # the shared inspector is untouched
    assert after["thresholds"] == base["thresholds"]
    assert (after["verdict"], after["n_regions"], after["score"]) == (base["verdict"], base["n_regions"], s)
    assert not (_png_array(after["mask_png_b64"]) == 255).all()
    bad = post(main, images["defect"], image_threshold="nan")
    assert (
        bad.status_code == 422 and "image_threshold" in check(bad, openapi, "/v1/inspect")["error"]["message"]
    )


@pytest.mark.parametrize(
    ("name", "ctype", "status", "code", "words"),
    [
        ("garbage", "application/octet-stream", 400, "bad_image", "unrecognised image data"),
        ("garbage", "image/png", 400, "bad_image", "not a PNG"),
        ("truncated", "image/png", 400, "bad_image", "truncated"),
        ("good", "text/plain", 415, "unsupported_media_type", "text/plain"),
        ("empty", "image/png", 400, "empty_body", "empty"),
        ("huge_header", "image/png", 413, "image_too_large", "10000000000 pixels"),
        ("over_max_pixels", "image/png", 413, "image_too_large", "max_pixels=1000000"),
        ("tiff5", "image/tiff", 422, "unsupported_channels", "5 channels"),
        ("dicom3", "application/dicom", 422, "unsupported_volume", "upload one slice"),
        ("too_big", "application/octet-stream", 413, "body_too_large", "limit of 524288 bytes"),
    ],
)
def test_bad_input_is_a_clear_4xx(main: str, openapi: dict, images: dict, name: str, ctype: str, status: int,
                                  code: str, words: str) -> None:  # fmt: skip
    data = {
        "garbage": b"\x00garbage, not an image" * 20,
        "empty": b"",
        "too_big": b"\x89PNG" + b"x" * 600_000,
    }
    r = post(main, data[name] if name in data else images[name], ctype)
    err = check(r, openapi, "/v1/inspect")["error"]
    assert (r.status_code, err["code"]) == (status, code)
    assert words in err["message"]


def test_streamed_body_over_the_limit_and_bad_multipart(main: str, openapi: dict, images: dict) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap must hold on the bytes actually read
        for _ in range(12):
            yield b"\0" * 65536

    r = HTTP.post(main + "/v1/inspect", content=chunks(), headers={"Content-Type": "image/png"})
    assert "content-length" not in r.request.headers
    assert r.status_code == 413 and check(r, openapi, "/v1/inspect")["error"]["code"] == "body_too_large"
    r = HTTP.post(main + "/v1/inspect", files={"image": ("a.png", images["good"], "image/png")})
    assert r.status_code == 400 and "'file'" in check(r, openapi, "/v1/inspect")["error"]["message"]
    r = HTTP.post(main + "/v1/inspect", files={"file": ("a.txt", b"hello", "text/plain")})
    assert r.status_code == 415
    assert post(main, images["good"]).status_code == 200  # still serving


def test_metrics_count_requests_and_verdicts(main: str, images: dict[str, bytes]) -> None:
    before = metrics(main)
    post(main, images["good"])
    post(main, images["truncated"])
    after = metrics(main)

    def delta(key: str) -> float:
        return after.get(key, 0) - before.get(key, 0)

    assert delta('imganom_requests_total{status="200"}') == 1
    assert delta('imganom_requests_total{status="400"}') == 1
    assert delta('imganom_verdicts_total{verdict="OK"}') + delta('imganom_verdicts_total{verdict="NG"}') == 1
    assert delta("imganom_request_latency_seconds_count") == 2
    assert delta('imganom_request_latency_seconds_bucket{le="+Inf"}') == 2
    assert after["imganom_queue_depth"] == 0 and after["imganom_ready"] == 1


def test_concurrent_requests_are_batched_and_correct(main: str, images: dict[str, bytes]) -> None:
    ref = {k: post(main, images[k]).json()["score"] for k in ("good", "defect")}
    before = metrics(main)

    def client(i: int) -> list[tuple[str, int, float]]:
        out = []
        for j in range(4):
            k = ("good", "defect")[(i + j) % 2]
            r = post(main, images[k])
            out.append((k, r.status_code, r.json().get("score", math.nan)))
        return out

    with ThreadPoolExecutor(16) as pool:
        results = [x for batch in pool.map(client, range(16)) for x in batch]
    assert len(results) == 64 and all(status == 200 for _, status, _ in results)
    for k, _, score in results:
        assert score == pytest.approx(ref[k], rel=1e-4, abs=1e-6)
    after = metrics(main)
    n_batches = after["imganom_batch_size_count"] - before["imganom_batch_size_count"]
    singles = after['imganom_batch_size_bucket{le="1"}'] - before['imganom_batch_size_bucket{le="1"}']
    assert after["imganom_batch_size_sum"] - before["imganom_batch_size_sum"] == 64
    assert n_batches < 64 and singles < n_batches  # some batches held more than one image


def test_overload_gives_503_with_retry_after_never_500(main: str, openapi: dict, images: dict) -> None:
    url = main  # --max-queue 16 + --max-batch 16: at most 32 requests admitted at once

    def one(_: int) -> httpx.Response:
        return post(url, images["big"])

    statuses: list[int] = []
    for _ in range(3):  # a burst of 48 overflows 32 slots; retry in case the first burst trickled in
        with ThreadPoolExecutor(48) as pool:
            rs = list(pool.map(one, range(48)))
        statuses += [r.status_code for r in rs]
        for r in rs:
            body = check(r, openapi, "/v1/inspect")
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1" and body["error"]["code"] == "overloaded"
        if 503 in statuses:
            break
    assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses
    assert post(url, images["good"]).status_code == 200  # recovers after the burst


def test_sigterm_lets_in_flight_requests_finish_and_exits_0(servers: dict[str, Server], images: dict) -> None:
    srv = servers["term"]
    results: list[httpx.Response] = []

    def one() -> None:
        results.append(post(srv.url, images["good"]))

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    t_end = time.monotonic() + 20
    while (inflight := metrics(srv.url)["imganom_inflight_requests"]) < 6 and not results:
        assert time.monotonic() < t_end, "requests never reached the server"
        time.sleep(0.02)  # normally all six end up waiting in the 1.5 s batch window
    assert inflight > 0
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(30)
    rc = srv.proc.wait(15)
    assert rc == 0, srv.log.read_text()
    assert time.monotonic() - t0 < 10
    assert [r.status_code for r in results] == [200] * 6
    with pytest.raises(httpx.TransportError):
        HTTP.get(srv.url + "/healthz", timeout=2)


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_in_process_readiness_and_timeout(trained: dict[str, Path], images: dict[str, bytes]) -> None:
    """In-process app: alive but not ready before startup; a request that outlives --timeout-s gets 504
    and its queued job is dropped, never run."""
    from fastapi.testclient import TestClient

    from imganom.inference.inspector import Inspector
    from imganom.serve.app import ServeSettings, create_app

    app = create_app(Inspector.load(trained["model"]), ServeSettings(max_wait_ms=3000, timeout_s=0.3))
    client = TestClient(app)  # not entered as a context manager: startup has not run
    assert client.get("/healthz").status_code == 200
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json() == {"status": "not_ready", "detail": "warming up"}
    with TestClient(app) as live:  # startup runs the warm-up in the background
        t_end = time.monotonic() + 30
        while live.get("/readyz").status_code != 200:
            assert time.monotonic() < t_end
            time.sleep(0.05)
        t0 = time.monotonic()
        r = live.post("/v1/inspect", content=images["good"], headers={"Content-Type": "image/png"})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert "0.3s" in r.json()["error"]["message"] and time.monotonic() - t0 < 2.5
    assert app.state.service.metrics.batch_size.count == 0  # the timed-out job was skipped at shutdown


def test_cli_refuses_bad_models(trained: dict[str, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from imganom.cli.main import app

    runner = CliRunner()
    r = runner.invoke(app, ["serve", "--model", str(tmp_path / "missing.safetensors")])
    assert r.exit_code == 2 and "model file not found" in r.output
    r = runner.invoke(app, ["serve", "--model", str(trained["uncalibrated"])])
    assert r.exit_code == 2 and "not calibrated" in r.output
    (tmp_path / "junk.safetensors").write_bytes(b"not a model")
    r = runner.invoke(app, ["serve", "--model", str(tmp_path / "junk.safetensors")])
    assert r.exit_code == 2 and "junk.safetensors" in r.output
    assert re.search(r"--max-batch", runner.invoke(app, ["serve", "--help"]).output)
