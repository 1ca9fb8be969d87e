"""``imganom watch``: inspect images as they arrive in a folder; contract in ``workflows.watch``."""

from __future__ import annotations

from pathlib import Path

import typer

from imganom.cli.common import EXIT_RUNTIME, console, fail, setup
from imganom.cli.options import (
    BatchSizeOpt,
    ModelOptions,
    OverlaysOpt,
    RawMapsOpt,
    RecursiveOpt,
    VerboseOpt,
    check_overlays,
    check_raw_maps,
    with_model_options,
)


@with_model_options
def watch(
    model: ModelOptions,
    in_dir: Path = typer.Argument(..., help="Folder to watch for new images."),
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
    retry_s: float = typer.Option(
        30.0,
        "--retry-s",
        min=0.0,
        help="A file that cannot be decoded is read again until unchanged this long (a writer pausing "
        "mid-file), then it gets its error row and goes to error/.",
    ),
    once: bool = typer.Option(False, "--once", help="Process the files present now, then exit."),
    recursive: RecursiveOpt = True,
    batch_size: BatchSizeOpt = 16,
    raw_maps: RawMapsOpt = None,
    overlays: OverlaysOpt = "ng",
    no_report: bool = typer.Option(False, "--no-report", help="Skip report.html on exit."),
    verbose: VerboseOpt = False,
) -> None:
    """Inspect images as they arrive in IN_DIR, then move them to done/ (or error/). SIGTERM or Ctrl-C
    finish the current batch and exit 0 (a second Ctrl-C aborts)."""
    import signal
    import threading

    setup(verbose)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if signum == signal.SIGINT and stop.is_set():
            raise KeyboardInterrupt  # a second Ctrl-C aborts the batch in hand
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        check_raw_maps(raw_maps)
        check_overlays(overlays)
        if not in_dir.is_dir():
            fail(f"watched folder not found: {in_dir}")
        insp = model.load()

        from imganom.reporting.writers import OutputOptions
        from imganom.workflows.watch import FolderWatcher, WatchError, WatchOptions, WatchStats

        opts = WatchOptions(done=done, error=error, poll_s=poll_s, settle_s=settle_s, retry_s=retry_s,
                            recursive=recursive, batch_size=batch_size, once=once,
                            outputs=OutputOptions(raw_maps=raw_maps, overlays=overlays),
                            report=not no_report)  # fmt: skip

        def on_batch(st: WatchStats) -> None:
            extra = f" ({st.recovered} from an interrupted run)" if st.recovered else ""
            msg = f"{st.files} files, {st.rows} rows: {st.ok - st.ng} OK, {st.ng} NG, {st.error} errors"
            console.print(msg + extra)

        try:
            watcher = FolderWatcher(insp, in_dir, out, opts, on_batch=on_batch)
        except (WatchError, ValueError) as e:  # ValueError: results.jsonl corrupt before its last line
            fail(str(e))
        console.print(f"watching {in_dir} -> {out} (done: {watcher.done_dir}, error: {watcher.error_dir})")
        try:
            st = watcher.run(stop)
        except Exception as e:  # noqa: BLE001 - report, exit 1
            fail(f"{type(e).__name__}: {e}", EXIT_RUNTIME)
        console.print(f"stopped: {st.files} files moved, {st.rows} rows ({st.error} errors) in {out}")
    finally:  # restore the handlers (matters when the command runs in-process, e.g. CliRunner)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
