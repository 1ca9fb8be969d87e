"""Train and evaluate presets on labelled MVTec-layout datasets over several seeds: one accuracy table.

Each (dataset, config, seed) runs ``imganom train`` then ``imganom evaluate`` (the CLI, exactly as a user
would) into ``--out``; finished runs (an ``eval/metrics.json``) are reused unless ``--force``. Prints one
markdown table, mean ± std over seeds per dataset, config and metric (image AUROC, pixel AUROC, AUPRO@0.3,
FPR/TPR at the calibrated threshold, the self-check on synthetic defects, training seconds); ``--json``
writes it with every run's numbers.

    python tools/accuracy_suite.py --synthetic --data ../shared/datasets/magnetic_tile \\
        --configs default,industrial-gray --seeds 0,1,2 --out runs/suite --json suite.json

``--synthetic`` adds the synthetic families (``imganom.data.synth.make_dataset``, written once under
``OUT/data``): gray grain, RGB weave and a gray mix of textures (a multi-modal normal class).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SYNTHETIC = {
    "synth-grain": {"texture": "grain", "channels": 1},
    "synth-weave-rgb": {"texture": "weave", "channels": 3},
    "synth-mixed": {"texture": "mixed", "channels": 1},
}
IMAGE_KEYS = ("auroc", "ap", "f1_max", "fpr_at_threshold", "tpr_at_threshold")
COLUMNS = [  # (header, path in the run record)
    ("image AUROC", ("image", "auroc")),
    ("pixel AUROC", ("pixel", "auroc")),
    ("AUPRO@0.3", ("pixel", "aupro_0.3")),
    ("FPR@thr", ("image", "fpr_at_threshold")),
    ("TPR@thr", ("image", "tpr_at_threshold")),
    ("self-check img/pix/AUPRO", ("self_check",)),
    ("train s", ("train_seconds",)),
]


def make_synthetic(root: Path, size: int, n_train: int, n_test: int) -> list[Path]:
    """The synthetic datasets under ``root`` (written once; same arguments, same files)."""
    from imganom.data.synth import make_dataset

    out = []
    for name, kw in SYNTHETIC.items():
        d = root / f"{name}-{size}"
        if not (d / "test").is_dir():
            make_dataset(
                d, n_train=n_train, n_test_good=n_test, n_test_defect=n_test, size=size, seed=0, **kw
            )
        out.append(d)
    return out


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "imganom.cli", *args]


def run_one(data: Path, config: str, seed: int, out: Path, epochs: int | None, force: bool) -> dict[str, Any]:
    """Train + evaluate one run (or reuse a finished one); returns its record."""
    metrics = out / "eval" / "metrics.json"
    record = out / "suite.json"
    if metrics.is_file() and record.is_file() and not force:
        return json.loads(record.read_text())
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "NO_COLOR": "1", "COLUMNS": "200"}
    train = ["train", "--data", str(data), "--config", config, "--seed", str(seed), "--out", str(out)]
    if epochs:
        train += ["--epochs", str(epochs)]
    t0 = time.perf_counter()
    p = subprocess.run(_cli(*train), capture_output=True, text=True, env=env)
    secs = time.perf_counter() - t0
    if p.returncode:
        raise RuntimeError(f"train failed ({data.name}, {config}, seed {seed}):\n{p.stderr[-3000:]}")
    ev = ["evaluate", "--model", str(out), "--data", str(data), "--out", str(out / "eval"), "--no-report"]
    p = subprocess.run(_cli(*ev), capture_output=True, text=True, env=env)
    if p.returncode:
        raise RuntimeError(f"evaluate failed ({data.name}, {config}, seed {seed}):\n{p.stderr[-3000:]}")
    from imganom.formats.modelfile import read_meta

    m = json.loads(metrics.read_text())
    training = read_meta(out).training
    sc = training.get("self_check") or {}
    rec = {
        "dataset": data.name, "config": config, "seed": seed, "train_seconds": round(secs, 1),
        "image": {k: m["image"].get(k) for k in IMAGE_KEYS},
        "pixel": {k: m["pixel"].get(k) for k in ("auroc", "aupro_0.3", "f1_max", "dice_at_threshold")},
        "per_type": m.get("per_type", {}),
        "epochs": training.get("epochs"), "kept_epoch": training.get("best_epoch"),
        "self_check": {k: sc.get(k) for k in ("image_auroc", "pixel_auroc", "aupro")},
        "map_auto": (training.get("map_auto") or {}).get("chosen"),
        "auto_config": training.get("auto_config"),
    }  # fmt: skip
    record.write_text(json.dumps(rec, indent=1))
    return rec


def _get(rec: dict[str, Any], path: tuple[str, ...]) -> Any:
    for k in path:
        rec = rec.get(k) if isinstance(rec, dict) else None
    return rec


def _mean_std(vals: list[float]) -> str:
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.3f}" if abs(vals[0]) < 10 else f"{vals[0]:.0f}"
    m, s = statistics.mean(vals), statistics.stdev(vals)
    return f"{m:.3f} ± {s:.3f}" if abs(m) < 10 else f"{m:.0f} ± {s:.0f}"


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, config): ``{"dataset", "config", "n", header: "mean ± std", ...}``."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["config"]), []).append(r)
    rows = []
    for (ds, cfg), recs in groups.items():
        row: dict[str, Any] = {"dataset": ds, "config": cfg, "n": len(recs)}
        for head, path in COLUMNS:
            if path == ("self_check",):
                parts = [
                    [_get(r, ("self_check", k)) for r in recs]
                    for k in ("image_auroc", "pixel_auroc", "aupro")
                ]
                row[head] = " / ".join(
                    _mean_std([v for v in p if v is not None]).split(" ±")[0] for p in parts
                )
            else:
                row[head] = _mean_std([v for v in (_get(r, path) for r in recs) if v is not None])
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    heads = ["dataset", "config", "n", *(h for h, _ in COLUMNS)]
    lines = ["| " + " | ".join(heads) + " |", "|---|---|---:|" + "---:|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[h]) for h in heads) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", action="append", type=Path, default=[], help="MVTec-layout root (repeatable)")
    ap.add_argument("--synthetic", action="store_true", help="add the synthetic families")
    ap.add_argument("--synthetic-size", type=int, default=128)
    ap.add_argument("--synthetic-n", type=int, nargs=2, default=(120, 30), metavar=("TRAIN", "TEST"),
                    help="normal training images; test images per class (good, defective)")  # fmt: skip
    ap.add_argument("--configs", default="default", help="comma-separated presets or YAML paths")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=None, help="override every config's epochs")
    ap.add_argument("--out", type=Path, default=Path("runs/suite"))
    ap.add_argument("--force", action="store_true", help="rerun finished runs")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    datasets = [d for d in a.data if d.is_dir()]
    for d in a.data:
        if not d.is_dir():
            print(f"skipping {d}: not found", file=sys.stderr)
    if a.synthetic:
        datasets += make_synthetic(a.out / "data", a.synthetic_size, *a.synthetic_n)
    if not datasets:
        ap.error("no datasets: give --data and/or --synthetic")
    configs = [c for c in a.configs.split(",") if c]
    seeds = [int(s) for s in a.seeds.split(",") if s]
    records = []
    for d in datasets:
        for cfg in configs:
            for s in seeds:
                tag = Path(cfg).stem
                rec = run_one(d, cfg, s, a.out / "runs" / d.name / tag / f"s{s}", a.epochs, a.force)
                records.append(rec)
                img, pix = rec["image"]["auroc"], rec["pixel"]
                msg = f"image {img:.3f} pixel {pix['auroc']:.3f} AUPRO {pix['aupro_0.3']:.3f}"
                print(f"{d.name} {tag} seed {s}: {msg} ({rec['train_seconds']:.0f} s)", file=sys.stderr)
    rows = summarize(records)
    print(table(rows))
    result = {"rows": rows, "runs": records, "epochs": a.epochs}
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
