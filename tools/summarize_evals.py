"""Mean and spread of ``imganom evaluate`` results over runs (e.g. seeds): one markdown table.

    python tools/summarize_evals.py runs/mt-s0/eval/metrics.json runs/mt-s1/eval/metrics.json ...
    python tools/summarize_evals.py --label "imganom industrial-gray" runs/mt-s*/eval/metrics.json

Rows: image AUROC / AP / F1-max, pixel AUROC, AUPRO@0.3, the calibrated-threshold figures (FPR, TPR, Dice),
per-defect-type image AUROC / pixel AUROC / AUPRO, and throughput; ``mean ± std (min-max)`` over the files
(sample std; a metric that is null in some file is reported over the others, with the count).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

ROWS = [
    ("image AUROC", ("image", "auroc")),
    ("image AP", ("image", "ap")),
    ("image F1-max", ("image", "f1_max")),
    ("pixel AUROC", ("pixel", "auroc")),
    ("AUPRO@0.3", ("pixel", "aupro_0.3")),
    ("pixel F1-max", ("pixel", "f1_max")),
    ("FPR at calibrated threshold", ("image", "fpr_at_threshold")),
    ("TPR at calibrated threshold", ("image", "tpr_at_threshold")),
    ("Dice at calibrated pixel threshold", ("pixel", "dice_at_threshold")),
    ("throughput (img/s, evaluate)", ("throughput_img_s",)),
]
TYPE_ROWS = (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro_0.3", "AUPRO"))


def _get(d: dict[str, Any], path: tuple[str, ...]) -> float | None:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return float(d) if isinstance(d, (int, float)) else None


def _fmt(vals: list[float | None], n: int) -> str:
    v = [x for x in vals if x is not None]
    if not v:
        return "–"
    m = statistics.fmean(v)
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    s = f"{m:.3f} ± {sd:.3f} ({min(v):.3f}–{max(v):.3f})" if len(v) > 1 else f"{m:.3f}"
    return s + (f" [{len(v)}/{n}]" if len(v) < n else "")


def summarize(files: list[Path], label: str) -> str:
    """The markdown table for these metrics.json files."""
    ms = [json.loads(Path(f).read_text()) for f in files]
    n = len(ms)
    lines = [f"| {label} (n={n}) | mean ± std (min–max) |", "|---|---|"]
    for name, path in ROWS:
        lines.append(f"| {name} | {_fmt([_get(m, path) for m in ms], n)} |")
    types = sorted({t for m in ms for t in (m.get("per_type") or {})})
    for t in types:
        for key, short in TYPE_ROWS:
            lines.append(f"| {t}: {short} | {_fmt([_get(m, ('per_type', t, key)) for m in ms], n)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--label", default="metric")
    args = ap.parse_args()
    print(summarize(args.files, args.label))


if __name__ == "__main__":
    main()
