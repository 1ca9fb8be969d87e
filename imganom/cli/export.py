"""``imganom export``: a model file to ONNX (graph + imganom metadata); see ``imganom.export.onnx``."""

from __future__ import annotations

from pathlib import Path

import typer

from imganom.cli.common import EXIT_RUNTIME, console, fail, setup
from imganom.cli.options import VerboseOpt


def export(
    model: Path = typer.Option(..., "--model", "-m", help="Model file or run directory."),
    fmt: str = typer.Option("onnx", "--format", "-f", help="Export format (onnx)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output file, e.g. model.onnx."),
    opset: int = typer.Option(18, "--opset", min=17, max=21, help="ONNX opset."),
    check: bool = typer.Option(
        False,
        "--check",
        help="Also compare onnxruntime against torch (batches 1 and 3); exit 1 on mismatch.",
    ),
    allow_mc: bool = typer.Option(
        False, "--allow-mc", help="Export a map.mc_samples model as its deterministic mean-decoding map."
    ),
    verbose: VerboseOpt = False,
) -> None:
    """Export the inspection graph (map, score, ELBO) to ONNX; thresholds + config go in its metadata."""
    setup(verbose)
    if fmt.lower() != "onnx":
        fail(f"--format must be onnx, got {fmt!r}")
    try:
        from imganom.export.onnx import ExportError, UnsupportedModelError, export_onnx
        from imganom.formats.modelfile import ModelFileError
    except ImportError as e:  # onnx / onnxruntime missing
        fail(f"ONNX export needs the [export] extra (pip install 'imganom[export]'): {e}", EXIT_RUNTIME)
    try:
        rep = export_onnx(model, out, opset=opset, check=check, allow_mc=allow_mc)
    except (ModelFileError, UnsupportedModelError) as e:
        fail(str(e))
    except ExportError as e:
        fail(str(e), EXIT_RUNTIME)
    for note in rep.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    msg = f"exported with the {rep.exporter} exporter, opset {rep.opset}, {rep.size_bytes / 1e6:.1f} MB"
    msg += f", {rep.seconds:.1f}s"
    if rep.max_rel_diff is not None:
        msg += f"; check: onnxruntime vs torch max map difference {rep.max_rel_diff:.2g} of the map max"
    console.print(msg)
    print(rep.path)
