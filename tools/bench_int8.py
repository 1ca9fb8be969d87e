"""Exported graphs against a reference on a labelled MVTec-style test set: verdict changes, relative score
differences and forward img/s measured back to back (docs/BENCHMARKS.md, INT8 weights on OpenVINO).

    python tools/bench_int8.py --data magnetic_tile mt_fp32.xml mt_int8.xml mt_int8all.xml mt.onnx

The first model is the reference. Every model scores every test image (``Inspector.predict_batch``); the
forward pass is ``Inspector.model_maps`` on one batch of smooth random images at the model size, in
``--rounds`` rounds that call every model twice in turn (a change in machine load hits all alike), median.
Accuracy metrics (AUROC, AUPRO) come from ``imganom evaluate``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI sets it

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from imganom.data.discovery import scan_mvtec  # noqa: E402
from imganom.inference import load_inspector  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", type=Path, nargs="+", help="the reference first (.xml, .onnx or .safetensors)")
    ap.add_argument("--data", type=Path, required=True, help="MVTec-style root (its test/ images are scored)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    paths = [it.path for it in scan_mvtec(a.data).test]
    insps = {str(m): load_inspector(m, device="cpu", threads=a.threads) for m in a.models}
    scores = {n: [(r.score, r.verdict) for r in i.predict_batch(paths, batch_size=a.batch)]
              for n, i in insps.items()}  # fmt: skip
    ref_name = str(a.models[0])
    ref = np.array([s for s, _ in scores[ref_name]])
    cfg = next(iter(insps.values())).cfg
    c, (h, w) = cfg.preprocess.channels, cfg.preprocess.size
    x = torch.rand(a.batch, c, max(1, h // 4), max(1, w // 4), generator=torch.Generator().manual_seed(0))
    x = F.interpolate(x, size=(h, w), mode="bilinear")
    for i in insps.values():
        i.model_maps(x)
    times: dict[str, list[float]] = {n: [] for n in insps}
    for _ in range(a.rounds):
        for n, i in insps.items():
            t0 = time.perf_counter()
            i.model_maps(x)
            i.model_maps(x)
            times[n].append(time.perf_counter() - t0)
    rows = []
    for n in insps:
        got = np.array([s for s, _ in scores[n]])
        rel = np.abs(got - ref) / np.maximum(np.abs(ref), 1e-12)
        rows.append({
            "model": n, "ng": sum(v == "NG" for _, v in scores[n]),
            "verdicts_changed": sum(a_[1] != b[1] for a_, b in zip(scores[n], scores[ref_name])),
            "score_rel_diff": {"median": float(np.median(rel)), "p99": float(np.percentile(rel, 99)),
                               "max": float(rel.max())},
            "forward_img_s": 2 * a.batch / statistics.median(times[n]),
            "vs_reference": statistics.median(times[ref_name]) / statistics.median(times[n]),
        })  # fmt: skip
    print(f"{len(paths)} test images, batch {a.batch}, {a.threads} threads, {a.rounds} interleaved rounds, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| model | NG | verdicts changed | score rel. diff median / p99 / max | forward img/s | vs ref. |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        d = r["score_rel_diff"]
        print(f"| {r['model']} | {r['ng']} | {r['verdicts_changed']} / {len(paths)} | {d['median']:.2%} / "
              f"{d['p99']:.2%} / {d['max']:.2%} | {r['forward_img_s']:.1f} | {r['vs_reference']:.2f}x |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
