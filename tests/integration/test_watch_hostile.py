"""``imganom watch`` against hostile names and writers, on real folders: a file name that is not UTF-8, a
different file under a used name with the same size and mtime (``cp -p``), the same bytes dropped again, and a
writer that pauses mid-file longer than ``--settle-s``. Nothing is lost, deleted or failed too early."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import PACKAGE, cli_env, imganom_cmd

from imganom.inference.inspector import Inspector
from imganom.workflows.watch import FolderWatcher, WatchOptions

MODEL = PACKAGE / "assets" / "demo.safetensors"


@pytest.fixture(scope="module")
def insp() -> Inspector:
    return Inspector.load(MODEL, device="cpu")


def _image(seed: int, ext: str = ".png") -> bytes:
    img = (np.random.default_rng(seed).random((64, 64)) * 255).astype(np.uint8)
    return cv2.imencode(ext, img)[1].tobytes()


def _rows(out: Path) -> list[dict]:
    p = out / "results.jsonl"
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()] if p.exists() else []


def _names(d: Path) -> list[bytes]:
    return sorted(os.listdir(os.fsencode(d))) if d.exists() else []


def test_non_utf8_name_gets_its_row_and_keeps_its_bytes(tmp_path: Path) -> None:
    in_dir, out = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    (in_dir / "good.png").write_bytes(_image(0))
    with open(os.fsencode(in_dir) + b"/bad\xff\xfe.png", "wb") as fh:
        fh.write(_image(1))
    cmd = imganom_cmd("watch", str(in_dir), "--model", str(MODEL), "--out", str(out), "--once",
                      "--settle-s", "0.1", "--poll-s", "0.05", "--no-report")  # fmt: skip
    for _ in range(2):  # the second start finds nothing to do: no crash loop
        r = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
    rows = _rows(out)
    assert sorted(row["id"] for row in rows) == ["bad\\xff\\xfe.png", "good.png"]
    assert all(row["status"] == "ok" for row in rows)
    assert _names(in_dir) == [] and _names(out / "done") == [b"bad\xff\xfe.png", b"good.png"]  # bytes kept
    assert (out / "results.csv").read_text(encoding="utf-8").count("\n") == 3


def test_other_bytes_under_a_used_name_size_and_mtime_are_inspected(insp: Inspector, tmp_path: Path) -> None:
    in_dir, out = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    opts = WatchOptions(poll_s=0.05, settle_s=0.1, retry_s=0.3, once=True, report=False)
    first, second = _image(2, ".bmp"), _image(3, ".bmp")
    assert len(first) == len(second) and first != second  # BMP: same size for the same shape
    target, stamp = in_dir / "a.bmp", (1_700_000_000_000_000_000, 1_700_000_000_000_000_000)

    def drop(data: bytes) -> None:  # what `cp -p` / `rsync -t` give: same name, size and mtime
        target.write_bytes(data)
        os.utime(target, ns=stamp)

    drop(first)
    assert FolderWatcher(insp, in_dir, out, opts).run().rows == 1
    drop(second)
    st = FolderWatcher(insp, in_dir, out, opts).run()
    assert (st.rows, st.recovered) == (1, 0)
    rows = _rows(out)
    assert [r["id"] for r in rows] == ["a.bmp", "a.bmp~2"]
    assert rows[0]["source"]["sha256"] != rows[1]["source"]["sha256"]
    assert rows[0]["outputs"]["mask"] != rows[1]["outputs"]["mask"]
    assert (out / "done" / "a.bmp").read_bytes() == first
    assert (out / "done" / "a~2.bmp").read_bytes() == second

    drop(first)  # the very same bytes again: already inspected, so no new row, and the input is kept
    st = FolderWatcher(insp, in_dir, out, opts).run()
    assert (st.rows, st.recovered, st.files) == (0, 1, 1)
    assert len(_rows(out)) == 2 and not target.exists()
    assert (out / "done" / "a~3.bmp").read_bytes() == first


def test_writer_pausing_mid_file_is_retried_until_complete(insp: Inspector, tmp_path: Path) -> None:
    in_dir, out = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    data = _image(4)
    slow = in_dir / "slow.png"
    slow.write_bytes(data[: len(data) // 2])  # the writer stalls here for longer than settle-s
    (in_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 30)  # stays broken
    opts = WatchOptions(poll_s=0.05, settle_s=0.2, retry_s=4.0, once=True, report=False)
    w = FolderWatcher(insp, in_dir, out, opts)
    t0 = time.monotonic()
    runner = threading.Thread(target=w.run)
    runner.start()
    time.sleep(2.0)  # ten times settle-s: the half file looks stable, cannot be decoded, and is retried
    assert _rows(out) == [] and _names(out / "error") == []
    with open(slow, "ab") as fh:
        fh.write(data[len(data) // 2 :])
    runner.join(60)
    assert not runner.is_alive()
    by_id = {r["id"]: r for r in _rows(out)}
    assert by_id["slow.png"]["status"] == "ok" and (out / "done" / "slow.png").read_bytes() == data
    assert by_id["broken.png"]["status"] == "error"
    assert _names(out / "error") == [b"broken.png", b"broken.png.error.txt"]
    assert time.monotonic() - t0 >= 4.0  # failed only once unchanged for retry-s
    assert _names(in_dir) == []
