"""The ``imganom`` command line (typer): the ``app`` and its commands, one module each in ``imganom.cli``.

Each command is a thin shell over a library function; heavy imports stay inside the command bodies so
``imganom --help`` is fast. The model options shared by inspect, evaluate, watch and serve are in
``cli.options``.

Exit codes: 0 done; 1 runtime failure; 2 usage / config / model-file error; 3 ``inspect --fail-on-ng`` found
at least one NG; 130 interrupted (a resumable checkpoint was saved).
"""

from __future__ import annotations

import typer

from imganom.cli.calibrate import calibrate
from imganom.cli.demo import demo
from imganom.cli.evaluate import evaluate
from imganom.cli.export import export
from imganom.cli.info import info
from imganom.cli.inspect import inspect
from imganom.cli.review import review
from imganom.cli.serve import serve
from imganom.cli.train import train
from imganom.cli.watch import watch

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Visual anomaly inspection with a convolutional VAE.",
)
for _command in (train, calibrate, inspect, demo, info, serve, watch, export, evaluate, review):
    app.command(_command.__name__)(_command)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
