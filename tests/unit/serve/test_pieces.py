"""The small pieces of ``imganom.serve`` with logic of their own: Prometheus text, reader-error statuses,
request-body limits and upload parsing (real starlette Requests over an in-memory ASGI receive channel), the
memory budget, paths kept out of /v1/model and the loopback rule."""

from __future__ import annotations

import asyncio
import re

import pytest
from starlette.requests import Request

from imganom.data.readers import ImageReadError
from imganom.serve.errors import ApiError, busy, classify_read_error, error_response
from imganom.serve.metrics import Histogram, Metrics
from imganom.serve.server import is_loopback
from imganom.serve.service import MemoryBudget, without_paths
from imganom.serve.uploads import boundary_of, extract_image, media_type, read_body

# ------------------------------------------------------------------------------------------- metrics


def test_histogram_lines_are_cumulative() -> None:
    h = Histogram((1, 2, 4))
    for v in (0.5, 1, 1.5, 3, 9):
        h.observe(v)
    assert h.lines("x") == [
        'x_bucket{le="1"} 2', 'x_bucket{le="2"} 3', 'x_bucket{le="4"} 4', 'x_bucket{le="+Inf"} 5',
        "x_sum 15.000000", "x_count 5",
    ]  # fmt: skip


def test_metrics_render_counts_and_gauges() -> None:
    m = Metrics()
    m.count_request(200, 0.02)
    m.count_request(200, 0.2)
    m.count_request(503, 0.001)
    m.verdicts["NG"] += 1
    m.batch_size.observe(3)
    text = m.render(queue_depth=4, inflight=2, ready=True)
    assert text.endswith("\n")
    values = dict(re.findall(r"^(\S+) (\S+)$", text, re.M))
    assert values['imganom_requests_total{status="200"}'] == "2"
    assert values['imganom_requests_total{status="503"}'] == "1"
    assert values['imganom_verdicts_total{verdict="NG"}'] == "1"
    assert values["imganom_request_latency_seconds_count"] == "3"
    assert values['imganom_request_latency_seconds_bucket{le="0.025"}'] == "2"
    assert values['imganom_batch_size_bucket{le="4"}'] == "1"
    assert values["imganom_queue_depth"] == "4" and values["imganom_inflight_requests"] == "2"
    assert values["imganom_ready"] == "1"
    for name in ("imganom_requests_total", "imganom_batch_size", "imganom_ready"):
        assert f"# TYPE {name} " in text and f"# HELP {name} " in text


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("reason", "status", "code"),
    [
        ("too many pixels: 5000x5000 > 1000000", 413, "image_too_large"),
        ("PIL DecompressionBombError: huge", 413, "image_too_large"),
        ("has 5 channels, model expects 1", 422, "unsupported_channels"),
        ("is a volume with 12 slices", 422, "unsupported_volume"),
        ("not a supported image", 400, "bad_image"),
    ],
)
def test_read_errors_map_to_statuses(reason: str, status: int, code: str) -> None:
    e = classify_read_error(ImageReadError("upload.png", reason))
    assert (e.status, e.code) == (status, code) and "upload.png" in e.message


def test_error_body_and_busy() -> None:
    r = error_response(418, "teapot", "short and stout", {"X-A": "1"})
    assert r.status_code == 418 and r.body == b'{"error":{"code":"teapot","message":"short and stout"}}'
    assert r.headers["x-a"] == "1"
    b = busy("queue full")
    assert (b.status, b.code, b.headers) == (503, "overloaded", {"Retry-After": "1"})


# ------------------------------------------------------------------------------------------- uploads


def _request(body: bytes, headers: dict[str, str], chunk: int = 7) -> Request:
    """A real starlette Request whose body arrives in ``chunk``-byte messages."""
    parts = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    messages = [
        {"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)
    ]

    async def receive() -> dict:
        return messages.pop(0)

    scope = {"type": "http", "method": "POST", "path": "/v1/inspect", "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}  # fmt: skip
    return Request(scope, receive)


def _multipart(field: str, filename: str, ctype: str, data: bytes) -> tuple[bytes, dict[str, str]]:
    b = "XyZ"
    body = (f'--{b}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            f"Content-Type: {ctype}\r\n\r\n").encode() + data + f"\r\n--{b}--\r\n".encode()  # fmt: skip
    return body, {"content-type": f"multipart/form-data; boundary={b}"}


def _api_error(coro) -> ApiError:
    with pytest.raises(ApiError) as e:
        asyncio.run(coro)
    return e.value


def test_media_type() -> None:
    assert media_type("Image/PNG; q=1") == "image/png" and media_type(None) == ""


def test_read_body_limits() -> None:
    body = b"x" * 100
    assert asyncio.run(read_body(_request(body, {"content-length": "100"}), 100)) == body
    e = _api_error(read_body(_request(body, {"content-length": "100"}), 99))
    assert (e.status, e.code) == (413, "body_too_large") and "100 bytes" in e.message
    e = _api_error(read_body(_request(body, {}), 50))  # no declared length: the stream is cut off
    assert (e.status, e.code) == (413, "body_too_large")
    e = _api_error(read_body(_request(body, {"content-length": "ten"}), 1000))
    assert (e.status, e.code) == (400, "bad_request")


def test_extract_image_raw_and_multipart() -> None:
    raw = _request(b"png-bytes", {"content-type": "image/png"})
    assert asyncio.run(extract_image(raw, b"png-bytes")) == (b"png-bytes", "upload.png")
    body, headers = _multipart("file", "../../etc/part.tif", "image/tiff", b"tiff-bytes")
    req = _request(body, headers)
    assert asyncio.run(extract_image(req, body)) == (b"tiff-bytes", "part.tif")  # no folders from clients


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("text/plain", 415, "unsupported_media_type"),
        ("empty", 400, "empty_body"),
        ("wrong field", 400, "missing_file"),
        ("pdf part", 415, "unsupported_media_type"),
        ("broken multipart", 400, "bad_multipart"),
        ("no closing boundary", 400, "bad_multipart"),
        ("no boundary", 400, "bad_multipart"),
    ],
)
def test_extract_image_refusals(case: str, status: int, code: str) -> None:
    if case == "text/plain":
        body, headers = b"hello", {"content-type": "text/plain"}
    elif case == "empty":
        body, headers = b"", {"content-type": "image/png"}
    elif case == "wrong field":
        body, headers = _multipart("image", "a.png", "image/png", b"x")
    elif case == "pdf part":
        body, headers = _multipart("file", "a.pdf", "application/pdf", b"x")
    elif case == "no closing boundary":
        body, headers = _multipart("file", "a.png", "image/png", b"x")
        body = body[: -len(b"--XyZ--\r\n")]
    elif case == "no boundary":
        body, headers = _multipart("file", "a.png", "image/png", b"x")
        headers = {"content-type": "multipart/form-data"}
    else:
        body, headers = b"--nope\r\n garbage", {"content-type": "multipart/form-data; boundary=XyZ"}
    e = _api_error(extract_image(_request(body, headers), body))
    assert (e.status, e.code) == (status, code)
    if case == "no closing boundary":
        assert "truncated" in e.message and "'--XyZ--'" in e.message


def test_boundary_of() -> None:
    assert boundary_of('multipart/form-data; charset=utf-8; Boundary="a b"') == b"a b"
    assert boundary_of("multipart/form-data") is None and boundary_of(None) is None


def test_memory_budget_refuses_beyond_its_limit_and_gives_back() -> None:
    budget = MemoryBudget(100)
    with budget.held() as take:
        take(60)
        with budget.held() as other:
            with pytest.raises(ApiError) as e:
                other(50)
            assert (e.value.status, e.value.code) == (503, "overloaded") and budget.used == 60
            other(40)
        assert budget.used == 60
    assert budget.used == 0
    with pytest.raises(ApiError), budget.held() as take:  # given back when the request fails, too
        take(30)
        take(80)
    assert budget.used == 0
    body = b"x" * 101  # the body counts as it arrives
    with budget.held() as take:
        assert _api_error(read_body(_request(body, {}), 1000, take)).status == 503


def test_without_paths_and_loopback() -> None:
    meta = {"data": "/home/op/line3/train", "win": "D:\\scans\\good", "unc": "\\\\nas\\share\\x",
            "home": "~/parts", "name": "tiny", "rel": "runs/a", "list": ["/a/b", 1, None]}  # fmt: skip
    assert without_paths(meta) == {"data": "train", "win": "good", "unc": "x", "home": "parts",
                                   "name": "tiny", "rel": "runs/a", "list": ["b", 1, None]}  # fmt: skip
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.9.9.9", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.10", "example.com", ""))
