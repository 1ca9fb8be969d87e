"""Options that several commands share, and ``load_model``: the one way a command gets its inspector.

``inspect``, ``evaluate``, ``watch`` and ``serve`` take the same model options (``--model`` as a model file,
run directory or ``.onnx`` export; ``--roi``; ``--image-threshold`` / ``--pixel-threshold`` /
``--threshold-source``; ``--device``; ``--precision``) with the same meaning and the same errors (exit 2).
Only typer and pathlib are imported here, so ``imganom --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from imganom.cli.common import console, fail

if TYPE_CHECKING:
    from imganom.inference.inspector import Inspector

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
THRESHOLD_SOURCES = ("normal", "f1_max")
RAW_MAP_FORMATS = ("npy", "png16")

ModelOpt = Annotated[
    Path, typer.Option("--model", "-m", help="Model file (.safetensors), run directory or exported .onnx.")
]
RoiOpt = Annotated[
    Path | None, typer.Option("--roi", help="Region-of-interest mask image (nonzero = inspect).")
]
ImageThresholdOpt = Annotated[
    float | None, typer.Option("--image-threshold", help="Override the calibrated value.")
]
PixelThresholdOpt = Annotated[
    float | None, typer.Option("--pixel-threshold", help="Override the calibrated value.")
]
ThresholdSourceOpt = Annotated[
    str, typer.Option("--threshold-source", help="normal | f1_max (calibrated with --labeled).")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N.")]
PrecisionOpt = Annotated[str, typer.Option("--precision", help="auto | fp32 | bf16 | fp16.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1)]
WorkersOpt = Annotated[int, typer.Option("--workers", min=0, help="Decoding worker processes.")]
RecursiveOpt = Annotated[bool, typer.Option("--recursive/--no-recursive")]
RawMapsOpt = Annotated[
    str | None, typer.Option("--raw-maps", help="Also save raw maps: npy (float16) | png16.")
]
NoReportOpt = Annotated[bool, typer.Option("--no-report", help="Skip report.html.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v")]


def check_raw_maps(raw_maps: str | None) -> None:
    """Exit 2 unless ``--raw-maps`` is empty, npy or png16."""
    if raw_maps is not None and raw_maps not in RAW_MAP_FORMATS:
        fail(f"--raw-maps must be npy or png16, got {raw_maps!r}")


def load_model(
    model: Path,
    *,
    device: str = "auto",
    precision: str = "auto",
    image_threshold: float | None = None,
    pixel_threshold: float | None = None,
    threshold_source: str = "normal",
    roi: Path | None = None,
    require_calibrated: bool = False,
) -> Inspector:
    """The inspector for ``--model`` (an ``.onnx`` export runs in onnxruntime), threshold overrides and
    ``--roi`` applied. Exits 2 on a bad option, model, device or ROI, or a missing onnxruntime. An
    uncalibrated model is an error with ``require_calibrated``, else a warning."""
    if precision not in PRECISIONS:
        fail(f"--precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if threshold_source not in THRESHOLD_SOURCES:
        fail(f"--threshold-source must be one of {', '.join(THRESHOLD_SOURCES)}, got {threshold_source!r}")
    from imganom.formats.modelfile import ModelFileError
    from imganom.inference import load_inspector

    try:
        insp = load_inspector(
            model,
            device=device,
            precision=precision,
            image_threshold=image_threshold,
            pixel_threshold=pixel_threshold,
            threshold_source=threshold_source,
            roi=roi,
        )
    except ImportError as e:
        if Path(model).suffix.lower() != ".onnx":
            raise
        fail(f".onnx models need onnxruntime (pip install 'imganom[export]'): {e}")
    except (
        ModelFileError,
        ValueError,
        RuntimeError,
    ) as e:  # ValueError: e.g. a bad ROI; RuntimeError: device
        fail(str(e))
    if not insp.calibrated:
        if require_calibrated:
            fail("model is not calibrated (no image/pixel thresholds): run imganom calibrate first")
        console.print(
            "[yellow]warning:[/yellow] model is not calibrated: no verdicts or masks "
            "(run imganom calibrate, or pass --image-threshold/--pixel-threshold)"
        )
    return insp
