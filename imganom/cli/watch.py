"""``imganom watch``: inspect images as they arrive in a folder; contract in ``workflows.watch``."""

from __future__ import annotations

from pathlib import Path

import typer


def _load(model: Path, device: str, precision: str, image_threshold: float | None,
          pixel_threshold: float | None, threshold_source: str, roi: Path | None):  # fmt: skip
    """``cli._load_inspector``: model files, or ``OnnxInspector`` for ``.onnx`` exports."""
    from imganom.cli.main import _load_inspector

    return _load_inspector(model, device, precision, image_threshold, pixel_threshold, threshold_source, roi)


def register(app: typer.Typer) -> None:
    """Add the ``watch`` command to ``app``."""

    @app.command("watch")
    def watch_cmd(
        in_dir: Path = typer.Argument(..., help="Folder to watch for new images."),
        model: Path = typer.Option(..., "--model", "-m", help="Model file, run directory or exported .onnx."),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder (results, masks, heatmaps, ...)."),
        done: Path | None = typer.Option(None, "--done", help="Inspected files go here (default OUT/done)."),
        error: Path | None = typer.Option(
            None, "--error", help="Unreadable files go here, with NAME.error.txt (default OUT/error)."
        ),
        poll_s: float = typer.Option(0.5, "--poll-s", min=0.01, help="Seconds between folder scans."),
        settle_s: float = typer.Option(
            1.0,
            "--settle-s",
            min=0.0,
            help="Size and mtime must stay unchanged this long before a file is read.",
        ),
        once: bool = typer.Option(False, "--once", help="Process the files present now, then exit."),
        recursive: bool = typer.Option(True, "--recursive/--no-recursive"),
        batch_size: int = typer.Option(16, "--batch-size", min=1),
        device: str = typer.Option("auto", "--device"),
        precision: str = typer.Option("auto", "--precision"),
        image_threshold: float | None = typer.Option(None, "--image-threshold"),
        pixel_threshold: float | None = typer.Option(None, "--pixel-threshold"),
        threshold_source: str = typer.Option("normal", "--threshold-source", help="normal | f1_max"),
        roi: Path | None = typer.Option(None, "--roi", help="Region-of-interest mask image."),
        raw_maps: str | None = typer.Option(None, "--raw-maps", help="Also save raw maps: npy | png16."),
        no_report: bool = typer.Option(False, "--no-report", help="Skip report.html on exit."),
        verbose: bool = typer.Option(False, "--verbose", "-v"),
    ) -> None:
        """Inspect images as they arrive in IN_DIR, then move them to done/ (or error/). SIGTERM or Ctrl-C
        finish the current batch and exit 0 (a second Ctrl-C aborts)."""
        import signal
        import threading

        from imganom.cli.main import _fail, _setup, console

        _setup(verbose)
        stop = threading.Event()

        def on_signal(signum: int, _frame: object) -> None:
            if signum == signal.SIGINT and stop.is_set():
                raise KeyboardInterrupt  # a second Ctrl-C aborts the batch in hand
            stop.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            if raw_maps not in (None, "npy", "png16"):
                _fail(f"--raw-maps must be npy or png16, got {raw_maps!r}")
            if not in_dir.is_dir():
                _fail(f"watched folder not found: {in_dir}")
            insp = _load(model, device, precision, image_threshold, pixel_threshold, threshold_source, roi)

            from imganom.reporting.writers import OutputOptions
            from imganom.workflows.watch import FolderWatcher, WatchError, WatchOptions

            opts = WatchOptions(done=done, error=error, poll_s=poll_s, settle_s=settle_s, recursive=recursive,
                                batch_size=batch_size, once=once, outputs=OutputOptions(raw_maps=raw_maps),
                                report=not no_report)  # fmt: skip

            def on_batch(st) -> None:
                extra = f" ({st.recovered} from an interrupted run)" if st.recovered else ""
                msg = f"{st.files} files, {st.rows} rows: {st.ok - st.ng} OK, {st.ng} NG, {st.error} errors"
                console.print(msg + extra)

            try:
                watcher = FolderWatcher(insp, in_dir, out, opts, on_batch=on_batch)
            except (WatchError, ValueError) as e:  # ValueError: results.jsonl corrupt before its last line
                _fail(str(e))
            console.print(
                f"watching {in_dir} -> {out} (done: {watcher.done_dir}, error: {watcher.error_dir})"
            )
            try:
                st = watcher.run(stop)
            except Exception as e:  # noqa: BLE001 - report, exit 1
                console.print(f"[red]error:[/red] {type(e).__name__}: {e}")
                raise typer.Exit(1) from None
            console.print(f"stopped: {st.files} files moved, {st.rows} rows ({st.error} errors) in {out}")
        finally:  # restore the handlers (matters when the command runs in-process, e.g. CliRunner)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
