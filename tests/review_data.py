"""A small ``inspect``-style results folder (real output files) and a review app subprocess, for the review
tests."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from serve_process import _WITH_PARENT, ENV, free_port

from imganom.reporting.writers import OutputOptions, write_item_outputs

THRESHOLD = 0.5


def make_results(out: Path, n: int = 8, size: int = 48, seed: int = 0) -> list[dict]:
    """``n`` results (scores spread over [0.05, 1.2], NG above ``THRESHOLD``) plus one error row; writes
    outputs, results.jsonl and summary.json. Returns the rows."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, score in enumerate(np.linspace(1.2, 0.05, n)):
        item = f"lot{i % 2}/img{i:03d}.png"
        preview = rng.integers(60, 120, (size, size, 3), dtype=np.uint8)
        yy, xx = np.mgrid[:size, :size]
        amap = (score * np.exp(-((yy - size / 2) ** 2 + (xx - size / 3) ** 2) / (0.02 * size * size))).astype(
            np.float32
        )
        verdict = "NG" if score > THRESHOLD else "OK"
        mask = amap > 0.3 if verdict == "NG" else np.zeros_like(amap, bool)
        outputs = write_item_outputs(out, item, preview, amap, mask, threshold=0.3, vmax=1.0,
                                     score=float(score), verdict=verdict,
                                     options=OutputOptions(overlays="all"))  # fmt: skip
        rows.append({"id": item, "path": f"/data/{item}", "status": "ok", "verdict": verdict,
                     "score": float(score), "norm_score": float(1 / (1 + np.exp(-(score - THRESHOLD) / 0.2))),
                     "n_regions": int(mask.any()), "max_region_area": int(mask.sum()), "regions": [],
                     "outputs": outputs, "model_id": "sha256:test", "error": None})  # fmt: skip
    rows.append({"id": "broken.png", "path": "/data/broken.png", "status": "error", "verdict": None,
                 "score": None, "norm_score": None, "n_regions": None, "max_region_area": None, "regions": [],
                 "outputs": {}, "model_id": "sha256:test", "error": "cannot decode"})  # fmt: skip
    write_rows(out, rows)
    return rows


def write_rows(out: Path, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    summary = {"counts": {"total": len(rows)}, "thresholds": {"image": THRESHOLD, "pixel": 0.3},
               "model": {"id": "sha256:test", "name": "tiny"}}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary), encoding="utf-8")


class ReviewServer:
    """``imganom review RESULTS_DIR`` in a subprocess (the CLI entry point) on a free port."""

    def __init__(self, results: Path, log: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-c", _WITH_PARENT, "review", str(results), "--port", str(self.port), *args]
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=ENV)

    def wait_ready(self, headers: dict | None = None, timeout: float = 60.0) -> None:
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            if self.proc.poll() is not None:
                pytest.fail(f"review exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                httpx.get(self.url + "/api/info", headers=headers, timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        pytest.fail(f"review app not up after {timeout}s:\n{self.log.read_text()}")

    def stop(self) -> None:
        """SIGTERM (uvicorn's graceful stop: the report is refreshed), then wait."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
