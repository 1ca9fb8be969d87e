"""``imganom evaluate`` on volumes: slice-, voxel-, lesion- and volume-level metrics from a medical layout.

Layout (``scan_volume_layout``)::

    ROOT/normal/<name>.nii.gz        volumes without lesions (or <name>/ : a folder of one DICOM series)
    ROOT/abnormal/<name>.nii.gz      volumes with lesions (same forms)
    ROOT/masks/<name>.nii.gz         the lesion mask of each abnormal volume (nonzero = lesion), on its grid

A mask must be on its volume's grid (same shape, affine within ``AFFINE_TOL``): nothing is resampled. An
abnormal volume without a mask counts for volume-level metrics only and is listed in ``missing_masks``.

Metrics (``metrics.json``; ``scores.csv`` has one row per volume):
  * ``slice``: each slice along ``axis`` is an image (label: it holds a lesion voxel), its score the slice
    score; AUROC, AP, F1 as ``ops.metrics.ImageMetrics``.
  * ``voxel``: every voxel of every volume pooled (``ops.metrics.PixelMetrics``): AUROC and AUPRO (regions
    are the 2-D lesion cross-sections of each slice, as for 2-D images); ``dice`` of the inspector's masks
    (calibrated pixel threshold + post-processing) against the lesion masks, pooled over all volumes (normal
    volumes add their false positives), and ``dice_mean`` over abnormal volumes.
  * ``lesion``: ground-truth lesions are 3-D components of the masks; one is found when a predicted 3-D
    component overlaps it (``sensitivity``); predicted components touching no lesion are false positives
    (``false_positives_per_volume``).
  * ``volume``: volume score (highest slice score) against the volume label: AUROC, AP and, at the image
    threshold, TPR / FPR.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np

from imganom.data.readers import ImageReadError
from imganom.data.volumes import (
    DICOM_SUFFIXES,
    Volume,
    find_dicom_without_extension,
    geometry_mismatch,
    is_nifti,
    read_dicom_volume,
    read_nifti,
)
from imganom.evaluation.evaluate import FPR_LIMIT, describe_model, histogram_range
from imganom.inference.inspector import Inspector
from imganom.inference.volume import inspect_volume
from imganom.ops.lesions3d import label_volume
from imganom.ops.metrics import EvalAccumulator, ImageMetrics
from imganom.utils.files import atomic_write_bytes, to_jsonable, write_json_atomic

_STRIP = (".nii.gz", ".nii")


@dataclass
class VolumeCase:
    """One volume of the layout: where it is, its label and its lesion mask file."""

    id: str
    path: Path  # a NIfTI file or a DICOM series folder
    label: int
    mask: Path | None = None


@dataclass
class VolumeLayout:
    root: Path
    cases: list[VolumeCase] = field(default_factory=list)
    missing_masks: list[str] = field(default_factory=list)


def is_volume_layout(root: str | Path) -> bool:
    """True when ``root`` has ``normal/`` and ``abnormal/`` folders (the medical layout)."""
    return (Path(root) / "normal").is_dir() and (Path(root) / "abnormal").is_dir()


def _name(p: Path) -> str:
    low = p.name.lower()
    return next((p.name[: -len(e)] for e in _STRIP if low.endswith(e)), p.name)


def _entries(folder: Path) -> list[Path]:
    """NIfTI files and DICOM series folders (folders holding .dcm files) directly in ``folder``, sorted."""
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_file() and is_nifti(p) or p.is_dir() and _series_files(p):
            out.append(p)
    return out


def scan_volume_layout(root: str | Path) -> VolumeLayout:
    """The cases of a medical layout (module docstring); ValueError when it is not one or holds no volume."""
    root = Path(root)
    if not is_volume_layout(root):
        raise ValueError(f"{root}: not a volume layout (needs normal/ and abnormal/ folders)")
    found = sorted((root / "masks").glob("*")) if (root / "masks").is_dir() else []
    masks = {_name(p): p for p in found if is_nifti(p)}
    layout = VolumeLayout(root)
    for label, sub in ((0, "normal"), (1, "abnormal")):
        for p in _entries(root / sub):
            mask = masks.get(_name(p)) if label else None
            layout.cases.append(VolumeCase(f"{sub}/{p.name}", p, label, mask))
            if label and mask is None:
                layout.missing_masks.append(f"{sub}/{p.name}")
    if not layout.cases:
        raise ValueError(f"{root}: no volumes under normal/ or abnormal/")
    return layout


def _series_files(folder: Path) -> list[Path]:
    """The DICOM files directly in a series folder (``.dcm``/``.dicom``, or no extension and a signature)."""
    named = [q for q in sorted(folder.iterdir()) if q.is_file() and q.name.lower().endswith(DICOM_SUFFIXES)]
    return named + find_dicom_without_extension(folder, recursive=False)


def _load(case: VolumeCase) -> Volume:
    if case.path.is_dir():
        return read_dicom_volume(_series_files(case.path), case.id)
    return read_nifti(case.path, case.id)


def _read_mask(case: VolumeCase, vol: Volume) -> np.ndarray:
    """The case's lesion mask as bool (X, Y, Z) on ``vol``'s grid (ImageReadError when it is not)."""
    assert case.mask is not None
    m = read_nifti(case.mask)
    why = geometry_mismatch(vol, m)
    if why:
        raise ImageReadError(str(case.mask), f"mask is not on the grid of {case.path} ({why}); not resampled")
    return m.data[..., 0] != 0


def _dice(tp: int, fp: int, fn: int) -> float | None:
    return 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else None


def _stratified(cases: list[VolumeCase]) -> list[VolumeCase]:
    """Abnormal and normal volumes alternated (abnormal first) so the first one sets a histogram range that
    holds lesion voxels."""
    ab = [c for c in cases if c.label]
    no = [c for c in cases if not c.label]
    return [c for pair in zip_longest(ab, no) for c in pair if c is not None]


def evaluate_volumes(
    insp: Inspector,
    root: str | Path | VolumeLayout,
    out: str | Path,
    *,
    axis: int = 2,
    batch_size: int = 16,
    connectivity: int = 3,
    bins: int = 20_000,
    threshold_source: str = "normal",
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Evaluate ``insp`` on a medical layout; writes ``out/metrics.json`` and ``out/scores.csv`` and returns
    the metrics. A volume that cannot be read or inspected is listed under ``errors`` and left out."""
    started = dt.datetime.now(dt.timezone.utc)
    layout = root if isinstance(root, VolumeLayout) else scan_volume_layout(root)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    thr_i, thr_p = insp.image_threshold, insp.pixel_threshold
    acc: EvalAccumulator | None = None
    volumes = ImageMetrics()
    tp = fp = fn = 0
    dices: list[float] = []
    found = total = fp_lesions = 0
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    cases = _stratified(layout.cases)
    t0 = time.perf_counter()
    for i, case in enumerate(cases):
        try:
            vol = _load(case)
            gt = _read_mask(case, vol) if case.mask is not None else None
            vr = inspect_volume(insp, vol, axis, batch_size=batch_size, connectivity=connectivity)
        except Exception as e:  # noqa: BLE001 - one bad volume never ends the evaluation
            why = str(e) if isinstance(e, ImageReadError) else f"{case.path}: {type(e).__name__}: {e}"
            errors.append({"id": case.id, "error": why})
            if on_progress:
                on_progress(i + 1, len(cases))
            continue
        if acc is None:
            lo, hi = float(vr.anomaly_map.min()), float(vr.anomaly_map.max())
            acc = EvalAccumulator(*histogram_range(thr_p, lo, hi), bins=bins, pixel_threshold=thr_p)
        volumes.add(vr.score, case.label)
        row = {"id": case.id, "label": case.label, "score": vr.score, "slice_index": vr.slice_index,
               "n_lesions": len(vr.lesions), "gt_lesions": None, "found": None, "dice": None}  # fmt: skip
        rows.append(row)
        if on_progress:
            on_progress(i + 1, len(cases))
        if case.label and gt is None:
            continue  # no mask: volume-level metrics only
        pred = vr.mask > 0
        g3 = gt if gt is not None else np.zeros(pred.shape, bool)
        amaps, gts = np.moveaxis(vr.anomaly_map, axis, 0), np.moveaxis(g3, axis, 0)
        for k, r in enumerate(vr.slices):
            acc.add(r.score, int(gts[k].any()), amaps[k], gts[k], "lesion")
        a, b, c = int((pred & g3).sum()), int((pred & ~g3).sum()), int((~pred & g3).sum())
        tp, fp, fn = tp + a, fp + b, fn + c
        if gt is not None:
            gl, n_gt = label_volume(gt, connectivity)
            hit = int(np.unique(gl[pred & gt]).size)  # lesions with a predicted voxel
            found, total = found + hit, total + n_gt
            d = _dice(a, b, c)
            if d is not None:
                dices.append(d)
            row.update(gt_lesions=n_gt, found=hit, dice=d)
        pl, n_pred = label_volume(pred, connectivity)
        fp_lesions += n_pred - int(np.unique(pl[pred & g3]).size)
    seconds = time.perf_counter() - t0
    if acc is None:
        raise RuntimeError(f"no volume could be evaluated ({len(errors)} errors; first: {errors[:1]})")
    res = acc.compute(image_threshold=thr_i, fpr_limit=FPR_LIMIT)
    sl, vx = res["image"], res["pixel"]
    vx.pop("roc_curve")
    vx.pop("pro_curve")
    vx["dice"], vx["dice_mean"] = _dice(tp, fp, fn), float(np.mean(dices)) if dices else None
    vol_m = volumes.compute(thr_i)
    n_maps = sum(1 for r in rows if r["label"] == 0 or r["gt_lesions"] is not None)  # volumes with truth
    metrics = {
        "slice": sl,
        "voxel": vx,
        "lesion": {
            "lesions": total, "found": found, "sensitivity": found / total if total else None,
            "false_positives": fp_lesions,
            "false_positives_per_volume": fp_lesions / n_maps if n_maps else None,
            "connectivity": connectivity,
        },
        "volume": vol_m,
        "counts": {"volumes": len(layout.cases), "normal": sum(r["label"] == 0 for r in rows),
                   "abnormal": sum(r["label"] == 1 for r in rows), "errors": len(errors),
                   "missing_masks": len(layout.missing_masks), "slices": len(acc.images)},
        "threshold": {"image": thr_i, "pixel": thr_p, "source": threshold_source},
        "axis": axis,
        "missing_masks": layout.missing_masks,
        "errors": errors,
        "model": describe_model(insp),
        "dataset": {"root": str(layout.root), "layout": "volumes"},
        "seconds": seconds,
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip
    metrics = to_jsonable(metrics)
    write_json_atomic(out / "metrics.json", metrics)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(out / "scores.csv", buf.getvalue().encode("utf-8"))
    return metrics
