"""``imganom evaluate``: metrics and a report for a model on a labelled MVTec-style test split."""

from __future__ import annotations

from pathlib import Path

import typer

THRESHOLD_SOURCES = ("normal", "f1_max")


def register(app: typer.Typer) -> None:
    """Add the ``evaluate`` command to ``app``."""

    @app.command("evaluate")
    def evaluate_cmd(
        model: Path = typer.Option(..., "--model", "-m", help="Model file or run directory."),
        data: Path = typer.Option(..., "--data", help="MVTec-style root (test/<type>, ground_truth/<type>)."),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder (metrics.json, report.html)."),
        batch_size: int = typer.Option(16, "--batch-size", min=1),
        device: str = typer.Option("auto", "--device"),
        precision: str = typer.Option("auto", "--precision"),
        threshold_source: str = typer.Option("normal", "--threshold-source", help="normal | f1_max"),
        worst: int = typer.Option(8, "--worst", min=0, help="Worst false positives/negatives to show."),
        workers: int = typer.Option(2, "--workers", min=0, help="Decoding worker processes."),
        no_report: bool = typer.Option(False, "--no-report", help="Skip report.html."),
        verbose: bool = typer.Option(False, "--verbose", "-v"),
    ) -> None:
        """Evaluate a model on a labelled test set: image/pixel AUROC, AUPRO, F1, per-type table, report."""
        import sys

        from imganom.cli.main import _fail, _load_inspector, _setup, console

        _setup(verbose)
        if threshold_source not in THRESHOLD_SOURCES:
            _fail(
                f"--threshold-source must be one of {', '.join(THRESHOLD_SOURCES)}, got {threshold_source!r}"
            )
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from imganom.data.discovery import scan_mvtec
        from imganom.evaluation.evaluate import evaluate

        try:
            layout = scan_mvtec(data)
        except (ValueError, OSError) as e:
            _fail(str(e))
        if not layout.test:
            _fail(f"{data}: no test images under test/")
        insp = _load_inspector(model, device, precision, threshold_source=threshold_source)
        progress = Progress(
            TextColumn("evaluate"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, disable=not sys.stderr.isatty(),
        )  # fmt: skip
        with progress:
            task = progress.add_task("evaluate", total=len(layout.test))
            try:
                m = evaluate(
                    insp, layout, out, batch_size, worst, workers=workers, threshold_source=threshold_source,
                    report=not no_report, on_progress=lambda done, _: progress.update(task, completed=done),
                )  # fmt: skip
            except Exception as e:  # noqa: BLE001 - any failure mid-run is a runtime failure (exit 1)
                _fail(f"evaluation failed: {type(e).__name__}: {e}", 1)

        def f(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.3f}"

        c = m["counts"]
        console.print(
            f"{c['good']} good, {c['anomalous']} anomalous ({c['with_mask']} with masks), "
            f"{c['errors']} errors: "
            f"image AUROC {f(m['image']['auroc'])}, pixel AUROC {f(m['pixel']['auroc'])}, "
            f"AUPRO@0.3 {f(m['pixel']['aupro_0.3'])}; {m['throughput_img_s']:.1f} img/s"
        )
        for w in m["warnings"]:
            console.print(f"[yellow]warning:[/yellow] {w}")
        console.print(
            f"metrics: {out / 'metrics.json'}" + ("" if no_report else f"\nreport:  {out / 'report.html'}")
        )
