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
    data: Path = typer.Option(..., "--data", help="MVTec-style root (test/<type>, ground_truth/<type>)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (metrics.json, report.html)."),
    batch_size: BatchSizeOpt = 16,
    worst: int = typer.Option(8, "--worst", min=0, help="Worst false positives/negatives to show."),
    workers: WorkersOpt = 2,
    no_report: NoReportOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Evaluate a model on a labelled test set: image/pixel AUROC, AUPRO, F1, per-type table, report."""
    setup(verbose)
    from imganom.data.discovery import scan_mvtec
    from imganom.evaluation.evaluate import evaluate as run_evaluate

    try:
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
