"""Options that several commands share, and ``ModelOptions``: the one way a command gets its inspector.

``inspect``, ``evaluate``, ``watch`` and ``serve`` take the same model options (``--model`` as a model file,
run directory or ``.onnx`` export; ``--roi``; ``--image-threshold`` / ``--pixel-threshold`` /
``--threshold-source``; ``--device``; ``--precision``; ``--backend``; ``--threads``), declared once here
(``with_model_options``), with the same meaning and the same errors (exit 2). Only typer and the standard
library are imported here, so ``imganom --help`` stays fast.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from imganom.cli.common import console, fail

if TYPE_CHECKING:
    from imganom.inference.inspector import Inspector

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BACKENDS = ("torch", "onnxruntime", "openvino", "auto")  # inference.loader.CHOICES (not imported: --help)
THRESHOLD_SOURCES = ("normal", "f1_max")
RAW_MAP_FORMATS = ("npy", "png16")

ModelOpt = Annotated[
    Path,
    typer.Option("--model", "-m", help="Model file (.safetensors), run directory, export (.onnx, .xml IR)."),
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
BackendOpt = Annotated[
    str | None,
    typer.Option(
        "--backend",
        help="torch | onnxruntime | openvino | auto (fastest here, measured once and cached). "
        "Default: torch for model files, onnxruntime for .onnx, openvino for .xml.",
    ),
]
ThreadsOpt = Annotated[
    int | None, typer.Option("--threads", min=1, help="Inference threads of the backend (default: its own).")
]
UncertaintyOpt = Annotated[
    int | None,
    typer.Option(
        "--uncertainty-samples", min=1, max=256,
        help="Monte-Carlo latent samples per image (torch backend): uncertainty map, region and verdict "
        "confidence. 1 = off. Default: the model's uncertainty.samples.",
    ),
]  # fmt: skip
ReviewBelowOpt = Annotated[
    float | None,
    typer.Option(
        "--review-below", min=0.0, max=1.0,
        help="Verdicts whose confidence is below this read 'review' (needs --uncertainty-samples >= 2).",
    ),
]  # fmt: skip
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1)]
WorkersOpt = Annotated[
    int, typer.Option("--workers", min=0, help="Decoding workers (processes; inspect: see --decode).")
]
RecursiveOpt = Annotated[bool, typer.Option("--recursive/--no-recursive")]
RawMapsOpt = Annotated[
    str | None, typer.Option("--raw-maps", help="Also save raw maps: npy (float16) | png16.")
]
NoReportOpt = Annotated[bool, typer.Option("--no-report", help="Skip report.html.")]
OverlaysOpt = Annotated[
    str, typer.Option("--overlays", help="Overlay images for: ng (every image but the OK ones) | all | none.")
]
OVERLAYS = ("all", "ng", "none")  # reporting.writers.OVERLAYS (not imported: --help stays fast)
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v")]


def check_raw_maps(raw_maps: str | None) -> None:
    """Exit 2 unless ``--raw-maps`` is empty, npy or png16."""
    if raw_maps is not None and raw_maps not in RAW_MAP_FORMATS:
        fail(f"--raw-maps must be npy or png16, got {raw_maps!r}")


def check_overlays(overlays: str) -> None:
    """Exit 2 unless ``--overlays`` is all, ng or none."""
    if overlays not in OVERLAYS:
        fail(f"--overlays must be all, ng or none, got {overlays!r}")


@dataclass(frozen=True)
class ModelOptions:
    """The shared model options of one command line (see ``with_model_options``)."""

    model: Path
    device: str = "auto"
    precision: str = "auto"
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    threshold_source: str = "normal"
    roi: Path | None = None
    backend: str | None = None
    threads: int | None = None
    uncertainty: int | None = None
    review_below: float | None = None

    def load(self, *, require_calibrated: bool = False) -> Inspector:
        """The inspector for ``--model`` (an ``.onnx`` export runs in onnxruntime), threshold overrides and
        ``--roi`` applied. Exits 2 on a bad option, model, device or ROI, or a missing onnxruntime. An
        uncalibrated model is an error with ``require_calibrated``, else a warning."""
        if self.precision not in PRECISIONS:
            fail(f"--precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.backend is not None and self.backend not in BACKENDS:
            fail(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.threshold_source not in THRESHOLD_SOURCES:
            sources = ", ".join(THRESHOLD_SOURCES)
            fail(f"--threshold-source must be one of {sources}, got {self.threshold_source!r}")
        for flag, value in (
            ("--image-threshold", self.image_threshold),
            ("--pixel-threshold", self.pixel_threshold),
        ):
            if value is not None and not math.isfinite(value):  # NaN would pass every image as OK
                fail(f"{flag} must be a finite number, got {value}")
        from imganom.formats.modelfile import ModelFileError
        from imganom.inference import load_inspector

        kw = asdict(self)
        try:
            insp = load_inspector(kw.pop("model"), **kw)
        except ImportError as e:
            suffix = self.model.suffix.lower()
            if suffix not in (".onnx", ".xml") and self.backend in (None, "torch"):
                raise
            name = self.backend or ("openvino" if suffix == ".xml" else "onnxruntime")
            fail(
                f"the {name} backend is not installed "
                f"(pip install 'imganom[{'openvino' if name == 'openvino' else 'export'}]'): {e}"
            )
        except (ModelFileError, ValueError, RuntimeError) as e:  # a bad ROI, threshold source; a bad device
            fail(str(e))
        if insp.cfg.postprocess.roi == "file" and insp.roi is None:
            fail(f"{self.model}: the model's postprocess.roi is 'file': pass the inspected region with --roi")
        if insp.uncertainty >= 2 and insp.model is None:
            name = insp.backend_info["name"]
            console.print(f"[yellow]warning:[/yellow] the {name} backend runs a deterministic graph: "
                          "no Monte-Carlo uncertainty (use --backend torch)")  # fmt: skip
        elif insp.review_below is not None and insp.uncertainty < 2:
            console.print("[yellow]warning:[/yellow] --review-below needs --uncertainty-samples >= 2")
        if not insp.calibrated:
            if require_calibrated:
                fail("model is not calibrated (no image/pixel thresholds): run imganom calibrate first")
            console.print(
                "[yellow]warning:[/yellow] model is not calibrated: no verdicts or masks "
                "(run imganom calibrate, or pass --image-threshold/--pixel-threshold)"
            )
        return insp


_MODEL_OPTIONS = {  # ModelOptions field -> (annotation with its typer option, default)
    "model": (ModelOpt, inspect.Parameter.empty),
    "device": (DeviceOpt, "auto"),
    "precision": (PrecisionOpt, "auto"),
    "image_threshold": (ImageThresholdOpt, None),
    "pixel_threshold": (PixelThresholdOpt, None),
    "threshold_source": (ThresholdSourceOpt, "normal"),
    "roi": (RoiOpt, None),
    "backend": (BackendOpt, None),
    "threads": (ThreadsOpt, None),
    "uncertainty": (UncertaintyOpt, None),
    "review_below": (ReviewBelowOpt, None),
}


def with_model_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a typer command the shared model options; it receives them as one ``ModelOptions`` in its
    ``model`` parameter. ``--model`` is listed first, the other model options after the command's own (before
    ``--verbose``)."""
    own = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for p in inspect.signature(command, eval_str=True).parameters.values()
        if p.name != "model"
    ]
    shared = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        for name, (annotation, default) in _MODEL_OPTIONS.items()
    ]

    @functools.wraps(command)
    def run(**kw: Any) -> Any:
        # Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a busy 2-core machine
        # spinning threads took the CPU the other threads needed (torch forward at 128 px 2x faster, end to
        # end ~1.2x; docs/BENCHMARKS.md). OMP_WAIT_POLICY set by the user wins.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        opts = ModelOptions(**{name: kw.pop(name) for name in _MODEL_OPTIONS})
        return command(model=opts, **kw)

    cut = next((k for k, p in enumerate(own) if p.name == "verbose"), len(own))  # --verbose stays last
    params = [shared[0], *own[:cut], *shared[1:], *own[cut:]]
    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    run.__annotations__ = {}  # typer reads the (already evaluated) annotations from the signature
    return run
