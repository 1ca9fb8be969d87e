"""``imganom serve`` against hostile clients: a real server on 127.0.0.1 (the demo model, a bearer token,
a 2 s read deadline, 8 inspection slots) and real sockets. Slow clients neither starve others nor stay
connected; the token guards everything but the health probes; docs are off; /v1/model shows no paths; a
truncated multipart body says so; a decompression bomb is refused from its header without the server's peak
memory moving; bad models and exposed binds without a token are refused with exit 2."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from helpers import PACKAGE
from image_files import png_zeros, tiff_planes_claim
from safetensors import safe_open
from safetensors.torch import save_file
from serve_process import ENV, Server, free_port

pytestmark = pytest.mark.timeout(180)
MODEL = PACKAGE / "assets" / "demo.safetensors"
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
READ_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("serve_hostile") / "server.log"
    srv = Server(MODEL, log, "--token", TOKEN, "--read-timeout-s", str(READ_TIMEOUT_S), "--max-queue", "4",
                 "--max-batch", "4", "--max-wait-ms", "5")  # fmt: skip
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.kill()


@pytest.fixture(scope="module")
def png() -> bytes:
    img = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)
    return cv2.imencode(".png", img)[1].tobytes()


def _post(url: str, data: bytes, headers: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
    h = {"Content-Type": "image/png", **AUTH, **(headers or {})}
    return httpx.post(url + "/v1/inspect", content=data, headers=h, timeout=30, **kw)


def _vm(pid: int, key: str) -> int:
    """A ``/proc/PID/status`` memory line (VmRSS, VmHWM) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


# ------------------------------------------------------------------------------------------- slow clients


class SlowClient(threading.Thread):
    """Sends ``head`` and then one byte every ``every`` s (slowloris) until the server answers or closes;
    records when that happened and what it said."""

    def __init__(self, port: int, head: bytes, every: float = 0.5, give_up: float = 15.0):
        super().__init__(daemon=True)
        self.port, self.head, self.every, self.give_up = port, head, every, give_up
        self.closed_after: float | None = None
        self.reply = b""

    def run(self) -> None:
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", self.port)) as s:
            s.settimeout(self.every)
            try:
                s.sendall(self.head)
                while time.monotonic() - t0 < self.give_up:
                    try:
                        chunk = s.recv(65536)
                    except TimeoutError:
                        s.sendall(b"x")  # one more byte, never the whole request
                        continue
                    self.reply += chunk
                    if not chunk:
                        break
            except OSError:  # reset by the server while we were still sending
                pass
            self.closed_after = time.monotonic() - t0


def test_slow_clients_do_not_starve_others_and_are_closed(server: Server, png: bytes) -> None:
    body_head = (f"POST /v1/inspect HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                 "Content-Type: image/png\r\nContent-Length: 100000\r\n\r\n").encode()  # fmt: skip
    slow = [SlowClient(server.port, body_head) for _ in range(12)]  # more than the 8 inspection slots
    slow += [SlowClient(server.port, b"POST /v1/inspect HTTP/1.1\r\nHost: x\r\nX-Slow: ") for _ in range(12)]
    slow += [SlowClient(server.port, b"") for _ in range(4)]  # connect and never send a byte
    kept = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "
    slow += [SlowClient(server.port, kept) for _ in range(2)]  # the next request on a kept-alive connection
    for c in slow:
        c.start()
    time.sleep(0.5)  # all of them connected and trickling
    t0 = time.monotonic()
    for _ in range(8):  # normal requests meanwhile: served at once
        r = _post(server.url, png)
        assert r.status_code == 200, r.text
    assert time.monotonic() - t0 < READ_TIMEOUT_S, "normal requests waited behind the slow clients"
    for c in slow:
        c.join(20)
    for c in slow:  # each closed by the read deadline, with a 408 saying why
        assert c.closed_after is not None and c.closed_after < READ_TIMEOUT_S + 2.5, c.closed_after
        first = b"HTTP/1.1 200" if c.head.startswith(b"GET") else b"HTTP/1.1 408"
        assert c.reply.startswith(first) and b"HTTP/1.1 408" in c.reply, c.reply[:300]
        assert b"request_timeout" in c.reply
    assert _post(server.url, png).status_code == 200


# ------------------------------------------------------------------------------------------- access


def test_token_guards_all_but_health_and_docs_are_off(server: Server, png: bytes) -> None:
    url = server.url
    assert httpx.get(url + "/healthz").status_code == 200 and httpx.get(url + "/readyz").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = httpx.post(url + "/v1/inspect", content=png, headers={"Content-Type": "image/png", **headers})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert r.headers["www-authenticate"].startswith("Bearer")
    for path in ("/metrics", "/v1/model", "/docs"):
        assert httpx.get(url + path).status_code == 401
    assert _post(url, png, {"Authorization": f"bearer {TOKEN}"}).status_code == 200  # scheme: any case
    for path in ("/docs", "/redoc", "/openapi.json"):  # off unless --docs
        assert httpx.get(url + path, headers=AUTH).status_code == 404
    assert httpx.get(url + "/metrics", headers=AUTH).status_code == 200


def test_model_info_shows_no_absolute_paths(server: Server) -> None:
    with safe_open(str(MODEL), framework="pt") as f:
        trained_on = json.loads(f.metadata()["imganom"])["training"]["data"]
    assert trained_on.startswith("/")  # the demo model records where it was trained
    info = httpx.get(server.url + "/v1/model", headers=AUTH).json()

    def strings(x: Any) -> Iterator[str]:
        if isinstance(x, str):
            yield x
        elif isinstance(x, dict):
            for v in x.values():
                yield from strings(v)
        elif isinstance(x, list):
            for v in x:
                yield from strings(v)

    assert not [s for s in strings(info) if s.startswith(("/", "~", "\\\\")) or s[1:3] in (":\\", ":/")]
    assert info["training"]["data"] == Path(trained_on).name


def test_truncated_multipart_body_says_so(server: Server, png: bytes) -> None:
    head = (b'--B0UND\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")  # fmt: skip
    whole = head + png + b"\r\n--B0UND--\r\n"
    ctype = {"Content-Type": "multipart/form-data; boundary=B0UND"}
    assert _post(server.url, whole, ctype).status_code == 200
    for cut in (head + png, head + png[:100], whole[: len(whole) - 5]):
        r = _post(server.url, cut, ctype)
        err = r.json()["error"]
        assert (r.status_code, err["code"]) == (400, "bad_multipart") and "truncated" in err["message"], err


# ------------------------------------------------------------------------------------------- memory


@pytest.mark.parametrize("kind", ["png", "tiff"])
def test_bombs_are_refused_from_their_header_with_flat_memory(server: Server, png: bytes, kind: str) -> None:
    """A 164 KB PNG claiming 13000 x 13000 (169 MB decoded, 676 MB as float32), a zlib TIFF claiming 16
    float64 planes of 4096 x 4096 (2 GiB): 413 from the header, and the server's peak RSS (VmHWM, reset just
    before) grows by less than 32 MiB over three such uploads."""
    bomb = png_zeros(13000, 13000) if kind == "png" else tiff_planes_claim(16, 4096)
    side = "13000x13000" if kind == "png" else "4096x4096"
    assert len(bomb) < 200_000
    pid = server.proc.pid
    assert _post(server.url, png).status_code == 200  # warm: the first request's own allocations
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    peak0 = _vm(pid, "VmHWM")
    assert peak0 <= _vm(pid, "VmRSS") + (1 << 20)
    for _ in range(3):
        r = _post(server.url, bomb, {"Content-Type": f"image/{kind}"})
        err = r.json()["error"]
        assert (r.status_code, err["code"]) == (413, "image_too_large"), err
        assert side in err["message"] and "max_bytes=67108864" in err["message"]
    grown = _vm(pid, "VmHWM") - peak0
    assert grown < 32 << 20, f"peak RSS grew by {grown >> 20} MiB"


# ------------------------------------------------------------------------------------------- refusals


def test_cli_refuses_exposed_binds_without_a_token_and_invalid_models(tmp_path: Path) -> None:
    """Each refusal exits 2 with a message before serving (a subprocess with a timeout: no stray server)."""

    def serve(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "imganom.cli", "serve", "--port", str(free_port()), *args]
        return subprocess.run(cmd, capture_output=True, text=True, env={**ENV, "COLUMNS": "200"}, timeout=120)

    for host in ("0.0.0.0", "::"):
        r = serve("--model", str(MODEL), "--host", host)
        assert r.returncode == 2 and "IMGANOM_TOKEN" in r.stderr and "--token" in r.stderr, r.stderr
    r = serve("--model", str(MODEL), "--token", " ")
    assert r.returncode == 2 and "empty" in r.stderr, r.stderr

    with safe_open(str(MODEL), framework="pt") as f:  # a model whose threshold is NaN: no verdicts from it
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["imganom"])
    meta["calibration"]["image_threshold"] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(tensors, str(bad), metadata={"imganom": json.dumps(meta)})
    r = serve("--model", str(bad))
    assert r.returncode == 2 and "image_threshold: must be finite" in r.stderr, r.stderr
    r = serve("--model", str(MODEL), "--image-threshold", "nan")
    assert r.returncode == 2 and "--image-threshold must be a finite number" in r.stderr, r.stderr
