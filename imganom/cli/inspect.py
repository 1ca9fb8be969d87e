"""``imganom inspect``: a batch of images -> results tables, masks, heatmaps, overlays, summary and report."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from imganom.cli.common import EXIT_NG, console, fail, progress_bar, setup
from imganom.cli.options import (
    BatchSizeOpt,
    ModelOptions,
    NoReportOpt,
    OverlaysOpt,
    RawMapsOpt,
    RecursiveOpt,
    VerboseOpt,
    WorkersOpt,
    check_overlays,
    check_raw_maps,
    with_model_options,
)


@with_model_options
def inspect(
    model: ModelOptions,
    inputs: list[Path] = typer.Option(
        ..., "--input", "-i", help="Folder, image file or .txt list (repeatable)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    recursive: RecursiveOpt = True,
    batch_size: BatchSizeOpt = 16,
    workers: WorkersOpt = 2,
    decode: str = typer.Option(
        "threads", "--decode", help="Decode on --workers threads, or processes (readers that hold the GIL)."
    ),
    resume: bool = typer.Option(False, "--resume", help="Skip inputs already in OUT/results.jsonl."),
    fail_on_ng: bool = typer.Option(False, "--fail-on-ng", help=f"Exit {EXIT_NG} if any image is NG."),
    raw_maps: RawMapsOpt = None,
    overlays: OverlaysOpt = "ng",
    no_report: NoReportOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Inspect images; writes results.csv/jsonl, masks, heatmaps, overlays, summary.json and report.html."""
    setup(verbose)
    from rich.progress import TextColumn

    from imganom.reporting.writers import OutputOptions
    from imganom.workflows.inspect import InspectStats, run_inspect

    check_raw_maps(raw_maps)
    check_overlays(overlays)
    if decode not in ("threads", "processes"):  # workflows.inspect.DECODE_MODES (not imported: --help)
        fail(f"--decode must be threads or processes, got {decode!r}")
    insp = model.load()
    progress = progress_bar(
        "inspect", TextColumn("{task.fields[ips]:.1f} img/s  NG {task.fields[ng]}  errors {task.fields[err]}")
    )
    t0 = [0.0]
    with progress:
        task = progress.add_task("inspect", total=None, ips=0.0, ng=0, err=0)

        def on_progress(st: InspectStats) -> None:
            if not t0[0]:
                t0[0] = time.perf_counter()
            el = max(time.perf_counter() - t0[0], 1e-6)
            ips = (st.done - st.skipped) / el
            progress.update(task, total=st.total, completed=st.done, ng=st.ng, err=st.error, ips=ips)

        try:
            _, summary = run_inspect(
                insp,
                inputs,
                out,
                recursive=recursive,
                batch_size=batch_size,
                workers=workers,
                decode=decode,
                resume=resume,
                options=OutputOptions(raw_maps=raw_maps, overlays=overlays),
                report=not no_report,
                on_progress=on_progress,
            )
        except FileNotFoundError as e:
            fail(str(e))
    c = summary["counts"]
    console.print(
        f"{c['total']} images: {c['ok']} OK, {c['ng']} NG, {c['error']} errors"
        + (f" ({c['resumed']} from a previous run)" if c["resumed"] else "")
        + (f"; {summary['throughput_img_s']:.1f} img/s" if summary["throughput_img_s"] else "")
    )
    console.print(
        f"results: {out / 'results.csv'}" + ("" if no_report else f"\nreport:  {out / 'report.html'}")
    )
    if fail_on_ng and c["ng"]:
        raise typer.Exit(EXIT_NG)
