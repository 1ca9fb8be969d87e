"""Trained models with and without scores relative to their nearest normals (``calibration.neighbours``).

    python tools/neighbours_eval.py --data DATA/magnetic_tile --k 0,10 \
        --model runs/suite-mt/runs/magnetic_tile/industrial-gray/s0 --model .../s1 --out runs/nb

For every model and every k: a copy of the model file with ``calibration.neighbours = k``, calibrated as
``imganom train`` calibrates (map statistics kept; the reference from the run's training split, thresholds
from its held-out split; a model already at that k is copied as trained), then ``imganom evaluate``.
Training reads no calibration setting, so this is what training with that k gives. Prints the accuracy
suite's table (mean ± std over the models, per k).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from accuracy_suite import IMAGE_KEYS, summarize, table  # noqa: E402

from imganom.config import load_config  # noqa: E402
from imganom.formats.modelfile import load_model, save_model  # noqa: E402
from imganom.inference import Inspector  # noqa: E402
from imganom.ops.neighbours import KEYS as NEIGHBOUR_KEYS  # noqa: E402
from imganom.training.paths import split_images  # noqa: E402
from imganom.workflows.calibrate import calibrate  # noqa: E402


def with_neighbours(src: Path, dst: Path, data: Path, k: int) -> None:
    """``src`` (model file or run dir) -> ``dst`` scoring relative to ``k`` neighbours, calibrated as
    ``imganom train`` does."""
    src = src / "model.safetensors" if src.is_dir() else src
    model, meta, stats = load_model(src)
    if meta.cfg.calibration.neighbours == k:
        shutil.copy(src, dst)
        return
    stats = {key: v for key, v in stats.items() if key not in NEIGHBOUR_KEYS}
    cfg = load_config(None, {**meta.cfg.model_dump(), "calibration": {**meta.cfg.calibration.model_dump(),
                                                                        "neighbours": k}})  # fmt: skip
    save_model(dst, model, cfg, training=meta.training, calibration=meta.calibration, stats=stats)
    (tr, _), (va, _) = split_images(cfg, data)
    cal, new = calibrate(Inspector.load(dst, device="cpu"), va, stats_paths=tr, keep_stats=True, latents=True)
    save_model(dst, model, cfg, training=meta.training, calibration=cal, stats={**stats, **new})


def evaluate(model: Path, data: Path, out: Path) -> dict:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "imganom.cli", "evaluate", "--model", str(model), "--data", str(data),
           "--out", str(out), "--no-report"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        raise RuntimeError(f"evaluate failed for {model}:\n{p.stderr[-3000:]}")
    return json.loads((out / "metrics.json").read_text())


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, action="append", required=True, help="model file or run dir")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--k", default="0,10", help="comma-separated neighbour counts (0 = raw score)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    records = []
    for i, src in enumerate(a.model):
        for k in (int(x) for x in a.k.split(",")):
            run = a.out / f"m{i}-k{k}"
            run.mkdir(parents=True, exist_ok=True)
            dst = run / "model.safetensors"
            with_neighbours(src, dst, a.data, k)
            m = evaluate(dst, a.data, run / "eval")
            rec = {"dataset": a.data.name, "config": f"{load_model(dst)[1].cfg.name}, neighbours {k}",
                   "model": str(src), "image": {key: m["image"].get(key) for key in IMAGE_KEYS},
                   "pixel": {key: m["pixel"].get(key) for key in ("auroc", "aupro_0.3", "f1_max",
                                                                   "dice_at_threshold")},
                   "per_type": m.get("per_type", {})}  # fmt: skip
            print(json.dumps({"model": str(src), "k": k, **rec["image"]}), flush=True)
            records.append(rec)
    rows = summarize(records)
    print(table(rows))
    if a.json:
        a.json.write_text(json.dumps({"records": records, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
