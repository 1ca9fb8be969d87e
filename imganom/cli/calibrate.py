"""``imganom calibrate``: thresholds from normal images at a target false-reject rate, stored in the model."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from imganom.cli.common import console, fail, setup
from imganom.cli.options import VerboseOpt


def calibrate(
    model: Path = typer.Option(..., "--model", "-m", help="Model file or run directory."),
    data: Path = typer.Option(..., "--data", help="Folder of normal images (MVTec root: uses test/good)."),
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
    from imganom.formats.modelfile import ModelFileError, resolve_model_path, save_model, update_calibration
    from imganom.inference.inspector import Inspector
    from imganom.workflows.calibrate import calibrate as run_calibrate

    try:
        insp = Inspector.load(model)
    except ModelFileError as e:
        fail(str(e))
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
    if out is None:
        update_calibration(model, cal, stats)
        dest = resolve_model_path(model)
    else:
        save_model(
            out,
            insp.model.cpu(),
            insp.cfg,
            training=insp.meta.training,
            calibration=cal,
            stats={**{k: v.cpu() for k, v in insp.stats.items()}, **stats},
        )
        dest = out
    console.print(
        json.dumps({k: cal[k] for k in ("image_threshold", "pixel_threshold", "n_images", "target_fpr")})
    )
    if "f1_max" in cal:
        console.print(
            f"F1-max image threshold {cal['f1_max']['image_threshold']:.4g} (F1 {cal['f1_max']['f1']:.3f});"
            " use it with --threshold-source f1_max"
        )
    print(dest)
