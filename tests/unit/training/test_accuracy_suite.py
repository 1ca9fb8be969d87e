"""tools/accuracy_suite.py: mean ± std per (dataset, config) over seeds, one markdown table."""

from __future__ import annotations

import importlib.util

from helpers import ROOT

spec = importlib.util.spec_from_file_location("accuracy_suite", ROOT / "tools" / "accuracy_suite.py")
suite = importlib.util.module_from_spec(spec)
spec.loader.exec_module(suite)


def _rec(ds: str, cfg: str, seed: int, img: float, secs: float, check: float | None = 0.9) -> dict:
    return {
        "dataset": ds, "config": cfg, "seed": seed, "train_seconds": secs,
        "image": {"auroc": img, "fpr_at_threshold": 0.01, "tpr_at_threshold": None},
        "pixel": {"auroc": 0.8, "aupro_0.3": 0.7},
        "self_check": {"image_auroc": check, "pixel_auroc": 0.5, "aupro": 0.25},
    }  # fmt: skip


def test_summary_rows_are_mean_and_std_over_seeds() -> None:
    recs = [
        _rec("a", "default", 0, 0.8, 100),
        _rec("a", "default", 1, 0.9, 120),
        _rec("b", "tiny", 0, 0.7, 9),
    ]
    rows = suite.summarize(recs)
    assert [(r["dataset"], r["config"], r["n"]) for r in rows] == [("a", "default", 2), ("b", "tiny", 1)]
    assert rows[0]["image AUROC"] == "0.850 ± 0.071" and rows[0]["train s"] == "110 ± 14"
    assert rows[1]["image AUROC"] == "0.700" and rows[0]["TPR@thr"] == "n/a"
    assert rows[0]["self-check img/pix/AUPRO"] == "0.900 / 0.500 / 0.250"
    lines = suite.table(rows).splitlines()
    assert lines[0].startswith("| dataset | config | n | image AUROC") and len(lines) == 4
    assert lines[2].count("|") == lines[0].count("|")


def test_synthetic_families_are_written_once(tmp_path) -> None:
    first = suite.make_synthetic(tmp_path, 32, 4, 2)
    assert [d.name for d in first] == [f"{n}-32" for n in suite.SYNTHETIC]
    stamp = {p: p.stat().st_mtime_ns for p in first[0].rglob("*.png")}
    again = suite.make_synthetic(tmp_path, 32, 4, 2)
    assert again == first and {p: p.stat().st_mtime_ns for p in first[0].rglob("*.png")} == stamp
    assert len(list((first[1] / "test").rglob("*.png"))) == 4  # 2 good + 2 defective
