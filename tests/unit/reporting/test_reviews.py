"""Reviewer decision store: append-only, locked, latest-wins, and safe under concurrent writers."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import cv2
import numpy as np
import pytest

from imganom.reporting.reviews import REVIEWS_FILE, ReviewStore, load_decisions, resolve_inside, review_stats


def _writer(results_dir: str, worker: int, n: int) -> None:
    store = ReviewStore(Path(results_dir))
    for i in range(n):
        store.add(f"w{worker}/img{i}.png", "defect" if i % 2 else "normal", reviewer=f"p{worker}",
                  note="x" * (i * 37 % 900))  # lines of different lengths  # fmt: skip


def test_many_processes_appending_lose_nothing(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 60)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = (tmp_path / REVIEWS_FILE).read_text(encoding="utf-8").splitlines()
    assert len(lines) == 240
    recs = [json.loads(line) for line in lines]  # every line whole
    assert {(r["id"], r["reviewer"]) for r in recs} == {(f"w{w}/img{i}.png", f"p{w}") for w in range(4)
                                                         for i in range(60)}  # fmt: skip
    assert len(ReviewStore(tmp_path).latest()) == 240


def test_latest_wins_undo_and_history(tmp_path: Path) -> None:
    s = ReviewStore(tmp_path)
    s.add("a.png", "defect", label="scratch", score=0.9, verdict="NG", model_id="m1")
    s.add("a.png", "normal", note="dust")
    s.add("b.png", "skip")
    assert s.latest()["a.png"]["decision"] == "normal"
    s.add("a.png", "undo")
    assert s.latest()["a.png"]["decision"] == "defect"
    assert s.latest()["a.png"]["label"] == "scratch"
    s.add("b.png", "undo")
    assert "b.png" not in s.latest()
    assert [r["decision"] for r in s.history("a.png")] == ["defect", "normal", "undo"]
    # a second store (another process) sees the same; a killed writer's partial last line is ignored
    with open(tmp_path / REVIEWS_FILE, "ab") as f:
        f.write(b'{"id": "c.png", "decis')
    other = ReviewStore(tmp_path)
    assert set(other.latest()) == {"a.png"}
    with pytest.raises(ValueError, match="decision must be"):
        s.add("a.png", "maybe")


def test_corrected_mask_saved_beside_the_decision(tmp_path: Path) -> None:
    m = np.zeros((8, 8), np.uint8)
    m[2:5, 2:5] = 255
    rec = ReviewStore(tmp_path).add("sub/x.png", "defect", mask_png=cv2.imencode(".png", m)[1].tobytes())
    saved = cv2.imread(str(tmp_path / rec["mask"]), cv2.IMREAD_GRAYSCALE)
    assert rec["mask"].startswith("reviews/masks/") and (saved == m).all()
    with pytest.raises(ValueError, match="not a readable PNG"):
        ReviewStore(tmp_path).add("y.png", "defect", mask_png=b"GIF89a....")
    assert "y.png" not in ReviewStore(tmp_path).latest()


def test_stats_and_loading(tmp_path: Path) -> None:
    rows = [{"id": "a", "verdict": "NG"}, {"id": "b", "verdict": "NG"}, {"id": "c", "verdict": "OK"},
            {"id": "d", "verdict": "OK"}, {"id": "e", "verdict": "NG"}]  # fmt: skip
    s = ReviewStore(tmp_path)
    for i, d in (("a", "defect"), ("b", "normal"), ("c", "normal"), ("d", "defect"), ("e", "skip")):
        s.add(i, d)
    st = review_stats(rows, s.latest())
    assert (st["reviewed"], st["unreviewed"], st["false_alarms"], st["misses"]) == (5, 0, 1, 1)
    assert st["false_reject_rate"] == 0.5 and st["miss_rate"] == 0.5 and st["agreement"] == 0.5
    assert sorted(r["id"] for _, r in load_decisions([tmp_path])) == ["a", "b", "c", "d"]
    with pytest.raises(FileNotFoundError, match="no reviews.jsonl"):
        load_decisions([tmp_path / "nope"])


def test_resolve_inside_refuses_escapes(tmp_path: Path) -> None:
    (tmp_path / "masks").mkdir()
    assert resolve_inside(tmp_path, "masks/a.png") == (tmp_path / "masks/a.png").resolve()
    for bad in ("../x", "masks/../../x", "/etc/passwd"):
        with pytest.raises(ValueError, match="outside"):
            resolve_inside(tmp_path, bad)
