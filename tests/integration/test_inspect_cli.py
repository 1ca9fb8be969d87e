"""``imganom inspect`` as a subprocess: one row per input whatever the input, outputs on disk, exit codes,
resume after SIGKILL; ``imganom demo``."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from helpers import cli_env, imganom_cmd

from imganom.inference.inspector import Inspector
from imganom.workflows.demo import WEIGHTS
from imganom.workflows.inspect import run_inspect

COMPARE = ("id", "status", "verdict")


def _read_rows(out: Path) -> tuple[list[dict], list[dict]]:
    with open(out / "results.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    jsonl = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    return csv_rows, jsonl


@pytest.fixture(scope="module")
def mixed(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], list[str]]:
    """A folder of good images, defects and broken files, plus a list file; -> (CLI inputs, expected ids)."""
    base = tmp_path_factory.mktemp("mixed")
    root = base / "mixed"
    goods = sorted((synth_root / "test" / "good").glob("*.png"))
    (root / "good").mkdir(parents=True)
    for p in goods[:3]:
        shutil.copy(p, root / "good" / p.name)
    for sub, src in (("a", goods[3]), ("b", goods[4])):  # the same file name in two folders
        (root / sub).mkdir()
        shutil.copy(src, root / sub / "000.png")
    (root / "defect").mkdir()
    for kind in ("crack", "spot"):
        shutil.copy(synth_root / "test" / kind / "000.png", root / "defect" / f"{kind}.png")
    (root / "empty.png").write_bytes(b"")
    ok, jpg = cv2.imencode(".jpg", cv2.imread(str(goods[5]), cv2.IMREAD_GRAYSCALE))
    assert ok
    (root / "truncated.jpg").write_bytes(jpg.tobytes()[: len(jpg) // 2])
    (root / "notes.png").write_text("this is not an image\n")
    gray = cv2.imread(str(goods[6]), cv2.IMREAD_GRAYSCALE)
    tifffile.imwrite(root / "deep16.tif", gray.astype(np.uint16) * 257)
    (base / "extra").mkdir()
    shutil.copy(synth_root / "test" / "hole" / "000.png", base / "extra" / "hole.png")
    shutil.copy(goods[7], base / "extra" / "good7.png")
    (base / "list.txt").write_text("# listed inputs\nextra/hole.png\n\nextra/good7.png\n")
    expected = [
        "mixed/a/000.png", "mixed/b/000.png", "mixed/deep16.tif", "mixed/defect/crack.png",
        "mixed/defect/spot.png", "mixed/empty.png", "mixed/good/000.png", "mixed/good/001.png",
        "mixed/good/002.png", "mixed/notes.png", "mixed/truncated.jpg", "extra/hole.png", "extra/good7.png",
    ]  # fmt: skip
    return [str(root), str(base / "list.txt")], expected


def test_inspect_mixed_folder(tiny_model: Path, synth_root: Path, mixed, tmp_path: Path) -> None:
    inputs, expected = mixed
    out = tmp_path / "out"
    args = ["inspect", "--model", str(tiny_model), "--out", str(out), "--batch-size", "4", "--fail-on-ng"]
    for i in inputs:
        args += ["--input", i]
    p = subprocess.run(imganom_cmd(*args), capture_output=True, text=True, env=cli_env(), timeout=300)
    assert p.returncode == 3, p.stderr  # --fail-on-ng and there are defects
    assert "Traceback" not in p.stderr

    csv_rows, jsonl = _read_rows(out)
    assert [r["id"] for r in csv_rows] == expected
    assert [r["id"] for r in jsonl] == expected
    by_id = {r["id"]: r for r in jsonl}
    errors = {i: by_id[i]["error"] for i in expected if by_id[i]["status"] == "error"}
    assert set(errors) == {"mixed/empty.png", "mixed/notes.png", "mixed/truncated.jpg"}
    assert "empty file (0 bytes)" in errors["mixed/empty.png"]
    for i, msg in errors.items():
        assert msg.startswith(str(Path(inputs[0]).parent / i)), msg  # the message names the file
        assert by_id[i]["verdict"] is None and by_id[i]["score"] is None and by_id[i]["outputs"] == {}
    assert (
        "cannot decode JPEG image" in errors["mixed/truncated.jpg"]
        and "truncated" in errors["mixed/truncated.jpg"]
    )
    assert "not a PNG image" in errors["mixed/notes.png"]

    ok_rows = [r for r in jsonl if r["status"] == "ok"]
    assert len(ok_rows) == 10
    for r in ok_rows:
        assert r["verdict"] in ("OK", "NG") and np.isfinite(r["score"]) and r["error"] is None
        assert r["size"] == [64, 64] and r["model_id"] == by_id[expected[0]]["model_id"]
        assert ("overlay" in r["outputs"]) == (r["verdict"] == "NG")  # overlays: NG images by default
        for kind in ("mask", "heatmap", "overlay")[: 3 if r["verdict"] == "NG" else 2]:
            f = out / r["outputs"][kind]
            assert f.is_file() and f.stat().st_size > 0, (r["id"], kind)
        mask = cv2.imread(str(out / r["outputs"]["mask"]), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
        assert (mask.max() == 255) == (r["n_regions"] > 0)
    assert by_id["mixed/a/000.png"]["outputs"]["mask"] != by_id["mixed/b/000.png"]["outputs"]["mask"]
    verdicts = {r["id"]: r["verdict"] for r in ok_rows}
    assert verdicts["mixed/defect/crack.png"] == verdicts["extra/hole.png"] == "NG"
    assert (
        verdicts["mixed/good/000.png"] == verdicts["extra/good7.png"] == verdicts["mixed/deep16.tif"] == "OK"
    )
    # the 16-bit TIFF holds the 8-bit PNG's pixels * 257: the same normalised image, the same score
    png_score = (
        Inspector.load(tiny_model, device="cpu").predict(sorted(synth_root.glob("test/good/*.png"))[6]).score
    )
    assert float(csv_rows[2]["score"]) == pytest.approx(png_score, rel=1e-5)
    assert by_id["mixed/deep16.tif"]["score"] == pytest.approx(png_score, rel=1e-5)

    summary = json.loads((out / "summary.json").read_text())
    c = summary["counts"]
    assert c["total"] == len(expected) and c["error"] == 3 and c["resumed"] == 0
    assert c["ok"] == sum(v == "OK" for v in verdicts.values()) and c["ng"] == sum(
        v == "NG" for v in verdicts.values()
    )
    assert c["ok"] + c["ng"] + c["error"] == c["total"]
    assert (out / "report.html").is_file()
    assert f"{c['total']} images: {c['ok']} OK, {c['ng']} NG, 3 errors" in p.stderr


def _wait_for_rows(path: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return path.read_bytes().count(b"\n")
        time.sleep(0.002)
    return -1


def test_inspect_resume_after_sigkill(tiny_model: Path, tmp_path: Path) -> None:
    from imganom.data.synth import make_dataset

    make_dataset(tmp_path / "ds", n_train=0, n_test_good=50, n_test_defect=10, size=128, seed=5)
    folder = tmp_path / "ds" / "test"
    out = tmp_path / "out"
    args = ["inspect", "--model", str(tiny_model), "--input", str(folder), "--out", str(out)]
    args += ["--batch-size", "4", "--workers", "0", "--no-report"]
    proc = subprocess.Popen(
        imganom_cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=cli_env()
    )
    try:
        seen = _wait_for_rows(out / "results.jsonl", 8, proc)
    finally:
        proc.kill()  # SIGKILL: no cleanup, no final rewrite
        _, err = proc.communicate(timeout=60)
    assert seen > 0, f"run ended (rc={proc.returncode}) before it could be killed: {err.decode()[-2000:]}"
    assert proc.returncode == -9
    assert not (out / "results.csv").exists()  # finalize never ran
    kept = [line for line in (out / "results.jsonl").read_text().split("\n")[:-1] if line.strip()]
    assert 8 <= len(kept) < 60

    p = subprocess.run(
        imganom_cmd(*args, "--resume", "--fail-on-ng"),
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=300,
    )
    summary = json.loads((out / "summary.json").read_text())
    assert p.returncode == (3 if summary["counts"]["ng"] else 0), p.stderr
    assert summary["counts"]["total"] == 60 and summary["counts"]["resumed"] == len(kept)
    csv_rows, resumed = _read_rows(out)

    # reference: the same inspection, uninterrupted (in-process, same batch size)
    insp = Inspector.load(tiny_model, device="cpu")
    ref, _ = run_inspect(insp, [folder], tmp_path / "ref", batch_size=4, workers=0, report=False)
    assert len(ref) == len(resumed) == len(csv_rows) == 60
    assert [r["id"] for r in csv_rows] == [r["id"] for r in ref]
    assert [{k: r[k] for k in COMPARE} for r in resumed] == [{k: r[k] for k in COMPARE} for r in ref]
    assert [r["score"] for r in resumed] == pytest.approx([r["score"] for r in ref], rel=1e-5)
    assert sum(r["verdict"] == "NG" for r in ref) >= 5  # the 10 defects are mostly found at 2x downscale
    for r in resumed:  # overlays: NG images by default
        ng = r["verdict"] == "NG"
        assert (out / r["outputs"]["overlay"]).is_file() if ng else "overlay" not in r["outputs"]


@pytest.mark.skipif(not WEIGHTS.is_file(), reason=f"demo weights {WEIGHTS} absent (training them is slow)")
def test_demo_runs_offline(tmp_path: Path) -> None:
    p = subprocess.run(
        imganom_cmd("demo", "--out", str(tmp_path / "demo"), "--no-train"),
        capture_output=True, text=True, env=cli_env(), timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    report = Path(p.stdout.strip().splitlines()[-1])
    assert report.is_file() and report.name == "report.html"
    summary = json.loads((tmp_path / "demo" / "results" / "summary.json").read_text())
    assert summary["counts"]["total"] == 45 and summary["counts"]["error"] == 0
    assert summary["counts"]["ng"] >= 20  # 25 synthetic defects
