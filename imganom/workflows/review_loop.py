"""Closing the review loop: reviewer decisions (``reviews.jsonl``, ``imganom review``) retune the model.

- ``reviewed_images``: the images of one or more reviewed ``inspect`` folders with the decision in force
  (defect / normal; skips left out), their input paths from ``results.jsonl`` and corrected masks;
- ``calibrate_on_reviews``: the image threshold at a target false-reject rate over the images confirmed
  normal (or F1-optimal over both classes), scored by the model being calibrated, with the detection rate
  on confirmed defects and the recall per defect type; the result records which review files it used;
- ``finetune_on_reviews``: fine-tunes a model on the confirmed false alarms (plus its original normals),
  recalibrates it as ``imganom train`` does, and measures the false-alarm rate before / after on a held-out
  part of the reviewed normals.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imganom.data.discovery import MVTecItem, MVTecLayout
from imganom.inference.inspector import Inspector
from imganom.ops.thresholds import f1_max_threshold
from imganom.reporting.results import read_jsonl
from imganom.reporting.reviews import REVIEWS_FILE, load_decisions, refresh_summary, resolve_inside
from imganom.workflows.calibrate import image_scores

log = logging.getLogger(__name__)
OBJECTIVES = ("fpr", "f1")


@dataclass(frozen=True)
class Reviewed:
    """One reviewed image: where it came from and what the reviewer decided."""

    id: str
    path: Path  # the input image (results.jsonl ``path``)
    decision: str  # "defect" or "normal"
    label: str | None  # defect type, when given
    mask: Path | None  # corrected mask (absolute), when painted
    verdict: str | None  # the model's verdict when it was reviewed
    results_dir: Path


def reviewed_images(results_dirs: Sequence[Path]) -> list[Reviewed]:
    """Every image with a defect/normal decision in force, over the given ``inspect`` folders."""
    out = []
    rows_of: dict[Path, dict[str, dict]] = {}
    for d, rec in load_decisions(results_dirs):
        if d not in rows_of:
            rows_of[d] = {str(r.get("id")): r for r in read_jsonl(d / "results.jsonl")[0]}
        row = rows_of[d].get(rec["id"])
        if row is None or not row.get("path"):
            log.warning("%s: reviewed id %r is not in results.jsonl; skipped", d, rec["id"])
            continue
        mask = resolve_inside(d, rec["mask"]) if rec.get("mask") else None
        out.append(Reviewed(rec["id"], Path(row["path"]), rec["decision"], rec.get("label"), mask,
                            rec.get("verdict") or row.get("verdict"), d))  # fmt: skip
    return out


def _sources(results_dirs: Sequence[Path]) -> list[dict[str, Any]]:
    """Which review files (path, sha256, lines) a calibration used: recorded in the model file."""
    out = []
    for d in results_dirs:
        data = (Path(d) / REVIEWS_FILE).read_bytes()
        out.append({"results_dir": str(Path(d).resolve()), "sha256": hashlib.sha256(data).hexdigest(),
                    "records": data.count(b"\n")})  # fmt: skip
    return out


def _empirical_threshold(normal: np.ndarray, target: float) -> float:
    """The lowest threshold rejecting at most ``target`` of ``normal`` (score > threshold rejects)."""
    s = np.sort(normal)
    m = int(math.floor(target * s.size + 1e-9))  # how many normals may be rejected
    return float(s[s.size - m - 1])


def rates(threshold: float, scored: Sequence[tuple[Reviewed, float]]) -> dict[str, Any]:
    """False-reject rate on confirmed normals, detection rate on confirmed defects, recall per defect type."""
    normal = [s for r, s in scored if r.decision == "normal"]
    by_type: dict[str, list[bool]] = defaultdict(list)
    for r, s in scored:
        if r.decision == "defect":
            by_type[r.label or "unlabelled"].append(s > threshold)
    hits = [h for v in by_type.values() for h in v]
    return {
        "false_reject_rate": float(np.mean(np.asarray(normal) > threshold)) if normal else None,
        "detection_rate": float(np.mean(hits)) if hits else None,
        "per_type_recall": {k: {"recall": float(np.mean(v)), "n": len(v)} for k, v in sorted(by_type.items())
                            },  # fmt: skip
        "n_normal": len(normal),
        "n_defect": len(hits),
    }


def calibrate_on_reviews(
    insp: Inspector,
    results_dirs: Sequence[Path],
    *,
    target_fpr: float | None = None,
    objective: str = "fpr",
    batch_size: int = 16,
) -> dict[str, Any]:
    """A new calibration dict for ``insp``'s model: its current calibration with the image threshold set from
    the reviewed images and a ``reviews`` entry (sources, objective, rates). Also refreshes each folder's
    ``summary.json`` ``reviews`` block. Raises ValueError when the reviews cannot set a threshold."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    target = insp.cfg.calibration.target_fpr if target_fpr is None else float(target_fpr)
    if not 0 < target < 1:
        raise ValueError(f"target false-reject rate must be in (0, 1), got {target}")
    items = reviewed_images(results_dirs)
    scores = image_scores(insp, [r.path for r in items], batch_size)
    scored = [(r, scores[str(r.path)]) for r in items if str(r.path) in scores]
    if len(scored) < len(items):
        log.warning("calibrate: %d reviewed images could not be read", len(items) - len(scored))
    normal = np.asarray([s for r, s in scored if r.decision == "normal"])
    if objective == "f1":
        labels = np.asarray([r.decision == "defect" for r, _ in scored])
        thr, f1 = f1_max_threshold(np.asarray([s for _, s in scored]), labels)
    else:
        if normal.size < 2:
            raise ValueError(f"need at least 2 images confirmed normal in the reviews, got {normal.size}")
        thr, f1 = _empirical_threshold(normal, target), None
    cal = dict(insp.meta.calibration or {})
    previous = cal.get("image_threshold")
    cal.update(image_threshold=float(thr), source="reviews")
    cal["reviews"] = {
        "objective": objective,
        "target_fpr": target if objective == "fpr" else None,
        "f1": f1,
        "previous_image_threshold": previous,
        "sources": _sources(results_dirs),
        **rates(float(thr), scored),
    }
    for d in results_dirs:
        refresh_summary(Path(d))
    return cal


def _split(items: list[Reviewed], holdout: float, seed: int) -> tuple[list[Reviewed], list[Reviewed]]:
    """(kept for training, held out): ``holdout`` of the false alarms and of the other normals, seeded."""
    train, held = [], []
    for group in ([r for r in items if r.verdict == "NG"], [r for r in items if r.verdict != "NG"]):
        group = sorted(group, key=lambda r: str(r.path))
        order = np.random.default_rng(seed).permutation(len(group))
        n_held = int(round(holdout * len(group)))
        held += [group[i] for i in sorted(order[:n_held])]
        train += [group[i] for i in sorted(order[n_held:])]
    return train, held


def _false_alarms(insp: Inspector, held: list[Reviewed]) -> dict[str, Any]:
    s = np.asarray(list(image_scores(insp, [r.path for r in held]).values()))
    thr = float(insp.image_threshold)
    return {
        "image_threshold": thr,
        "false_alarm_rate": float(np.mean(s > thr)) if s.size else None,
        "mean_score_over_threshold": float(np.mean(s / thr)) if s.size and thr > 0 else None,
        "n": int(s.size),
    }


def finetune_on_reviews(
    model_path: Path,
    data: Path,
    results_dirs: Sequence[Path],
    run_dir: Path,
    *,
    epochs: int | None = None,
    holdout: float = 0.5,
    seed: int = 0,
    device: str = "auto",
    progress: Any = None,
) -> dict[str, Any]:
    """Fine-tune ``model_path`` on the confirmed false alarms of ``results_dirs`` (not held out) plus the
    original normals ``data``, recalibrate on ``data``'s held-out split, and compare the false-alarm rate on
    the held-out reviewed normals before / after. Writes ``run_dir/model.safetensors`` and
    ``run_dir/finetune.json``; returns the comparison (with ``model_path`` of the new model)."""
    from imganom.formats.modelfile import update_calibration
    from imganom.training.trainer import train, training_images
    from imganom.utils.files import write_json_atomic
    from imganom.workflows.calibrate import calibrate

    if not 0 <= holdout < 1:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    normals = [r for r in reviewed_images(results_dirs) if r.decision == "normal"]
    kept, held = _split(normals, holdout, seed)
    added = [r.path for r in kept if r.verdict == "NG"]
    if not added:
        raise ValueError("no confirmed false alarms (reviewed normal, verdict NG) outside the held-out part")
    old = Inspector.load(model_path, device=device)
    if old.image_threshold is None:
        raise ValueError(f"{model_path}: not calibrated; calibrate it before fine-tuning")
    before = _false_alarms(old, held) if held else None
    cfg = old.cfg
    if epochs is not None:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs})})
    # a few false alarms among many normals would barely move the model: repeat them up to as many
    repeat = max(1, math.ceil(len(training_images(data)[0]) / len(added)))
    res = train(cfg, data, run_dir, device=device, progress=progress, init=model_path,
                extra_normals=added * repeat)  # fmt: skip
    new = Inspector.load(res.model_path, device=device)
    cal_paths = res.val_paths if len(res.val_paths) >= 2 else training_images(data)[0]
    cal, stats = calibrate(new, cal_paths, stats_paths=res.train_paths or None)
    update_calibration(res.model_path, cal, stats)
    new = Inspector.load(res.model_path, device=device)
    report = {
        "model_path": str(res.model_path),
        "init": str(model_path),
        "reviews": _sources(results_dirs),
        "added_false_alarms": len(added),
        "repeated": repeat,
        "held_out_normals": len(held),
        "held_out_ids": [r.id for r in held],
        "epochs": res.epochs_run,
        "before": before,
        "after": _false_alarms(new, held) if held else None,
    }
    write_json_atomic(Path(run_dir) / "finetune.json", report)
    return report


def reviewed_layout(results_dirs: Sequence[Path]) -> MVTecLayout:
    """The reviewed images as an evaluation set (``evaluation.evaluate`` takes it like an MVTec test split):
    confirmed normal -> label 0 (``good``), confirmed defect -> label 1 with its defect type (or ``defect``)
    and the reviewer's corrected mask as ground truth where one was painted."""
    items = []
    for r in reviewed_images(results_dirs):
        bad = r.decision == "defect"
        kind = (r.label or "defect") if bad else "good"
        mask = r.mask if bad else None
        items.append(MVTecItem(r.path, f"{r.results_dir.name}/{r.id}", int(bad), kind, mask))
    if not items:
        where = ", ".join(map(str, results_dirs))
        raise ValueError(f"no reviewed images (defect or normal decisions) in {where}")
    missing = [it.id for it in items if it.label and it.mask_path is None]
    types = sorted({it.defect_type for it in items if it.label})
    return MVTecLayout(Path(results_dirs[0]), [], items, types, missing)
