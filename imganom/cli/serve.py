"""``imganom serve``: the HTTP inspection service (``imganom.serve.app``) under uvicorn, one process.

SIGTERM / Ctrl-C stop accepting connections, let in-flight requests finish (the batcher drains its queue)
and exit 0. Binding beyond loopback needs a bearer token (``--token`` or ``IMGANOM_TOKEN``).
"""

from __future__ import annotations

import typer

from imganom.cli.common import console, fail, setup
from imganom.cli.options import (
    ModelOptions,
    with_model_options,
)


def check_bind(host: str, token: str | None, what: str = "the service") -> None:
    """Exit with a usage error for an empty token, or a non-loopback ``host`` without one."""
    from imganom.serve.server import is_loopback

    if token is not None and not token.strip():
        fail("--token / IMGANOM_TOKEN is empty")
    if token is None and not is_loopback(host):
        fail(
            f"--host {host} exposes {what} beyond this machine: set a bearer token with --token or "
            "the IMGANOM_TOKEN environment variable (or bind 127.0.0.1)"
        )


@with_model_options
def serve(
    model: ModelOptions,
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Bind address; beyond loopback (e.g. 0.0.0.0) it needs --token."
    ),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    token: str | None = typer.Option(
        None,
        "--token",
        envvar="IMGANOM_TOKEN",
        show_envvar=True,
        help="Bearer token every request must send (Authorization: Bearer TOKEN); /healthz and /readyz "
        "stay open. Required when --host is not a loopback address.",
    ),
    docs: bool = typer.Option(False, "--docs", help="Serve /docs, /redoc and /openapi.json (default: off)."),
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
    max_image_mb: float = typer.Option(
        64.0,
        "--max-image-mb",
        min=0.001,
        help="Decoded image limit, H*W*channels*bytes per sample, checked from the header (413); never "
        "above the model's preprocess.max_bytes.",
    ),
    max_inflight_mb: float = typer.Option(
        1024.0,
        "--max-inflight-mb",
        min=1.0,
        help="Request bodies and decoded images held at once by all requests (503 beyond).",
    ),
    timeout_s: float = typer.Option(30.0, "--timeout-s", min=0.001, help="Per-request time limit (504)."),
    read_timeout_s: float = typer.Option(
        10.0, "--read-timeout-s", min=0.001, help="Headers, then the body, must arrive in this time (408)."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Info logging and an access log."),
) -> None:
    """Serve POST /v1/inspect (+ /healthz, /readyz, /v1/model, /metrics) with micro-batching."""
    import signal

    setup(verbose)
    try:
        from imganom.serve.app import ServeSettings, create_app
        from imganom.serve.server import make_server
    except ImportError as e:
        fail(f"{e.name} is not installed; install the server extras: pip install 'imganom[serve]'")
    check_bind(host, token)
    insp = model.load(require_calibrated=True)
    try:
        settings = ServeSettings(
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            max_queue=max_queue,
            max_body_mb=max_body_mb,
            max_pixels=max_pixels,
            timeout_s=timeout_s,
            read_timeout_s=read_timeout_s,
            max_image_mb=max_image_mb,
            max_inflight_mb=max_inflight_mb,
            token=token,
            docs=docs,
        )
        api = create_app(insp, settings)
    except ValueError as e:
        fail(str(e))
    server = make_server(
        api, host, port, read_timeout_s=read_timeout_s, graceful_s=timeout_s + 5, verbose=verbose
    )

    # uvicorn installs its own SIGTERM/SIGINT handlers while serving and re-raises the signal afterwards;
    # this handler receives that re-raise (and any signal before uvicorn's are in place), so a graceful
    # stop exits 0 instead of dying by the signal.
    def _stop(_sig: int, _frame: object) -> None:
        server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    auth = "bearer token required" if token else "no authentication (loopback only)"
    console.print(
        f"imganom serve: model {insp.model_id} ({insp.cfg.name}) on {insp.device}, "
        f"http://{host}:{port}/v1/inspect ({auth})",
        soft_wrap=True,
    )
    server.run()
    if not server.started:
        raise typer.Exit(1)  # e.g. the port is taken (uvicorn logged why)
