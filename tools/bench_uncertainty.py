"""What Monte-Carlo uncertainty costs and what it buys, and the latent-density score, on an MVTec-layout set.

For each K in ``--samples`` (1 = off): images/s of ``Inspector.predict_arrays`` over the decoded test images
(decoding excluded; batch ``--batch-size``), and, for K >= 2, the verdict error rate per confidence bin
(``evaluation.trust.confidence_metrics``): is the error rate among high-confidence verdicts lower than among
low-confidence ones? Also checks that the scores do not depend on K (the map and score always come from the
posterior mean). The confidence depends on the threshold, the spread does not: the same analysis is also
reported at the test set's F1-max threshold (an oracle threshold, for analysis only: at the calibrated 1 %
false-reject threshold most errors are confident misses). With a model lacking latent statistics,
``--fit-latents N`` fits them on N training normals into a temporary copy, then reports the AUROC of the
latent distance, the combined score and the reconstruction score (``evaluation.trust.latent_metrics``).

    python tools/bench_uncertainty.py --model RUN/model.safetensors --data DATASET --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from imganom.data.discovery import find_images, scan_mvtec  # noqa: E402
from imganom.data.readers import read_image, read_options  # noqa: E402
from imganom.evaluation.trust import confidence_metrics, latent_metrics  # noqa: E402
from imganom.formats.modelfile import load_model, update_calibration  # noqa: E402
from imganom.inference.inspector import Inspector  # noqa: E402
from imganom.ops.latent import fit_latent_stats, has_latent_stats  # noqa: E402
from imganom.ops.uncertainty import verdict_confidence  # noqa: E402


def f1_max_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The test scores' threshold (``score > t`` = NG) with the highest F1."""
    best, best_t = -1.0, float(scores.max())
    for t in np.unique(scores):
        pred = scores > t
        tp = float((pred & (labels == 1)).sum())
        f1 = 2 * tp / max(pred.sum() + (labels == 1).sum(), 1)
        if f1 > best:
            best, best_t = f1, float(t)
    return best_t


def decode(insp: Inspector, paths: list[Path]) -> list[tuple[str, np.ndarray, None]]:
    kw = read_options(insp.cfg.preprocess)
    return [(str(p), read_image(p, **kw)[0], None) for p in paths]


def run(insp: Inspector, items: list, batch: int) -> tuple[list, float]:
    t0 = time.perf_counter()
    out = []
    for i in range(0, len(items), batch):
        out += insp.predict_arrays(items[i : i + batch])
    return out, len(items) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="MVTec-layout root (test/, train/good)")
    ap.add_argument("--samples", default="1,4,8,16")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--fit-latents", type=int, default=200, help="training normals for latent stats")
    ap.add_argument("--limit", type=int, default=0, help="test images (0 = all)")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.manual_seed(0)
    model = Path(a.model)
    tmp = Path(tempfile.mkdtemp(prefix="bench_unc_"))
    try:
        insp = Inspector.load(model, device="cpu")
        if not has_latent_stats(insp.stats) and a.fit_latents:
            train = sorted(find_images(Path(a.data) / "train" / "good"))
            train = train[:: max(1, len(train) // a.fit_latents)][: a.fit_latents]
            lat = [r.latent for r in run(insp, decode(insp, train), a.batch_size)[0]]
            copy = tmp / "model.safetensors"
            shutil.copy(model, copy)
            _, meta, _ = load_model(copy)
            update_calibration(copy, meta.calibration, fit_latent_stats(np.stack(lat)))
            insp = Inspector.load(copy, device="cpu")
        test = scan_mvtec(a.data).test
        test = test[:: max(1, len(test) // a.limit)] if a.limit else test
        items = decode(insp, [t.path for t in test])
        labels = np.array([t.label for t in test])
        report: dict = {"model": str(model), "n_test": len(items), "threads": torch.get_num_threads(),
                        "image_threshold": insp.image_threshold, "by_samples": {}}  # fmt: skip
        base = None
        for k in (int(s) for s in a.samples.split(",")):
            res, ips = run(insp.with_options(uncertainty=k), items, a.batch_size)
            scores = np.array([r.score for r in res])
            base = scores if base is None else base
            row = {"img_s": ips, "scores_equal_to_k1": bool(np.array_equal(scores, base))}
            row["confidence"] = confidence_metrics(scores, labels, [r.confidence for r in res],
                                                   insp.image_threshold)  # fmt: skip
            if k >= 2:
                thr = f1_max_threshold(scores, labels)
                conf = [verdict_confidence(r.score, thr, r.score_spread) for r in res]
                row["f1_threshold"] = thr
                row["confidence_at_f1_threshold"] = confidence_metrics(scores, labels, conf, thr)
                row["spread"] = {"median": float(np.median([r.score_spread for r in res])),
                                 "p90": float(np.percentile([r.score_spread for r in res], 90))}  # fmt: skip
            report["by_samples"][k] = row
            print(k, json.dumps(row), flush=True)
            if k == 1:
                report["latent"] = latent_metrics(insp.stats, insp.meta.calibration, scores, labels,
                                                  [r.latent for r in res])  # fmt: skip
                print("latent", json.dumps(report["latent"]), flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(report, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
