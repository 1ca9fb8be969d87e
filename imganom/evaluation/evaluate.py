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

import base64
import datetime as dt
import heapq
import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
from torch.utils.data import DataLoader, Dataset

from imganom.data.discovery import MVTecItem, MVTecLayout, scan_mvtec
from imganom.data.readers import ImageMeta, ImageReadError, read_image, read_options, to_uint8_preview
from imganom.inference.inspector import Result
from imganom.ops.metrics import EvalAccumulator, _downsample
from imganom.reporting.writers import encode_png, render_overlay
from imganom.utils.files import atomic_write_bytes, to_jsonable, write_json_atomic

FPR_LIMIT = 0.3
AUPRO_KEY = f"aupro_{FPR_LIMIT:g}"
MASK_LEVEL = 127  # mask pixels > this are defect
OVERLAY_SIDE = 320  # max side of the worst-case overlays
GT_COLOUR = (40, 200, 255)  # ground-truth outline in the overlays (RGB)
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


# ------------------------------------------------------------------------------------------ worst cases


@dataclass
class _Thumb:
    """A worst case shrunk to overlay size when it enters the heap; rendered only if it is still there at
    the end (rendering at full size costs ~0.1 s per 1024 px image)."""

    preview: np.ndarray  # HxWx3 uint8
    amap: np.ndarray  # float32
    mask: np.ndarray  # predicted, bool
    gt: np.ndarray | None  # ground truth, bool
    amax: float  # maximum of the full-resolution map


def _thumb(r: Result, gt: np.ndarray | None) -> _Thumb:
    h, w = r.anomaly_map.shape
    f = min(1.0, OVERLAY_SIDE / max(h, w))
    size = (max(1, round(w * f)), max(1, round(h * f)))

    def shrink(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, dtype=np.float32)
        return a if a.shape == (size[1], size[0]) else cv2.resize(a, size, interpolation=cv2.INTER_AREA)

    if r.image is not None:
        preview = to_uint8_preview(np.stack([shrink(c) for c in r.image[:3]]))
    else:
        preview = np.zeros((size[1], size[0], 3), np.uint8)
    return _Thumb(
        preview, shrink(r.anomaly_map), shrink(r.mask) > 0, None if gt is None else shrink(gt) > 0,
        float(r.anomaly_map.max()),
    )  # fmt: skip


@dataclass(order=True)
class _Case:
    key: float  # heap key: the smallest key is evicted first
    seq: int
    info: dict[str, Any] = field(compare=False)
    thumb: _Thumb = field(compare=False)


class _Worst:
    """The ``k`` cases with the largest ``key``, each with a small thumbnail for its overlay."""

    def __init__(self, k: int):
        self.k, self.heap, self._seq = k, [], 0

    def wants(self, key: float) -> bool:
        return self.k > 0 and (len(self.heap) < self.k or key > self.heap[0].key)

    def push(self, key: float, info: dict[str, Any], thumb: _Thumb) -> None:
        self._seq += 1
        case = _Case(key, self._seq, info, thumb)
        if len(self.heap) < self.k:
            heapq.heappush(self.heap, case)
        else:
            heapq.heapreplace(self.heap, case)

    def sorted(self) -> list[_Case]:
        return sorted(self.heap, reverse=True)


def overlay_png(t: _Thumb, score: float, thr_p: float | None, flagged: bool) -> bytes:
    """The overlay: map blended in, predicted regions outlined (red NG / green OK), ground truth in cyan."""
    thr = thr_p if thr_p is not None else max(t.amax, 1e-6) / 2
    ov = render_overlay(
        t.preview, t.amap, t.mask, threshold=thr, vmax=max(2 * thr, t.amax),
        score=score, verdict="NG" if flagged else "OK",
    )  # fmt: skip
    if t.gt is not None and t.gt.any():
        contours, _ = cv2.findContours(t.gt.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(ov, contours, -1, GT_COLOUR, 1, cv2.LINE_AA)
    return encode_png(ov)


# ------------------------------------------------------------------------------------------- evaluation


def _model_info(insp: Any) -> dict[str, Any]:
    cfg = getattr(insp, "cfg", None)
    amp = getattr(insp, "amp", None)
    return {
        "id": getattr(insp, "model_id", None),
        "name": getattr(cfg, "name", None),
        "size": list(cfg.preprocess.size) if cfg is not None else None,
        "device": str(getattr(insp, "device", "cpu")),
        "precision": str(amp).replace("torch.", "") if amp else "fp32",
        "calibrated": getattr(insp, "image_threshold", None) is not None,
    }


def _read_kwargs(insp: Any) -> dict[str, Any]:
    return read_options(insp.cfg.preprocess)


def _predict(insp: Predictor, batch: list[dict], items: list[MVTecItem]) -> dict[int, Result]:
    """Results by item index; a failing batch is retried image by image (errors recorded on the items)."""
    ok = [b for b in batch if b["error"] is None]
    args = [(items[b["i"]].id, b["chw"], b["meta"]) for b in ok]
    if not ok:
        return {}
    try:
        return {b["i"]: r for b, r in zip(ok, insp.predict_arrays(args, keep_image=True), strict=True)}
    except (RuntimeError, ValueError):
        out = {}
        for b, a in zip(ok, args, strict=True):
            try:
                out[b["i"]] = insp.predict_arrays([a], keep_image=True)[0]
            except (RuntimeError, ValueError) as e:
                b["error"] = f"{items[b['i']].path}: inspection failed: {e}"
        return out


def _image_curves(scores: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    from sklearn.metrics import precision_recall_curve, roc_curve

    if labels.min(initial=0) == labels.max(initial=0):
        return {"image_roc": None, "image_pr": None}
    fpr, tpr, _ = roc_curve(labels, scores)
    prec, rec, _ = precision_recall_curve(labels, scores)
    x, y = _downsample(fpr, tpr)
    r, p = _downsample(rec[::-1], prec[::-1])
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
    fps, fns = _Worst(worst), _Worst(worst)
    rows: list[tuple[str, int, str, float]] = []  # id, label, type, score
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
            flagged = thr_i is not None and r.score >= thr_i
            heap, key = (fps, r.score) if it.label == 0 else (fns, -r.score)
            if heap.wants(key):
                info = {"id": it.id, "defect_type": it.defect_type, "score": r.score, "flagged": flagged}
                heap.push(key, info, _thumb(r, gt))
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

    for stale in (out / "worst").glob("false_*.png"):  # from an earlier run into the same folder
        stale.unlink()
    worst_out: dict[str, list[dict[str, Any]]] = {}
    for name, heap in (("false_positives", fps), ("false_negatives", fns)):
        worst_out[name] = []
        for k, case in enumerate(heap.sorted(), 1):
            rel = f"worst/{name}_{k:02d}.png"
            png = overlay_png(case.thumb, case.info["score"], thr_p, case.info["flagged"])
            atomic_write_bytes(out / rel, png)
            worst_out[name].append({**case.info, "overlay": rel})

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
        "model": model_info if model_info is not None else _model_info(insp),
        "reasons": reasons,
        "warnings": warnings,
        "missing_masks": missing_ids,
        "errors": errors,
        "worst": worst_out,
        "curves": curves,
        "histogram_rule": HISTOGRAM_RULE,
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


# ------------------------------------------------------------------------------------------- the report

_BG, _FG, _MUTED, _GRID = "#171b21", "#e6e8eb", "#98a2ad", "#2a313b"
_OK, _NG, _ACCENT, _THR = "#30a46c", "#e5484d", "#4c8dff", "#ffd166"


def _figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.6, 3.4), dpi=110, facecolor=_BG)
    ax = fig.add_subplot()
    ax.set_facecolor(_BG)
    for s in ax.spines.values():
        s.set_color(_GRID)
    ax.tick_params(colors=_MUTED, labelsize=8)
    ax.grid(True, color=_GRID, linewidth=0.6)
    return fig, ax


def _finish(fig, ax, title: str, xlabel: str, ylabel: str, legend: str = "lower right") -> str:
    """Label the axes and return the figure as a base64 PNG data URI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    ax.set_title(title, color=_FG, fontsize=10)
    ax.set_xlabel(xlabel, color=_MUTED, fontsize=9)
    ax.set_ylabel(ylabel, color=_MUTED, fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, facecolor=_BG, edgecolor=_GRID, labelcolor=_FG, loc=legend)
    fig.tight_layout()
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _unavailable(ax, why: str) -> None:
    ax.text(
        0.5, 0.5, f"not available:\n{why}", color=_MUTED, ha="center", va="center", transform=ax.transAxes
    )


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "–" if v is None else format(float(v), spec)


def _plots(m: dict[str, Any], scores: np.ndarray, labels: np.ndarray) -> dict[str, str]:
    c, reasons = m["curves"], m["reasons"]
    plots = {}

    fig, ax = _figure()
    ax.plot([0, 1], [0, 1], color=_GRID, linestyle=":")
    if c["image_roc"]:
        ax.plot(c["image_roc"]["fpr"], c["image_roc"]["tpr"], color=_ACCENT,
                label=f"image AUROC {_fmt(m['image']['auroc'])}")  # fmt: skip
    if c["pixel_roc"]:
        ax.plot(c["pixel_roc"]["fpr"], c["pixel_roc"]["tpr"], color=_THR, linestyle="--",
                label=f"pixel AUROC {_fmt(m['pixel']['auroc'])}")  # fmt: skip
    if not (c["image_roc"] or c["pixel_roc"]):
        _unavailable(ax, reasons["image"].get("auroc", ""))
    plots["roc"] = _finish(fig, ax, "ROC", "false positive rate", "true positive rate")

    fig, ax = _figure()
    if c["image_pr"]:
        prevalence = float(labels.mean())
        ax.axhline(prevalence, color=_GRID, linestyle=":")
        ax.plot(c["image_pr"]["recall"], c["image_pr"]["precision"], color=_ACCENT,
                label=f"AP {_fmt(m['image']['ap'])}")  # fmt: skip
        ax.set_ylim(0, 1.02)
    else:
        _unavailable(ax, reasons["image"].get("ap", ""))
    plots["pr"] = _finish(fig, ax, "Precision-recall (image level)", "recall", "precision")

    fig, ax = _figure()
    thr = m["threshold"]["image"]
    lo, hi = float(scores.min()), float(scores.max())
    if thr is not None:
        lo, hi = min(lo, thr), max(hi, thr)
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, 41)
    for y, colour, name in ((0, _OK, "good"), (1, _NG, "anomalous")):
        if (labels == y).any():
            ax.hist(
                scores[labels == y],
                bins=edges,
                color=colour,
                alpha=0.7,
                label=f"{name} ({(labels == y).sum()})",
            )
    if thr is not None:
        ax.axvline(thr, color=_THR, linestyle="--", label=f"threshold {thr:.4g}")
    plots["hist"] = _finish(fig, ax, "Image scores", "score", "images", legend="upper right")

    fig, ax = _figure()
    if c["pro"]:
        ax.plot(
            c["pro"]["fpr"],
            c["pro"]["pro"],
            color=_ACCENT,
            label=f"AUPRO@{FPR_LIMIT:g} {_fmt(m['pixel'][AUPRO_KEY])}",
        )
        ax.set_xlim(0, FPR_LIMIT)
        ax.set_ylim(0, 1.02)
    else:
        _unavailable(ax, reasons["pixel"].get(AUPRO_KEY, ""))
    plots["pro"] = _finish(
        fig, ax, f"Per-region overlap up to FPR {FPR_LIMIT:g}", "pixel false positive rate", "PRO"
    )
    return plots


def write_evaluation_report(
    out: str | Path,
    metrics: dict[str, Any],
    scores: np.ndarray,
    labels: np.ndarray,
    title: str = "imganom evaluation",
) -> Path:
    """Render ``out/report.html`` (self-contained: plots and worst-case overlays embedded as base64 PNG)."""
    from imganom.reporting.html import _env

    out = Path(out)
    worst = {}
    for name, cases in metrics["worst"].items():
        worst[name] = [
            {
                **c,
                "src": "data:image/png;base64,"
                + base64.b64encode((out / c["overlay"]).read_bytes()).decode(),
            }
            for c in cases
        ]
    from imganom.utils.version import __version__

    html = (
        _env()
        .get_template("evaluate.html.j2")
        .render(
            title=title,
            m=metrics,
            plots=_plots(metrics, scores, labels),
            worst=worst,
            aupro_key=AUPRO_KEY,
            version=__version__,
            generated=dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        )
    )
    path = out / "report.html"
    atomic_write_bytes(path, html.encode("utf-8"))
    return path
