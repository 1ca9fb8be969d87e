"""``workflows.inspect``: one row per input in input order (unreadable files included), outputs on disk,
``--resume`` skipping what is done, and the batch-then-one-by-one retry. Uses the shipped demo model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from imganom.inference.inspector import Inspector
from imganom.workflows.demo import WEIGHTS
from imganom.workflows.inspect import Decoder, list_items, predict_decoded, run_inspect, threaded_batches


@pytest.fixture(scope="module")
def insp() -> Inspector:
    return Inspector.load(WEIGHTS, device="cpu")


def _images(folder: Path, names: list[str], seed: int = 0) -> list[Path]:
    """Grey 64 px textures (PNG); a name ending in ``.bad.png`` gets bytes no reader accepts."""
    rng = np.random.default_rng(seed)
    paths = []
    for name in names:
        p = folder / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".bad.png"):
            p.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
        else:
            img = (128 + 20 * rng.standard_normal((64, 64))).clip(0, 255).astype(np.uint8)
            cv2.imwrite(str(p), img)
        paths.append(p)
    return paths


def _jsonl(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("workers", "decode"), [(0, "processes"), (2, "processes"), (2, "threads")])
def test_one_row_per_input_in_input_order(insp: Inspector, tmp_path: Path, workers: int, decode: str) -> None:
    names = ["c.png", "a.png", "b.bad.png", "sub/d.png", "e.png"]
    _images(tmp_path / "in", names)
    out = tmp_path / "out"
    rows, summary = run_inspect(insp, [tmp_path / "in"], out, batch_size=2, workers=workers, report=False,
                                decode=decode)  # fmt: skip
    order = [it.id for it in list_items([tmp_path / "in"])]
    assert sorted(order) == sorted(names) and len(order) == 5
    assert [r["id"] for r in rows] == order
    assert [r["id"] for r in _jsonl(out)] == order
    with open(out / "results.csv", newline="") as fh:
        assert [r["id"] for r in csv.DictReader(fh)] == order
    bad = next(r for r in rows if r["id"] == "b.bad.png")
    assert bad["status"] == "error" and "b.bad.png" in bad["error"] and bad["score"] is None
    ok = [r for r in rows if r["id"] != "b.bad.png"]
    assert all(r["status"] == "ok" and r["verdict"] in ("OK", "NG") for r in ok)
    for r in ok:  # every output named in the row is on disk, masks at the original size
        assert set(r["outputs"]) == {"mask", "heatmap", "overlay", "preview"}
        assert all((out / rel).is_file() for rel in r["outputs"].values())
        assert cv2.imread(str(out / r["outputs"]["mask"]), cv2.IMREAD_GRAYSCALE).shape == (64, 64)
    c = summary["counts"]
    assert (c["total"], c["error"], c["ok"] + c["ng"], c["resumed"]) == (5, 1, 4, 0)
    assert json.loads((out / "summary.json").read_text())["counts"] == c
    assert summary["model"]["precision"] == "fp32"
    assert not (out / "report.html").exists()


def test_results_match_the_inspector(insp: Inspector, tmp_path: Path) -> None:
    paths = _images(tmp_path / "in", ["a.png", "b.png", "c.png"], seed=1)
    rows, _ = run_inspect(insp, paths, tmp_path / "out", batch_size=3, workers=0, report=False)
    for row, ref in zip(rows, insp.predict(paths)):  # the same device batch: the same numbers
        assert row["score"] == ref.score and row["verdict"] == ref.verdict
        assert row["n_regions"] == len(ref.regions)


def test_resume_skips_done_ids(insp: Inspector, tmp_path: Path) -> None:
    folder, out = tmp_path / "in", tmp_path / "out"
    _images(folder, ["a.png", "b.png"])
    first, _ = run_inspect(insp, [folder], out, workers=0, report=False)
    _images(folder, ["c.png"], seed=5)
    seen = []
    rows, summary = run_inspect(insp, [folder], out, workers=0, resume=True, report=True,
                                on_progress=lambda st: seen.append((st.done, st.skipped)))  # fmt: skip
    assert [r["id"] for r in rows] == ["a.png", "b.png", "c.png"]
    assert rows[:2] == first  # the earlier rows are kept as they were, not inspected again
    assert seen == [(3, 2)]  # one new image processed after the two skipped ones
    assert summary["counts"]["resumed"] == 2 and summary["counts"]["total"] == 3
    assert "c.png" in (out / "report.html").read_text()


def test_a_failing_batch_is_retried_one_by_one(insp: Inspector, tmp_path: Path) -> None:
    paths = _images(tmp_path / "in", ["a.png", "b.png", "c.png"], seed=2)
    items = list_items(paths)
    dec = Decoder(items, insp)
    decoded = [dec[i] for i in range(3)]
    decoded[1]["chw"] = np.full_like(decoded[1]["chw"], np.nan)  # fails inspection, alone too
    results = predict_decoded(insp, list(zip(items, decoded)))
    assert results[1] is None and "inspection failed" in decoded[1]["error"]
    for k in (0, 2):  # retried alone: the same numbers as a batch of one
        assert decoded[k]["error"] is None and results[k].score == insp.predict(paths[k]).score
    # an outcome the caller already has is used as is: no second run of the batch
    stale = [results[0], results[2]]
    clean = [(items[k], dec[k]) for k in (0, 2)]
    assert predict_decoded(insp, clean, batch=stale) == stale


def test_decoder_never_raises(insp: Inspector, tmp_path: Path) -> None:
    (p,) = _images(tmp_path, ["x.bad.png"])
    d = Decoder(list_items([p]), insp)[0]
    assert d["chw"] is None and d["error"] and str(p.name) in d["error"]
    missing = Decoder(list_items([tmp_path / "x.bad.png"]), insp)
    (tmp_path / "x.bad.png").unlink()
    assert missing[0]["error"] is not None


def test_threaded_batches_keep_order_and_give_every_item_once(insp: Inspector, tmp_path: Path) -> None:
    names = [f"{k:02d}.bad.png" if k % 7 == 3 else f"{k:02d}.png" for k in range(23)]
    items = list_items(_images(tmp_path, names, seed=3))
    dec = Decoder(items, insp)
    batches = list(threaded_batches(dec, batch_size=4, workers=3))
    assert [len(b) for b in batches] == [4] * 5 + [3]
    flat = [d for b in batches for d in b]
    assert [d["i"] for d in flat] == list(range(23))
    for d, want in zip(flat, (dec[i] for i in range(23))):  # the same arrays as decoding in the caller
        assert (d["error"] is None) == (want["error"] is None)
        assert d["chw"] is None or np.array_equal(d["chw"], want["chw"])
    assert sum(d["error"] is not None for d in flat) == 3
    it = threaded_batches(dec, batch_size=4, workers=2)
    assert len(next(it)) == 4
    it.close()  # stopped early: the pool is shut down, queued decodes cancelled (no hang, no thread left)
    import threading

    assert not [t for t in threading.enumerate() if t.name.startswith("imganom-decode")]


def test_unknown_decode_mode(insp: Inspector, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="decode must be"):
        run_inspect(insp, [tmp_path], tmp_path / "out", decode="fibers")


def test_cli_decode_option(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from imganom.cli.main import app

    _images(tmp_path / "in", ["a.png", "b.bad.png", "c.png"])
    base = ["inspect", "-m", str(WEIGHTS), "--input", str(tmp_path / "in"), "--device", "cpu", "--no-report"]
    for mode in ("processes", "threads"):
        r = CliRunner().invoke(app, [*base, "-o", str(tmp_path / mode), "--decode", mode, "--workers", "2"])
        assert r.exit_code == 0, r.output
        assert [row["status"] for row in _jsonl(tmp_path / mode)] == ["ok", "error", "ok"]
    r = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "x"), "--decode", "fibers"])
    assert r.exit_code == 2 and "--decode must be" in r.output
