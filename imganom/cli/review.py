"""``imganom review``: the web app where reviewers confirm or overturn an ``inspect`` folder's verdicts."""

from __future__ import annotations

from pathlib import Path

import typer

from imganom.cli.common import console, fail, setup
from imganom.cli.options import VerboseOpt
from imganom.cli.serve import check_bind


def review(
    results_dir: Path = typer.Argument(..., help="An imganom inspect output folder (results.jsonl)."),
    model: Path | None = typer.Option(
        None, "--model", "-m", help="Model file whose id is recorded with each decision (default: the run's)."
    ),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Bind address; beyond loopback (e.g. 0.0.0.0) it needs --token."
    ),
    port: int = typer.Option(8765, "--port", min=0, max=65535),
    reviewer: str | None = typer.Option(
        None, "--reviewer", help="Default reviewer name (the page can change it)."
    ),
    token: str | None = typer.Option(
        None,
        "--token",
        envvar="IMGANOM_TOKEN",
        show_envvar=True,
        help="Shared secret every request must carry (open /?token=TOKEN once in the browser). Required when "
        "--host is not a loopback address.",
    ),
    verbose: VerboseOpt = False,
) -> None:
    """Review verdicts in the browser: decisions go to RESULTS_DIR/reviews.jsonl (append-only)."""
    setup(verbose)
    try:
        from imganom.serve.review import create_review_app
        from imganom.serve.server import make_server
    except ImportError as e:
        fail(f"{e.name} is not installed; install the server extras: pip install 'imganom[serve]'")
    check_bind(host, token, "the review app")
    model_id = None
    if model is not None:
        from imganom.formats.modelfile import ModelFileError, read_meta

        try:
            model_id = read_meta(model).model_id
        except ModelFileError as e:
            fail(str(e))
    try:
        app = create_review_app(results_dir, model_id=model_id, reviewer=reviewer, token=token)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    server = make_server(app, host, port, read_timeout_s=30.0, graceful_s=5.0, verbose=verbose)
    url = f"http://{host}:{port}/" + (f"?token={token}" if token else "")
    console.print(f"imganom review: {results_dir} at {url}", soft_wrap=True)
    server.run()
    if not server.started:
        raise typer.Exit(1)
