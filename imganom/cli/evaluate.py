"""``imganom evaluate``: metrics and a report for a model on a labelled MVTec-style test split."""

from __future__ import annotations

from pathlib import Path

import typer

from imganom.cli.common import EXIT_RUNTIME, console, fail, progress_bar, setup
from imganom.cli.options import (
    BatchSizeOpt,
    ModelOptions,
    NoReportOpt,
    VerboseOpt,
    WorkersOpt,
    with_model_options,
)


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


@with_model_options
def evaluate(
    model: ModelOptions,
    data: Path | None = typer.Option(
        None, "--data", help="MVTec-style root (test/<type>, ground_truth/<type>)."
    ),
    reviews: str | None = typer.Option(
        None,
        "--reviews",
        help="Instead of --data: reviewed inspect folders (DIR[,DIR...]); reviewer decisions are the labels, "
        "corrected masks the ground truth where painted.",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (metrics.json, report.html)."),
    batch_size: BatchSizeOpt = 16,
    worst: int = typer.Option(8, "--worst", min=0, help="Worst false positives/negatives to show."),
    workers: WorkersOpt = 2,
    no_report: NoReportOpt = False,
    axis: int = typer.Option(2, "--axis", min=0, max=2, help="Volume layout: slice along this stored axis."),
    verbose: VerboseOpt = False,
) -> None:
    """Evaluate a model on a labelled test set: image/pixel AUROC, AUPRO, F1, per-type table, report.
    A volume layout (DATA/normal, DATA/abnormal, DATA/masks) gets slice/voxel/lesion/volume metrics."""
    setup(verbose)
    from imganom.data.discovery import scan_mvtec
    from imganom.evaluation.evaluate import evaluate as run_evaluate
    from imganom.evaluation.volumes import is_volume_layout
    from imganom.workflows.review_loop import reviewed_layout

    if (data is None) == (reviews is None):
        fail("give either --data (an MVTec-style root) or --reviews (reviewed inspect folders)")
    if data is not None and is_volume_layout(data):
        return evaluate_volumes(model, data, out, batch_size, axis)
    try:
        if reviews is not None:
            layout = reviewed_layout([Path(d) for d in reviews.split(",") if d])
        else:
            layout = scan_mvtec(data)
    except (ValueError, OSError) as e:
        fail(str(e))
    if not layout.test:
        fail(f"{data}: no test images under test/")
    insp = model.load()
    with progress_bar("evaluate") as progress:
        task = progress.add_task("evaluate", total=len(layout.test))
        try:
            m = run_evaluate(
                insp, layout, out, batch_size, worst, workers=workers,
                threshold_source=model.threshold_source, report=not no_report,
                on_progress=lambda done, _: progress.update(task, completed=done),
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001 - any failure mid-run is a runtime failure (exit 1)
            fail(f"evaluation failed: {type(e).__name__}: {e}", EXIT_RUNTIME)
    c = m["counts"]
    console.print(
        f"{c['good']} good, {c['anomalous']} anomalous ({c['with_mask']} with masks), "
        f"{c['errors']} errors: "
        f"image AUROC {_f(m['image']['auroc'])}, pixel AUROC {_f(m['pixel']['auroc'])}, "
        f"AUPRO@0.3 {_f(m['pixel']['aupro_0.3'])}; {m['throughput_img_s']:.1f} img/s"
    )
    lat = m.get("latent") or {}
    if lat.get("available"):
        console.print(f"latent (Mahalanobis) AUROC {_f(lat['latent_auroc'])}, "
                      f"combined with the reconstruction score {_f(lat.get('combined_auroc'))}")  # fmt: skip
    else:
        console.print(f"latent score: {lat.get('reason', 'not computed')}")
    for w in m["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {w}")
    console.print(
        f"metrics: {out / 'metrics.json'}" + ("" if no_report else f"\nreport:  {out / 'report.html'}")
    )


def evaluate_volumes(model: ModelOptions, data: Path, out: Path, batch_size: int, axis: int) -> None:
    """``imganom evaluate`` on a volume layout (``evaluation.volumes``): metrics.json and scores.csv."""
    from imganom.evaluation.volumes import evaluate_volumes as run
    from imganom.evaluation.volumes import scan_volume_layout

    try:
        layout = scan_volume_layout(data)
    except (ValueError, OSError) as e:
        fail(str(e))
    insp = model.load()
    with progress_bar("evaluate") as progress:
        task = progress.add_task("evaluate", total=len(layout.cases))
        try:
            m = run(insp, layout, out, axis=axis, batch_size=batch_size,
                    threshold_source=model.threshold_source,
                    on_progress=lambda done, _: progress.update(task, completed=done))  # fmt: skip
        except Exception as e:  # noqa: BLE001 - any failure mid-run is a runtime failure (exit 1)
            fail(f"evaluation failed: {type(e).__name__}: {e}", EXIT_RUNTIME)
    c, les = m["counts"], m["lesion"]
    console.print(
        f"{c['normal']} normal, {c['abnormal']} abnormal volumes ({c['slices']} slices), "
        f"{c['errors']} errors: "
        f"volume AUROC {_f(m['volume']['auroc'])}, slice AUROC {_f(m['slice']['auroc'])}, "
        f"voxel AUROC {_f(m['voxel']['auroc'])}, AUPRO@0.3 {_f(m['voxel']['aupro_0.3'])}, "
        f"Dice {_f(m['voxel']['dice'])}, lesions found {les['found']}/{les['lesions']}"
    )
    for e in m["errors"]:
        console.print(f"[yellow]warning:[/yellow] {e['error']}")
    console.print(f"metrics: {out / 'metrics.json'}")
