"""The ``imganom`` command line (typer). Each command is a thin shell over a library function.

Exit codes: 0 done; 1 runtime failure; 2 usage / config / model-file error; 3 ``inspect --fail-on-ng`` found
at least one NG; 130 interrupted (a resumable checkpoint was saved).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Visual anomaly inspection with a convolutional VAE.",
)
console = Console(stderr=True)
EXIT_USAGE, EXIT_NG, EXIT_INTERRUPTED = 2, 3, 130


def _fail(msg: str, code: int = EXIT_USAGE) -> None:
    console.print(f"[red]error:[/red] {msg}")
    raise typer.Exit(code)


def _setup(verbose: bool = False) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )


from imganom.cli.train import train  # noqa: E402

app.command()(train)


@app.command("calibrate")
def calibrate_cmd(
    model: Path = typer.Option(..., "--model", "-m"),
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
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Set thresholds from normal images at a target false-reject rate; stored in the model file."""
    _setup(verbose)
    from imganom.data.discovery import find_images, is_mvtec_root, scan_mvtec
    from imganom.formats.modelfile import ModelFileError, resolve_model_path, save_model, update_calibration
    from imganom.inference.inspector import Inspector
    from imganom.workflows.calibrate import calibrate

    try:
        insp = Inspector.load(model)
    except ModelFileError as e:
        _fail(str(e))
    root = data / "test" / "good" if is_mvtec_root(data) else data
    paths = find_images(root)
    if not paths:
        _fail(f"no images found under {root}")
    cfg = insp.cfg.calibration
    if target_fpr is not None:
        cfg = cfg.model_copy(update={"target_fpr": target_fpr})
    lab = None
    if labeled is not None:
        lay = scan_mvtec(labeled)
        lab = [(it.path, it.label) for it in lay.test]
    cal, stats = calibrate(insp, paths, cfg, labeled=lab, keep_stats=not restat)
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


def _load_inspector(
    model: Path,
    device: str,
    precision: str,
    image_threshold: float | None = None,
    pixel_threshold: float | None = None,
    threshold_source: str = "normal",
    roi: Path | None = None,
):
    """A model file (or an ``.onnx`` export, via onnxruntime) with threshold overrides and ROI; exits 2 on
    a bad model, missing onnxruntime or a bad ROI."""
    from imganom.formats.modelfile import ModelFileError

    kw = dict(
        image_threshold=image_threshold, pixel_threshold=pixel_threshold, threshold_source=threshold_source
    )
    try:
        if Path(model).suffix.lower() == ".onnx":
            from imganom.export.onnx import OnnxInspector

            insp = OnnxInspector.load(model, **kw)
        else:
            from imganom.inference.inspector import Inspector

            insp = Inspector.load(model, device=device, precision=precision, **kw)
    except ImportError as e:
        _fail(f".onnx models need onnxruntime (pip install 'imganom[export]'): {e}")
    except (ModelFileError, ValueError) as e:
        _fail(str(e))
    if roi is not None:
        from imganom.ops.postprocess import load_roi

        try:
            insp.roi = load_roi(roi, tuple(insp.cfg.preprocess.size))
        except ValueError as e:
            _fail(str(e))
    if not insp.calibrated:
        console.print(
            "[yellow]warning:[/yellow] model is not calibrated: no verdicts or masks "
            "(run imganom calibrate, or pass --image-threshold/--pixel-threshold)"
        )
    return insp


@app.command()
def inspect(
    model: Path = typer.Option(..., "--model", "-m", help="Model file or run directory."),
    inputs: list[Path] = typer.Option(
        ..., "--input", "-i", help="Folder, image file or .txt list (repeatable)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    recursive: bool = typer.Option(True, "--recursive/--no-recursive"),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    device: str = typer.Option("auto", "--device"),
    precision: str = typer.Option("auto", "--precision"),
    workers: int = typer.Option(2, "--workers", min=0, help="Decoding worker processes."),
    resume: bool = typer.Option(False, "--resume", help="Skip inputs already in OUT/results.jsonl."),
    fail_on_ng: bool = typer.Option(False, "--fail-on-ng", help=f"Exit {EXIT_NG} if any image is NG."),
    image_threshold: float | None = typer.Option(
        None, "--image-threshold", help="Override the calibrated value."
    ),
    pixel_threshold: float | None = typer.Option(
        None, "--pixel-threshold", help="Override the calibrated value."
    ),
    threshold_source: str = typer.Option("normal", "--threshold-source", help="normal | f1_max"),
    roi: Path | None = typer.Option(None, "--roi", help="Region-of-interest mask image (nonzero = inspect)."),
    raw_maps: str | None = typer.Option(
        None, "--raw-maps", help="Also save raw maps: npy (float16) | png16."
    ),
    no_report: bool = typer.Option(False, "--no-report", help="Skip report.html."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Inspect images; writes results.csv/jsonl, masks, heatmaps, overlays, summary.json and report.html."""
    _setup(verbose)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from imganom.reporting.writers import OutputOptions
    from imganom.workflows.inspect import run_inspect

    if raw_maps not in (None, "npy", "png16"):
        _fail(f"--raw-maps must be npy or png16, got {raw_maps!r}")
    insp = _load_inspector(model, device, precision, image_threshold, pixel_threshold, threshold_source, roi)
    progress = Progress(
        TextColumn("inspect"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[ips]:.1f} img/s  NG {task.fields[ng]}  errors {task.fields[err]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not sys.stderr.isatty(),
    )
    t0 = [0.0]
    import time

    with progress:
        task = progress.add_task("inspect", total=None, ips=0.0, ng=0, err=0)

        def on_progress(st) -> None:
            if not t0[0]:
                t0[0] = time.perf_counter()
            el = max(time.perf_counter() - t0[0], 1e-6)
            progress.update(
                task,
                total=st.total,
                completed=st.done,
                ng=st.ng,
                err=st.error,
                ips=(st.done - st.skipped) / el,
            )

        try:
            rows, summary = run_inspect(
                insp,
                inputs,
                out,
                recursive=recursive,
                batch_size=batch_size,
                workers=workers,
                resume=resume,
                options=OutputOptions(raw_maps=raw_maps),
                report=not no_report,
                on_progress=on_progress,
            )
        except FileNotFoundError as e:
            _fail(str(e))
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


@app.command()
def demo(
    out: Path = typer.Option(Path("imganom-demo"), "--out", "-o", help="Folder for data and results."),
    train_if_missing: bool = typer.Option(
        True,
        "--train-if-missing/--no-train",
        help="Train the demo model if weights/demo.safetensors is absent.",
    ),
) -> None:
    """The whole story offline: synthetic data, the shipped demo model, inspection, report."""
    _setup()
    from imganom.workflows.demo import run_demo

    summary, report = run_demo(out, train_if_missing=train_if_missing, log=console.print)
    c = summary["counts"]
    console.print(
        f"[bold]{c['total']} images inspected:[/bold] {c['ok']} OK, {c['ng']} NG, {c['error']} errors"
    )
    print(report)


@app.command()
def info(model: Path = typer.Argument(..., help="Model file or run directory.")) -> None:
    """Print a model file's metadata as JSON."""
    from dataclasses import asdict

    from imganom.formats.modelfile import ModelFileError, read_meta

    try:
        meta = read_meta(model)
    except ModelFileError as e:
        _fail(str(e))
    print(json.dumps(asdict(meta), indent=2, default=str))


def _register_extensions() -> None:
    """Commands that live in their own module of ``imganom.cli`` (each defines ``register(app)``; heavy
    imports stay inside the command bodies so ``imganom --help`` is fast)."""
    from imganom.cli import evaluate, export, serve, watch

    for mod in (serve, watch, export, evaluate):
        mod.register(app)


_register_extensions()


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
