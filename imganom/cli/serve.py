"""``imganom serve``: the HTTP inspection service (``imganom.serve.app``) under uvicorn, one process.

SIGTERM / Ctrl-C stop accepting connections, let in-flight requests finish (the batcher drains its queue)
and exit 0.
"""

from __future__ import annotations

import typer

from imganom.cli.common import console, fail, setup
from imganom.cli.options import (
    ModelOptions,
    with_model_options,
)


@with_model_options
def serve(
    model: ModelOptions,
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address (0.0.0.0 exposes it to the network)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    max_batch: int = typer.Option(16, "--max-batch", min=1, help="Most images per device batch."),
    max_wait_ms: float = typer.Option(
        5.0, "--max-wait-ms", min=0.0, help="How long a batch waits for more images."
    ),
    max_queue: int = typer.Option(
        256, "--max-queue", min=1, help="Decoded images waiting for the device; beyond it: 503."
    ),
    max_body_mb: float = typer.Option(50.0, "--max-body-mb", min=0.001, help="Request body limit (413)."),
    max_pixels: int | None = typer.Option(
        None, "--max-pixels", min=1, help="Image size limit H*W (413); default: the model's."
    ),
    timeout_s: float = typer.Option(30.0, "--timeout-s", min=0.001, help="Per-request time limit (504)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Info logging and an access log."),
) -> None:
    """Serve POST /v1/inspect (+ /healthz, /readyz, /v1/model, /metrics) with micro-batching."""
    import signal

    setup(verbose)
    try:
        import uvicorn

        from imganom.serve.app import ServeSettings, create_app
    except ImportError as e:
        fail(f"{e.name} is not installed; install the server extras: pip install 'imganom[serve]'")
    insp = model.load(require_calibrated=True)
    try:  # ServeSettings fields in order
        settings = ServeSettings(max_batch, max_wait_ms, max_queue, max_body_mb, max_pixels, timeout_s)
        api = create_app(insp, settings)
    except ValueError as e:
        fail(str(e))

    config = uvicorn.Config(
        api,
        host=host,
        port=port,
        log_level="info" if verbose else "warning",
        access_log=verbose,
        timeout_graceful_shutdown=timeout_s + 5,
    )
    server = uvicorn.Server(config)

    # uvicorn installs its own SIGTERM/SIGINT handlers while serving and re-raises the signal afterwards;
    # this handler receives that re-raise (and any signal before uvicorn's are in place), so a graceful
    # stop exits 0 instead of dying by the signal.
    def _stop(_sig: int, _frame: object) -> None:
        server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    console.print(
        f"imganom serve: model {insp.model_id} ({insp.cfg.name}) on {insp.device}, "
        f"http://{host}:{port}/v1/inspect",
        soft_wrap=True,
    )
    server.run()
    if not server.started:
        raise typer.Exit(1)  # e.g. the port is taken (uvicorn logged why)
