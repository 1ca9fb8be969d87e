"""Bounded load + fault test of ``imganom serve`` on this machine (loopback only).

Starts ``imganom serve`` itself (``--model M``, or a tiny synthetic model it trains in a temp dir when no
model is given), or uses a running server via ``--url`` (127.0.0.1 / ::1 / localhost only; ``--pid`` adds
RSS).
For each concurrency level it sends up to ``--requests`` requests (and for at most ``--seconds``): synthetic
valid PNGs plus a fraction of bad ones (garbage, truncated PNG, a PNG header claiming 100000x100000,
text/plain, empty body). Checks: no bad input gets a 5xx (a clean 503 for overload is allowed), every
valid request gets 200 or a clean 503 (JSON error + Retry-After), nothing fails at the transport level, the
server's RSS stays bounded, and a self-started server exits 0 on SIGTERM. Exit status 0 when all pass.

    python tools/load_test.py --requests 100 --json load.json
    python tools/load_test.py --url http://127.0.0.1:8000 --pid 1234 --levels 1,8
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shlex
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import cv2
import httpx
import numpy as np

BAD_KINDS = ("garbage", "truncated", "huge_header", "wrong_type", "empty")
EXPECTED = {"garbage": 400, "truncated": 400, "huge_header": 413, "wrong_type": 415, "empty": 400}


@dataclass
class Level:
    concurrency: int
    requests: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    p50_ms: float = float("nan")
    p95_ms: float = float("nan")
    p99_ms: float = float("nan")
    codes: dict[str, int] = field(default_factory=dict)
    avg_batch: float = float("nan")
    rss_mb: float | None = None
    failures: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- payloads


def _png_header(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def make_payloads(
    size: int, n_valid: int = 8, seed: int = 0
) -> tuple[list[bytes], dict[str, tuple[bytes, str]]]:
    """Valid synthetic PNGs (half with a defect) and one payload (bytes, content type) per bad kind."""
    from imganom.data.synth import add_defect, normal_image

    rng = np.random.default_rng(seed)
    valid = []
    for i in range(n_valid):
        img = normal_image(rng, size, "grain")
        if i % 2:
            img = add_defect(img, rng, "scratch")[0]
        valid.append(cv2.imencode(".png", np.round(img[..., 0] * 255).astype(np.uint8))[1].tobytes())
    bad = {
        "garbage": (rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "application/octet-stream"),
        "truncated": (valid[0][: len(valid[0]) // 2], "image/png"),
        "huge_header": (_png_header(100_000, 100_000), "image/png"),
        "wrong_type": (valid[0], "text/plain"),
        "empty": (b"", "image/png"),
    }
    return valid, bad


# ------------------------------------------------------------------------------------------- server


def check_loopback(url: str) -> str:
    """The URL without a trailing slash; raises ValueError unless it is http on a loopback host."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme != "http" or not parts.port:
        raise ValueError(f"--url must look like http://127.0.0.1:PORT, got {url!r}")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"refusing to load-test non-loopback host {host!r}: only 127.0.0.1, ::1, localhost")
    return url.rstrip("/")


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def tiny_model(workdir: Path) -> Path:
    """Train and calibrate the 64 px test model (a few seconds on a CPU)."""
    from imganom.config import load_config
    from imganom.data.synth import make_dataset
    from imganom.formats.modelfile import update_calibration
    from imganom.inference.inspector import Inspector
    from imganom.training.trainer import train
    from imganom.workflows.calibrate import calibrate

    make_dataset(workdir / "data", n_train=40, n_test_good=6, n_test_defect=10, size=64, seed=0)
    res = train(
        load_config("tiny", {"train": {"epochs": 3}}), workdir / "data", workdir / "run", progress=False
    )
    insp = Inspector.load(res.model_path)
    cal, stats = calibrate(insp, res.val_paths)
    update_calibration(res.model_path, cal, stats)
    return Path(res.model_path)


def start_server(model: Path, extra: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "imganom.cli",
           "serve", "--model", str(model), "--port", str(port), *extra]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    t_end = time.monotonic() + 120
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server not ready within 120 s:\n{log.read_text()}")


def scrape(client: httpx.Client, url: str) -> dict[str, float]:
    out = {}
    for line in client.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


# ------------------------------------------------------------------------------------------- load


def run_level(client: httpx.Client, url: str, conc: int, n: int, seconds: float, valid: list[bytes],
              bad: dict[str, tuple[bytes, str]], bad_every: int, pid: int | None) -> Level:  # fmt: skip
    """``conc`` threads send until ``n`` requests or ``seconds`` are used up; each ``bad_every``-th is bad."""
    lv = Level(conc)
    lock, counter, lat, codes = threading.Lock(), [0], [], Counter()
    t0 = time.perf_counter()
    before = scrape(client, url)

    def worker() -> None:
        while True:
            with lock:
                i = counter[0]
                if i >= n or time.perf_counter() - t0 > seconds:
                    return
                counter[0] += 1
            kind = (
                BAD_KINDS[(i // bad_every) % len(BAD_KINDS)] if bad_every and i % bad_every == 0 else "valid"
            )
            data, ctype = bad[kind] if kind != "valid" else (valid[i % len(valid)], "image/png")
            ts = time.perf_counter()
            try:
                r = client.post(url + "/v1/inspect", content=data, headers={"Content-Type": ctype})
            except httpx.HTTPError as e:
                with lock:
                    codes["transport"] += 1
                    lv.failures.append(f"{kind}: {type(e).__name__}: {e}")
                continue
            dt = (time.perf_counter() - ts) * 1e3
            problem = _judge(kind, r)
            with lock:
                codes[str(r.status_code)] += 1
                if kind == "valid" and r.status_code == 200:
                    lat.append(dt)
                if problem:
                    lv.failures.append(problem)

    with ThreadPoolExecutor(conc) as pool:
        for f in [pool.submit(worker) for _ in range(conc)]:
            f.result()
    lv.seconds = time.perf_counter() - t0
    lv.requests = sum(codes.values())
    lv.rps = lv.requests / lv.seconds if lv.seconds else 0.0
    if lat:
        lv.p50_ms, lv.p95_ms, lv.p99_ms = (float(v) for v in np.percentile(lat, [50, 95, 99]))
    lv.codes = dict(sorted(codes.items()))
    after = scrape(client, url)
    nb = after["imganom_batch_size_count"] - before["imganom_batch_size_count"]
    lv.avg_batch = (
        (after["imganom_batch_size_sum"] - before["imganom_batch_size_sum"]) / nb if nb else float("nan")
    )
    lv.rss_mb = rss_mb(pid)
    return lv


def _judge(kind: str, r: httpx.Response) -> str | None:
    """None if the response is acceptable for this kind of request, else a one-line reason."""
    if r.status_code == 503:
        try:
            clean = r.json()["error"]["code"] == "overloaded" and r.headers.get("retry-after") == "1"
        except (ValueError, KeyError, TypeError):
            clean = False
        return None if clean else f"{kind}: unclean 503: {r.text[:200]}"
    if kind == "valid":
        return None if r.status_code == 200 else f"valid: HTTP {r.status_code}: {r.text[:200]}"
    if r.status_code >= 500:
        return f"{kind}: HTTP {r.status_code} for bad input: {r.text[:200]}"
    if r.status_code != EXPECTED[kind]:
        return f"{kind}: expected HTTP {EXPECTED[kind]}, got {r.status_code}: {r.text[:200]}"
    return None


def _fmt_table(levels: list[Level]) -> str:
    cols = ("conc", 4), ("reqs", 5), ("req/s", 7), ("p50 ms", 8), ("p95 ms", 8), ("p99 ms", 8), ("batch", 5)
    head = " ".join(f"{name:>{w}}" for name, w in cols) + f" {'RSS MB':>7}  codes"
    rows = [head, "-" * len(head)]
    for lv in levels:
        rss = f"{lv.rss_mb:7.0f}" if lv.rss_mb is not None else f"{'n/a':>7}"
        codes = " ".join(f"{k}:{v}" for k, v in lv.codes.items())
        rows.append(f"{lv.concurrency:>4} {lv.requests:>5} {lv.rps:7.1f} {lv.p50_ms:8.1f} {lv.p95_ms:8.1f} "
                    f"{lv.p99_ms:8.1f} {lv.avg_batch:5.1f} {rss}  {codes}")  # fmt: skip
    return "\n".join(rows)


def _mb(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f} MB"


def _finite(x: object) -> object:
    """NaN -> None, recursively (strict JSON)."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, help="model file to serve (default: train a tiny synthetic one)")
    src.add_argument("--url", help="an already running server on loopback, e.g. http://127.0.0.1:8000")
    p.add_argument("--pid", type=int, help="with --url: the server's pid, for RSS")
    p.add_argument("--levels", default="1,8,32", help="comma-separated concurrency levels")
    p.add_argument("--requests", type=int, default=200, help="requests per level")
    p.add_argument("--seconds", type=float, default=30.0, help="time limit per level")
    p.add_argument("--bad-every", type=int, default=5, help="every N-th request is a bad one (0: none)")
    p.add_argument("--image-size", type=int, default=128, help="side of the valid synthetic images")
    p.add_argument("--serve-args", default="", help="extra arguments for imganom serve (quoted)")
    p.add_argument("--max-rss-growth-mb", type=float, default=300.0, help="allowed RSS growth over the run")
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args(argv)
    try:
        levels = [int(x) for x in a.levels.split(",") if x.strip()]
        if not levels or min(levels) < 1 or a.requests < 1 or a.seconds <= 0:
            raise ValueError("--levels, --requests and --seconds must be positive")
        url = check_loopback(a.url) if a.url else None
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    proc, pid, tmp = None, a.pid, tempfile.TemporaryDirectory(prefix="imganom-load-")
    try:
        if url is None:
            model = a.model
            if model is None:
                print("training a tiny synthetic model ...", flush=True)
                model = tiny_model(Path(tmp.name))
            proc, url = start_server(model, shlex.split(a.serve_args), Path(tmp.name) / "server.log")
            pid = proc.pid
        valid, bad = make_payloads(a.image_size)
        limits = httpx.Limits(max_connections=max(levels) + 4, max_keepalive_connections=max(levels) + 4)
        with httpx.Client(timeout=60, limits=limits) as client:
            info = client.get(url + "/v1/model").json()
            client.post(url + "/v1/inspect", content=valid[0], headers={"Content-Type": "image/png"})  # warm
            rss0 = rss_mb(pid)
            results = []
            for c in levels:
                results.append(run_level(client, url, c, a.requests, a.seconds, valid, bad, a.bad_every, pid))
                print(f"  concurrency {c}: {results[-1].requests} requests in {results[-1].seconds:.1f}s",
                      flush=True)  # fmt: skip
        checks = {"no_failures": not any(lv.failures for lv in results)}
        rss1 = results[-1].rss_mb
        if rss0 is not None and rss1 is not None:
            checks["rss_bounded"] = rss1 - rss0 <= a.max_rss_growth_mb
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                checks["sigterm_exit_0"] = proc.wait(30) == 0
            except subprocess.TimeoutExpired:
                checks["sigterm_exit_0"] = False
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        tmp.cleanup()

    print(f"\nimganom serve load test: model {info['id']} ({info['name']}, {info['device']}), "
          f"{a.image_size} px valid images, every {a.bad_every}th request bad")  # fmt: skip
    print(_fmt_table(results))
    print(f"server RSS before: {_mb(rss0)}, after: {_mb(rss1)}")
    for lv in results:
        for f in lv.failures[:5]:
            print(f"  FAIL c={lv.concurrency}: {f}")
    ok = all(checks.values())
    print("checks: " + ", ".join(f"{k}={'PASS' if v else 'FAIL'}" for k, v in checks.items()))
    if a.json:
        out = {"model": {k: info.get(k) for k in ("id", "name", "device")}, "image_size": a.image_size,
               "bad_every": a.bad_every, "rss_before_mb": rss0, "levels": [asdict(lv) for lv in results],
               "checks": checks, "ok": ok}  # fmt: skip
        a.json.write_text(json.dumps(_finite(out), indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
