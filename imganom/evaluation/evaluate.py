"""``imganom evaluate``: a model on a labelled MVTec-style test split -> ``metrics.json`` and ``report.html``.

One streaming pass: test images and ground-truth masks are decoded in DataLoader workers (inline with
``workers=0``), run through the inspector a batch at a time and folded into ``metrics.EvalAccumulator``; only
one score per image and the few worst cases' small thumbnails are kept, so memory does not grow with the
size of the test set.

Conventions
  * Image metrics use the image score; ``*_at_threshold`` use the inspector's thresholds with
    ``score >= threshold`` = anomalous (metrics.py's convention; the inspector's verdict is ``>``).
  * Pixel metrics pool every pixel of every test image at the ORIGINAL resolution (the inspector's maps are
    already there). Masks are read as 8-bit grayscale, ``> 127`` = defect, and resized nearest-neighbour only
    when their size differs from the image's (reported as a warning). Defect images without a mask count for
    the image metrics only and are listed in ``missing_masks``.
  * Histogram range (PixelMetrics is a fixed-range histogram): chosen once from the first batch, which is
    stratified across defect types so it holds good and defect images:
    ``[min(0, 1.5 * min), max(4 * pixel_threshold, 1.5 * max)]``. Values outside are clipped into the end
    bins (ties); the clipped fractions are recorded under ``pixel.clipped_below/above`` and warned about
    above 0.1 %. A single pass avoids running the model twice.
"""

from __future__ import annotations

import datetime as dt
import io
import math
import time
from collections.abc import Callable, Sequence
from itertools import zip_longest
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
from torch.utils.data import DataLoader, Dataset

from imganom.data.discovery import MVTecItem, MVTecLayout, scan_mvtec
from imganom.data.readers import ImageMeta, ImageReadError, read_image, read_options
from imganom.evaluation.report import write_evaluation_report
from imganom.evaluation.trust import confidence_metrics, latent_metrics
from imganom.evaluation.worst import WorstCases, thumb, write_worst
from imganom.inference.inspector import Result
from imganom.ops.metrics import EvalAccumulator, downsample_curve
from imganom.utils.batching import batch_or_each
from imganom.utils.device import precision_label
from imganom.utils.files import atomic_write_bytes, to_jsonable, write_json_atomic

FPR_LIMIT = 0.3
MASK_LEVEL = 127  # mask pixels > this are defect
HISTOGRAM_RULE = "from the first (stratified) batch: [min(0, 1.5 * min), max(4 * pixel_threshold, 1.5 * max)]"


class Predictor(Protocol):
    """What ``evaluate`` needs from a model: an ``Inspector`` or anything shaped like it."""

    image_threshold: float | None
    pixel_threshold: float | None

    def predict_arrays(
        self, items: list[tuple[str, np.ndarray, ImageMeta | None]], keep_image: bool = False
    ) -> list[Result]: ...


# ------------------------------------------------------------------------------------------- decoding


def read_mask(path: str | Path, shape: tuple[int, int]) -> tuple[np.ndarray | None, str | None]:
    """Ground-truth mask as bool (H, W) at ``shape`` (``> 127`` = defect) and a note when it was resized.

    Returns ``(None, reason)`` for an unreadable mask.
    """
    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if m is None:
        return None, "unreadable mask"
    note = None
    if m.shape != tuple(shape):
        note = f"mask {m.shape[1]}x{m.shape[0]} resized to image size {shape[1]}x{shape[0]}"
        m = cv2.resize(m, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return m > MASK_LEVEL, note


class _Decode(Dataset):
    """Decodes one test image and its mask in a worker; never raises (errors travel as strings)."""

    def __init__(self, items: Sequence[MVTecItem], read_kwargs: dict[str, Any]):
        self.items, self.kw = items, read_kwargs

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        it = self.items[i]
        out: dict[str, Any] = {"i": i, "chw": None, "meta": None, "mask": None, "note": None, "error": None}
        t0 = time.perf_counter()
        try:
            out["chw"], out["meta"] = read_image(it.path, **self.kw)
            if it.mask_path is not None:
                out["mask"], out["note"] = read_mask(it.mask_path, out["chw"].shape[1:])
        except ImageReadError as e:
            out["error"] = str(e)
        except Exception as e:  # noqa: BLE001 - a reader bug must not end the evaluation
            out["error"] = f"{it.path}: unexpected {type(e).__name__}: {e}"
        out["ms"] = (time.perf_counter() - t0) * 1e3
        return out


def _collate(batch: list[dict]) -> list[dict]:
    return batch


def stratified_order(items: Sequence[MVTecItem]) -> list[MVTecItem]:
    """Items interleaved round-robin across defect types (good first), so every batch mixes the classes."""
    groups: dict[str, list[MVTecItem]] = {}
    for it in items:
        groups.setdefault(it.defect_type, []).append(it)
    keys = sorted(groups, key=lambda k: (k != "good", k))
    return [it for row in zip_longest(*(groups[k] for k in keys)) for it in row if it is not None]


def histogram_range(pixel_threshold: float | None, lo_seen: float, hi_seen: float) -> tuple[float, float]:
    """``[min(0, 1.5 * lo_seen), max(4 * pixel_threshold, 1.5 * hi_seen)]``, never empty."""
    lo = min(0.0, 1.5 * lo_seen)
    hi = 1.5 * hi_seen
    if pixel_threshold is not None and math.isfinite(pixel_threshold):
        hi = max(hi, 4.0 * pixel_threshold)
    if not hi > lo:
        hi = lo + 1.0
    return lo, hi


# ------------------------------------------------------------------------------------------- evaluation


def describe_model(insp: Any) -> dict[str, Any]:
    """The ``model`` entry of metrics.json: id, name, size, device, precision, backend, calibrated."""
    cfg = getattr(insp, "cfg", None)
    return {
        "id": getattr(insp, "model_id", None),
        "name": getattr(cfg, "name", None),
        "size": list(cfg.preprocess.size) if cfg is not None else None,
        "device": str(getattr(insp, "device", "cpu")),
        "precision": precision_label(getattr(insp, "amp", None)),
        "backend": getattr(insp, "backend_info", None),
        "calibrated": getattr(insp, "image_threshold", None) is not None,
    }


def _calibration(insp: Any) -> dict | None:
    """The predictor's calibration (an Inspector's model file), if it has one."""
    return getattr(getattr(insp, "meta", None), "calibration", None)


def _read_kwargs(insp: Any) -> dict[str, Any]:
    return read_options(insp.cfg.preprocess)


def _predict(insp: Predictor, batch: list[dict], items: list[MVTecItem]) -> dict[int, Result]:
    """Results by item index; a failing batch is retried image by image (errors recorded on the items)."""
    ok = [b for b in batch if b["error"] is None]
    args = [(items[b["i"]].id, b["chw"], b["meta"]) for b in ok]
    outs = batch_or_each(lambda xs: insp.predict_arrays(xs, keep_image=True), args) if ok else []
    results = {}
    for b, r in zip(ok, outs, strict=True):
        if isinstance(r, Exception):
            b["error"] = f"{items[b['i']].path}: inspection failed: {r}"
        else:
            results[b["i"]] = r
    return results


def _image_curves(scores: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    from sklearn.metrics import precision_recall_curve, roc_curve

    if labels.min(initial=0) == labels.max(initial=0):
        return {"image_roc": None, "image_pr": None}
    fpr, tpr, _ = roc_curve(labels, scores)
    prec, rec, _ = precision_recall_curve(labels, scores)
    x, y = downsample_curve(fpr, tpr)
    r, p = downsample_curve(rec[::-1], prec[::-1])
    return {"image_roc": {"fpr": x, "tpr": y}, "image_pr": {"recall": r, "precision": p}}


def evaluate(
    insp: Predictor,
    root: str | Path | MVTecLayout,
    out: str | Path,
    batch_size: int = 16,
    worst: int = 8,
    *,
    workers: int = 2,
    threshold_source: str = "normal",
    bins: int = 20_000,
    read_kwargs: dict[str, Any] | None = None,
    model_info: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    report: bool = True,
    title: str = "imganom evaluation",
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Evaluate ``insp`` on the test split of an MVTec-style ``root``; writes ``out/metrics.json``,
    ``out/scores.csv``, ``out/worst/*.png`` and (``report=True``) ``out/report.html``; returns the metrics.

    ``read_kwargs`` (for ``read_image``) default to the inspector's preprocessing; ``model_info`` and
    ``extra`` (merged into the top level) let other predictors (e.g. baselines) describe themselves.
    Raises ``ValueError`` for a root without test images, ``RuntimeError`` when no image could be evaluated.
    """
    started = dt.datetime.now(dt.timezone.utc)
    layout = root if isinstance(root, MVTecLayout) else scan_mvtec(root)
    items = stratified_order(layout.test)
    if not items:
        raise ValueError(f"{layout.root}: no test images under test/")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    thr_i, thr_p = insp.image_threshold, insp.pixel_threshold
    workers = min(workers, len(items))
    loader = DataLoader(
        _Decode(items, read_kwargs if read_kwargs is not None else _read_kwargs(insp)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        prefetch_factor=2 if workers else None,
    )
    acc: EvalAccumulator | None = None
    fps, fns = WorstCases(worst), WorstCases(worst)
    rows: list[tuple[str, int, str, float]] = []  # id, label, type, score
    latents, confidences = [], []  # per row: latent mean, verdict confidence (evaluation.trust)
    errors: list[dict[str, str]] = []
    resized, unreadable, empty, missing = [], [], [], set(layout.missing_masks)
    n_with_mask = done = 0
    t0 = time.perf_counter()
    for batch in loader:
        results = _predict(insp, batch, items)
        if acc is None and results:
            lo_seen = min(float(r.anomaly_map.min()) for r in results.values())
            hi_seen = max(float(r.anomaly_map.max()) for r in results.values())
            acc = EvalAccumulator(*histogram_range(thr_p, lo_seen, hi_seen), bins=bins, pixel_threshold=thr_p)
        for b in batch:
            it, r = items[b["i"]], results.get(b["i"])
            done += 1
            if r is None:
                errors.append({"id": it.id, "error": b["error"] or "no result"})
                continue
            gt = b["mask"]
            if it.mask_path is not None and gt is None:
                unreadable.append(it.id)
                missing.add(it.id)
            if b["note"]:
                resized.append(f"{it.id}: {b['note']}")
            if gt is not None and gt.shape != r.anomaly_map.shape:
                gt = (
                    cv2.resize(gt.view(np.uint8), r.anomaly_map.shape[::-1], interpolation=cv2.INTER_NEAREST)
                    > 0
                )
            use_map = it.label == 0 or gt is not None
            assert acc is not None  # set as soon as a batch has results
            try:
                acc.add(r.score, it.label, r.anomaly_map if use_map else None, gt, it.defect_type)
            except ValueError as e:
                errors.append({"id": it.id, "error": f"{it.path}: {e}"})
                continue
            if it.label == 1 and gt is not None:
                n_with_mask += 1
                if not gt.any():
                    empty.append(it.id)
            rows.append((it.id, it.label, it.defect_type, r.score))
            latents.append(r.latent)
            confidences.append(r.confidence)
            flagged = thr_i is not None and r.score >= thr_i
            heap, key = (fps, r.score) if it.label == 0 else (fns, -r.score)
            if heap.wants(key):
                info = {"id": it.id, "defect_type": it.defect_type, "score": r.score, "flagged": flagged}
                heap.push(key, info, thumb(r, gt))
        if on_progress:
            on_progress(done, len(items))
    seconds = time.perf_counter() - t0
    if acc is None or not rows:
        raise RuntimeError(f"no test image could be evaluated ({len(errors)} errors; first: {errors[:1]})")

    scores = np.array([s for *_, s in rows], dtype=np.float64)
    labels = np.array([y for _, y, _, _ in rows], dtype=np.int64)
    res = acc.compute(image_threshold=thr_i, fpr_limit=FPR_LIMIT)
    image, pixel, per_type = res["image"], res["pixel"], res["per_type"]
    reasons = {
        "image": image.pop("reasons"),
        "pixel": pixel.pop("reasons"),
        "per_type": {t: why for t, e in per_type.items() if (why := e.pop("reasons"))},
    }
    curves = {
        "pixel_roc": pixel.pop("roc_curve"),
        "pro": pixel.pop("pro_curve"),
        **_image_curves(scores, labels),
    }
    warnings = list(pixel.pop("warnings"))
    missing_ids = sorted(missing)
    if missing_ids:
        warnings.append(
            f"{len(missing_ids)} defect image(s) have no usable mask; they count for image metrics only"
        )
    if unreadable:
        warnings.append(f"{len(unreadable)} mask(s) could not be read: {', '.join(unreadable[:5])}")
    if resized:
        warnings.append(f"{len(resized)} mask(s) differ in size from their image, resized nearest-neighbour: "
                        + "; ".join(resized[:5]) + (" ..." if len(resized) > 5 else ""))  # fmt: skip
    if empty:
        warnings.append(f"{len(empty)} defect image(s) have an empty mask; their pixels count as normal: "
                        + ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else ""))  # fmt: skip
    if errors:
        warnings.append(f"{len(errors)} test image(s) could not be evaluated and are left out of all metrics")

    worst_out = write_worst(out, {"false_positives": fps, "false_negatives": fns}, thr_p)

    n_good = int((labels == 0).sum())
    metrics: dict[str, Any] = {
        "image": image,
        "pixel": pixel,
        "per_type": per_type,
        "counts": {
            "good": n_good, "anomalous": len(rows) - n_good, "with_mask": n_with_mask,
            "missing_mask": len(missing_ids), "empty_mask": len(empty), "errors": len(errors),
            "total": len(items),
        },
        "threshold": {"image": thr_i, "pixel": thr_p, "source": threshold_source},
        "throughput_img_s": len(items) / seconds if seconds > 0 else None,
        "seconds": seconds,
        "model": model_info if model_info is not None else describe_model(insp),
        "reasons": reasons,
        "warnings": warnings,
        "missing_masks": missing_ids,
        "errors": errors,
        "worst": worst_out,
        "curves": curves,
        "histogram_rule": HISTOGRAM_RULE,
        "latent": latent_metrics(getattr(insp, "stats", {}), _calibration(insp), scores, labels, latents),
        "uncertainty": confidence_metrics(scores, labels, confidences, thr_i),
        "dataset": {"root": str(layout.root), "defect_types": layout.defect_types},
        "settings": {"batch_size": batch_size, "workers": workers, "bins": bins, "fpr_limit": FPR_LIMIT},
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }  # fmt: skip
    metrics = to_jsonable(metrics)
    write_json_atomic(out / "metrics.json", metrics)
    _write_scores(out / "scores.csv", rows, thr_i)
    if report:
        write_evaluation_report(out, metrics, scores, labels, title=title)
    return metrics


def _write_scores(path: Path, rows: list[tuple[str, int, str, float]], thr: float | None) -> None:
    import csv

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "label", "defect_type", "score", "flagged"])
    for item_id, y, t, s in rows:
        w.writerow([item_id, y, t, repr(float(s)), "" if thr is None else int(s >= thr)])
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))
