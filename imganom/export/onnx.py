"""ONNX export of the inspection graph: the VAE and the ``AnomalyHead`` the torch Inspector runs, traced.

The graph (``InspectionGraph``) has one input ``images`` (N, C, h, w) float32, preprocessed (model size,
intensity-normalised to [0, 1]) with a dynamic batch axis, and the head's outputs:

* ``anomaly_map`` (N, h, w) float32: the smoothed model-resolution map, exactly the torch backend's
  (standardisation and multi-scale statistics baked in as constants);
* ``score`` (N,): the image score of that map under ``postprocess.score`` with ``postprocess.border``
  applied; the Inspector's score for a model-sized input without ROI (the Inspector itself scores the map
  resampled to the original size, on either backend);
* ``elbo`` (N,): the per-view negative ELBO; and ``score_map`` with ``map.standardize = "score"``.

Everything that is not a model property goes into ``metadata_props`` (``formats.onnxfile``): thresholds,
calibration, config, model id, export details; recalibration is a metadata edit
(``export.metadata.update_onnx_thresholds``). Load an exported file with ``inference.load_inspector``.

Not exported: Monte-Carlo sampling (``map.mc_samples > 0``) needs random draws per call; ``export_onnx``
refuses such a model unless ``allow_mc=True``, which exports the deterministic mean-decoding map and stores
the config with ``mc_samples: 0`` (so the file describes what it computes; thresholds calibrated with MC may
no longer fit). ROI masks and tiling/letterbox geometry are applied outside the graph, by the Inspector.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from imganom.config import Config
from imganom.export.metadata import update_onnx_thresholds, write_meta_props
from imganom.formats.modelfile import load_model, resolve_model_path
from imganom.formats.onnxfile import INPUT_NAME, open_session, read_onnx_meta
from imganom.formats.onnxgraph import DEFAULT_OPSET, GraphTraceError, InspectionGraph, trace_onnx
from imganom.ops.head import AnomalyHead
from imganom.utils.files import atomic_path

__all__ = [
    "DEFAULT_OPSET", "PARITY_RTOL", "PARITY_RTOL_STANDARDIZED", "ExportError", "ExportReport",
    "InspectionGraph", "UnsupportedModelError", "export_onnx", "read_onnx_meta", "update_onnx_thresholds",
]  # fmt: skip

# Parity ONNX vs torch (``--check`` and the tests): max |onnx - torch| of a map relative to its max |value|.
# Both sides are fp32; the SSIM variance terms E[x^2] - E[x]^2 lose ~5e-5 absolute to cancellation in either
# implementation (measured against float64), so summation order alone moves maps by ~1e-5 of their max.
# Standardised maps divide that by the per-pixel normal std (floored at 0.1 x its mean): 10x looser.
PARITY_RTOL = 1e-4
PARITY_RTOL_STANDARDIZED = 1e-3


class ExportError(RuntimeError):
    """The model could not be exported, or the exported graph failed its checks."""


class UnsupportedModelError(ExportError):
    """The model's config asks for something the graph cannot compute (a usage error, not a failure)."""


@dataclass
class ExportReport:
    """What ``export_onnx`` did."""

    path: Path
    opset: int
    exporter: str  # 'torchscript' or 'dynamo'
    seconds: float
    size_bytes: int
    max_rel_diff: float | None = None  # --check: max |onnx - torch| / max|map| over the check batches
    notes: list[str] = field(default_factory=list)


def _parity(graph: InspectionGraph, path: Path, cfg: Config, threads: int | None) -> float:
    """Max relative difference ONNX vs torch on batches of 1 and 3 (also exercises the dynamic batch axis)."""
    sess = open_session(path, ["CPUExecutionProvider"], threads)
    gen = torch.Generator().manual_seed(0)
    c, (h, w) = cfg.preprocess.channels, cfg.preprocess.size
    worst = 0.0
    for n in (1, 3):
        # smooth random images in [0, 1]: closer to real inputs than white noise
        x = F.interpolate(torch.rand(n, c, h // 4, w // 4, generator=gen), size=(h, w), mode="bilinear")
        with torch.no_grad():
            ref = [t.numpy() for t in graph(x)]
        got = sess.run(list(graph.output_names), {INPUT_NAME: x.numpy()})
        for name, a, b in zip(graph.output_names, got, ref):
            if a.shape != b.shape:
                raise ExportError(f"check: {name} has shape {a.shape} for batch {n}, expected {b.shape}")
        scale = max(float(np.abs(ref[0]).max()), 1e-6)
        worst = max(
            worst,
            float(np.abs(got[0] - ref[0]).max()) / scale,
            float(np.abs(got[1] - ref[1]).max() / np.maximum(np.abs(ref[1]), 1e-6).max()),
        )
    return worst


def export_onnx(
    model_path: str | Path,
    out: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    check: bool = False,
    allow_mc: bool = False,
    threads: int | None = None,
) -> ExportReport:
    """Export a model file (or run directory) to ONNX with imganom metadata; validates with onnx.checker.

    ``check=True`` also runs onnxruntime against the torch graph (batches 1 and 3) and raises ExportError
    when the map differs by more than ``PARITY_RTOL`` of its max (``PARITY_RTOL_STANDARDIZED`` for a
    standardised map). Raises ModelFileError for a bad model file, UnsupportedModelError for an MC model
    without ``allow_mc``. The file appears atomically, only once every check passed.
    """
    import onnx

    t0 = time.perf_counter()
    src = resolve_model_path(model_path)
    model, meta, stats = load_model(src)
    cfg = meta.cfg
    notes: list[str] = []
    if cfg.map.mc_samples:
        if not allow_mc:
            raise UnsupportedModelError(
                f"map.mc_samples={cfg.map.mc_samples}: Monte-Carlo sampling is not exported; "
                "pass allow_mc (--allow-mc) to export the deterministic mean-decoding map"
            )
        notes.append(
            f"map.mc_samples={cfg.map.mc_samples} dropped: the graph decodes the posterior mean only"
        )
        cfg = cfg.model_copy(update={"map": cfg.map.model_copy(update={"mc_samples": 0})})
    if cfg.map.standardize != "off" and "map_mean" not in stats:
        notes.append("map.standardize is set but the model has no stats (uncalibrated): not standardised")
    if cfg.map.scales and "scale_mean" not in stats:
        notes.append("map.scales is set but the model has no scale stats (uncalibrated): single scale")
    graph = InspectionGraph(model.float().cpu(), AnomalyHead(cfg, stats, backend="torch"))
    out = Path(out)
    with atomic_path(out) as tmp:
        example = torch.rand(2, cfg.preprocess.channels, *cfg.preprocess.size)
        try:
            exporter = trace_onnx(graph, example, tmp, opset)
        except GraphTraceError as e:
            raise ExportError(str(e)) from None
        proto = onnx.load(str(tmp))
        standardized = graph.head.standardize != "off"
        info = {
            "opset": opset,
            "exporter": exporter,
            "torch": torch.__version__,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "source": src.name,
            "input": {INPUT_NAME: ["batch", cfg.preprocess.channels, *cfg.preprocess.size]},
            "outputs": list(graph.output_names),
            "score": cfg.postprocess.score,
            "standardized": standardized,
            "scales": graph.head.scales,
            "sigma": cfg.postprocess.sigma,
            "notes": notes,
        }
        write_meta_props(proto, meta, cfg, info)
        try:
            onnx.checker.check_model(proto, full_check=True)
        except onnx.checker.ValidationError as e:
            raise ExportError(f"exported graph failed onnx.checker: {e}") from None
        onnx.save(proto, str(tmp))
        diff = None
        if check:
            diff = _parity(graph, tmp, cfg, threads)
            tol = PARITY_RTOL_STANDARDIZED if standardized or graph.head.scales else PARITY_RTOL
            if not diff <= tol:
                raise ExportError(
                    f"check failed: onnxruntime differs from torch by {diff:.3g} of the map max "
                    f"(tolerance {tol})"
                )
    return ExportReport(out, opset, exporter, time.perf_counter() - t0, out.stat().st_size, diff, notes)
