"""``imganom inspect`` against hostile names and faults, as a subprocess on real files: file names that are
not UTF-8 or that sanitise alike each get their row and their own output files (``--resume`` still works);
``--out`` inside ``--input`` is not inspected on a second run; ``kill -9`` leaves no decode worker behind."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import PACKAGE, cli_env, imganom_cmd
from PIL import Image

MODEL = PACKAGE / "assets" / "demo.safetensors"
# name bytes -> the id its row must carry: not UTF-8, and pairs that a plain sanitiser maps to one name
NAMES = {
    b"bad\xff\xfe.png": "bad\\xff\\xfe.png",
    b"a.b.png": "a.b.png",
    b"a_b.png": "a_b.png",
    b"x<.png": "x<.png",
    b"x>.png": "x>.png",
    b"n\nl.png": "n\nl.png",
    b"n\tl.png": "n\tl.png",
    b"good.png": "good.png",
}


def _inspect(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = imganom_cmd("inspect", "--model", str(MODEL), "--no-report", *args)
    return subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=timeout)


def _pngs(folder: Path, names: list[bytes], side: int = 64) -> None:
    """One PNG of random pixels per name (so a file overwritten by another's result would show)."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        img = (np.random.default_rng(k).random((side, side)) * 255).astype(np.uint8)
        Image.fromarray(img).save(os.fsencode(folder) + b"/" + name, format="PNG")


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]


def test_non_utf8_and_look_alike_names_each_get_a_row_and_their_own_files(tmp_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    _pngs(src, list(NAMES))  # random pixels: each image differs from all others
    r = _inspect("--input", str(src), "--out", str(out), "--workers", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = _rows(out)
    assert sorted(row["id"] for row in rows) == sorted(NAMES.values())
    assert all(row["status"] == "ok" and row["verdict"] in ("OK", "NG") for row in rows), rows
    with open(out / "results.csv", encoding="utf-8", newline="") as fh:  # valid UTF-8, one line per input
        assert sorted(line["id"] for line in csv.DictReader(fh)) == sorted(NAMES.values())
    assert {row["path"] for row in rows} >= {str(src / "a.b.png"), f"{src}/bad\\xff\\xfe.png"}
    for kind in ("mask", "heatmap", "overlay", "preview"):  # overlays may be written for NG images only
        paths = [row["outputs"][kind] for row in rows if kind in row["outputs"]]
        assert len(set(paths)) == len(paths) and len(paths) >= (0 if kind == "overlay" else len(NAMES)), paths
        assert all((out / p).is_file() and (out / p).resolve().is_relative_to(out.resolve()) for p in paths)
    by_id = {row["id"]: row for row in rows}
    assert by_id["a.b.png"]["outputs"]["mask"] == "masks/a.b_png.png"  # unchanged names stay readable
    assert by_id["a_b.png"]["outputs"]["mask"] == "masks/a_b_png.png"
    for name, item_id in NAMES.items():  # each preview shows its own input, not a look-alike's
        own = np.asarray(Image.open(os.fsencode(src) + b"/" + name), dtype=np.float32)
        preview = np.asarray(Image.open(out / by_id[item_id]["outputs"]["preview"]).convert("L"), np.float32)
        assert np.abs(preview - own).mean() < 10

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    r = _inspect("--input", str(src), "--out", str(out), "--resume")
    assert r.returncode == 0 and f"({len(NAMES)} from a previous run)" in r.stdout + r.stderr, r.stderr
    assert sorted(row["id"] for row in _rows(out)) == sorted(NAMES.values())
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before  # nothing inspected twice


@pytest.mark.parametrize("where", ["inside", "same"])
def test_out_inside_input_is_not_inspected_on_a_second_run(tmp_path: Path, where: str) -> None:
    src = tmp_path / "in"
    _pngs(src, [b"p0.png", b"p1.png", b"p2.png"])
    out = src / "results" if where == "inside" else src
    for _ in range(2):
        r = _inspect("--input", str(src), "--out", str(out), "--workers", "0")
        assert r.returncode == 0, r.stdout + r.stderr
        assert sorted(row["id"] for row in _rows(out)) == ["p0.png", "p1.png", "p2.png"]
    assert "under the output folder are not inspected" in r.stderr  # the second run says what it left out


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_kill_9_of_inspect_leaves_no_decode_worker(tmp_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    _pngs(src, [f"{k:03d}.png".encode() for k in range(160)], side=256)
    cmd = imganom_cmd("inspect", "--model", str(MODEL), "--input", str(src), "--out", str(out),
                      "--workers", "1", "--decode", "processes",  # the workers that must not outlive it
                      "--batch-size", "4", "--no-report")  # fmt: skip
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        t_end = time.monotonic() + 120
        while not (out / "results.jsonl").is_file() or len(_rows(out)) < 8:
            assert proc.poll() is None and time.monotonic() < t_end, "inspect ended before the kill"
            time.sleep(0.05)
        workers = _children(proc.pid)
        assert workers, "no decode worker to watch"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert len(_rows(out)) < 160, "the kill came too late to test anything"
        t_end = time.monotonic() + 5  # the workers' parent watch polls every 0.5 s
        while any(_running(w) for w in workers) and time.monotonic() < t_end:
            time.sleep(0.1)
        assert not [w for w in workers if _running(w)], "decode worker(s) outlived a kill -9 of their parent"
    finally:
        if proc.poll() is None:
            proc.kill()
        for w in workers:  # never leave one behind, even when the test fails
            if _running(w):
                os.kill(w, signal.SIGKILL)
