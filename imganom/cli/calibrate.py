"""``imganom calibrate``: thresholds from normal images at a target false-reject rate, stored in the model."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from imganom.cli.common import console, fail, setup
from imganom.cli.options import VerboseOpt


def calibrate(
    model: Path = typer.Option(..., "--model", "-m", help="Model file or run directory."),
    data: Path | None = typer.Option(
        None, "--data", help="Folder of normal images (MVTec root: uses test/good)."
    ),
    reviews: str | None = typer.Option(
        None,
        "--reviews",
        help="Reviewed inspect folders (DIR[,DIR...], reviews.jsonl from imganom review): the image "
        "threshold at --target-fpr over the images confirmed normal (instead of --data).",
    ),
    objective: str = typer.Option(
        "fpr", "--objective", help="With --reviews: fpr (target false-reject rate) or f1 (F1-optimal)."
    ),
    target_fpr: float | None = typer.Option(None, "--target-fpr"),
    labeled: Path | None = typer.Option(
        None, "--labeled", help="MVTec root with anomalies: adds F1-max thresholds."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Write a new model file instead of updating in place."
    ),
    restat: bool = typer.Option(
        False,
        "--restat",
        help="Recompute the normal-map statistics (map.standardize/scales) from half of --data "
        "instead of keeping the model's (from its training images).",
    ),
    verbose: VerboseOpt = False,
) -> None:
    """Set thresholds from normal images at a target false-reject rate; stored in the model file."""
    setup(verbose)
    from imganom.data.discovery import find_images, is_mvtec_root, scan_mvtec
    from imganom.formats.modelfile import ModelFileError
    from imganom.inference.inspector import Inspector
    from imganom.workflows.calibrate import calibrate as run_calibrate

    try:
        insp = Inspector.load(model)
    except ModelFileError as e:
        fail(str(e))
    if (data is None) == (reviews is None):
        fail("give either --data (normal images) or --reviews (reviewed inspect folders)")
    if reviews is not None:
        dirs = [Path(d) for d in reviews.split(",") if d]
        return _from_reviews(insp, model, dirs, target_fpr, objective, out)
    root = data / "test" / "good" if is_mvtec_root(data) else data
    paths = find_images(root)
    if not paths:
        fail(f"no images found under {root}")
    cfg = insp.cfg.calibration
    if target_fpr is not None:
        cfg = cfg.model_copy(update={"target_fpr": target_fpr})
    lab = None
    if labeled is not None:
        lay = scan_mvtec(labeled)
        lab = [(it.path, it.label) for it in lay.test]
    cal, stats = run_calibrate(insp, paths, cfg, labeled=lab, keep_stats=not restat, latents=True)
    dest = _store(insp, model, out, cal, stats)
    console.print(
        json.dumps({k: cal[k] for k in ("image_threshold", "pixel_threshold", "n_images", "target_fpr")})
    )
    if "f1_max" in cal:
        console.print(
            f"F1-max image threshold {cal['f1_max']['image_threshold']:.4g} (F1 {cal['f1_max']['f1']:.3f});"
            " use it with --threshold-source f1_max"
        )
    print(dest)


def _store(insp, model: Path, out: Path | None, cal: dict, stats: dict) -> Path:
    """Write the calibration into the model file (or a copy at ``out``); returns the file written."""
    from imganom.formats.modelfile import resolve_model_path, save_model, update_calibration

    if out is None:
        update_calibration(model, cal, stats)
        return resolve_model_path(model)
    save_model(
        out,
        insp.model.cpu(),
        insp.cfg,
        training=insp.meta.training,
        calibration=cal,
        stats={**{k: v.cpu() for k, v in insp.stats.items()}, **stats},
    )
    return out


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _from_reviews(
    insp, model: Path, dirs: list[Path], target_fpr: float | None, objective: str, out: Path | None
) -> None:
    """``calibrate --reviews``: the image threshold from reviewer decisions (``workflows.review_loop``)."""
    from imganom.workflows.review_loop import calibrate_on_reviews

    try:
        cal = calibrate_on_reviews(insp, dirs, target_fpr=target_fpr, objective=objective)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    dest = _store(insp, model, out, cal, {})
    rv = cal["reviews"]
    console.print(
        f"image threshold {cal['image_threshold']:.4g} ({objective}; was {rv['previous_image_threshold']}) "
        f"from {rv['n_normal']} confirmed normal and {rv['n_defect']} confirmed defective images: "
        f"false-reject rate {_pct(rv['false_reject_rate'])}, detection rate {_pct(rv['detection_rate'])}",
        soft_wrap=True,
    )
    for label, r in rv["per_type_recall"].items():
        console.print(f"  recall {label}: {_pct(r['recall'])} of {r['n']}")
    print(dest)
