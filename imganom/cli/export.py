"""``imganom export``: a model file to ONNX (graph + imganom metadata; ``imganom.export.onnx``) or to an
OpenVINO IR, fp32 or with INT8 weights (``imganom.export.openvino``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from imganom.cli.common import EXIT_RUNTIME, console, fail, setup
from imganom.cli.options import VerboseOpt

FORMATS = ("onnx", "openvino")
INT8_SCOPES = ("vae", "all")  # imganom.export.openvino.SCOPES (not imported: --help stays fast)


def export(
    model: Path = typer.Option(..., "--model", "-m", help="Model file or run directory."),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx | openvino (an IR: .xml + .bin)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output file, e.g. model.onnx or model.xml."),
    opset: int = typer.Option(18, "--opset", min=17, max=21, help="ONNX opset."),
    check: bool = typer.Option(
        False,
        "--check",
        help="onnx: also compare onnxruntime against torch (batches 1 and 3); exit 1 on mismatch. "
        "openvino: compare the IR with the fp32 graph on the calibration images.",
    ),
    allow_mc: bool = typer.Option(
        False, "--allow-mc", help="Export a map.mc_samples model as its deterministic mean-decoding map."
    ),
    int8: bool = typer.Option(
        False, "--int8", help="openvino: INT8 weights (NNCF post-training quantisation on normal images)."
    ),
    calib: Path | None = typer.Option(
        None, "--calib", help="--int8: folder of normal images (default: the model's training data)."
    ),
    calib_size: int = typer.Option(300, "--calib-size", min=1, help="--int8: calibration views at most."),
    int8_scope: str = typer.Option(
        "vae", "--int8-scope", help="--int8: vae (the map arithmetic stays fp32) | all."
    ),
    verbose: VerboseOpt = False,
) -> None:
    """Export the inspection graph (map, score, ELBO) to ONNX or an OpenVINO IR; thresholds + config go in
    its metadata."""
    setup(verbose)
    fmt = fmt.lower()
    if fmt not in FORMATS:
        fail(f"--format must be onnx or openvino, got {fmt!r}")
    if fmt == "onnx" and (int8 or calib is not None):
        fail("--int8 and --calib need --format openvino")
    if int8_scope not in INT8_SCOPES:
        fail(f"--int8-scope must be vae or all, got {int8_scope!r}")
    try:
        from imganom.export.onnx import export_onnx
        from imganom.export.openvino import export_openvino

        if fmt == "openvino":
            import openvino  # noqa: F401
        if int8:
            import nncf  # noqa: F401
    except ImportError as e:  # onnx / onnxruntime / openvino / nncf missing
        extra = "openvino" if fmt == "openvino" else "export"
        fail(f"{fmt} export needs the [{extra}] extra (pip install 'imganom[{extra}]'): {e}", EXIT_RUNTIME)
    if fmt == "onnx":
        rep = _run(export_onnx, model, out, opset=opset, check=check, allow_mc=allow_mc)
        msg = f"exported with the {rep.exporter} exporter, opset {rep.opset}, {rep.size_bytes / 1e6:.1f} MB"
        msg += f", {rep.seconds:.1f}s"
        if rep.max_rel_diff is not None:
            msg += f"; check: onnxruntime vs torch max map difference {rep.max_rel_diff:.2g} of the map max"
    else:
        rep = _run(export_openvino, model, out, int8=int8, calib=calib, calib_size=calib_size,
                   scope=int8_scope, check=check, allow_mc=allow_mc)  # fmt: skip
        msg = f"OpenVINO IR ({'INT8' if int8 else 'fp32'}), {rep.size_bytes / 1e6:.1f} MB with its .bin"
        msg += f", {rep.seconds:.1f}s"
    console.print(msg)
    print(rep.path)


def _run(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """``fn(*args, **kw)``: a bad model file or an unsupported model exits 2, a failed export 1; the
    report's notes printed."""
    from imganom.export.onnx import ExportError, UnsupportedModelError
    from imganom.formats.modelfile import ModelFileError

    try:
        rep = fn(*args, **kw)
    except (ModelFileError, UnsupportedModelError) as e:
        fail(str(e))
    except ExportError as e:
        fail(str(e), EXIT_RUNTIME)
    for note in rep.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    return rep
