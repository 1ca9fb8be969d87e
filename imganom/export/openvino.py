"""OpenVINO IR export (``imganom export --format openvino [--int8]``): the ONNX export's inspection graph and
metadata as an OpenVINO IR (``model.xml`` + ``model.bin``), fp32 or with INT8 weights and activations from
NNCF's post-training quantisation, calibrated on normal images preprocessed exactly as inspection does
(``read_image`` with the model's read options, then ``prepare``: resize / letterbox / tiles).

Quantisation scope (``scope``): ``"vae"`` (default) quantises the VAE's convolutions and linear layers only
and keeps everything else in fp32 through an NNCF ignored scope: the ``AnomalyHead`` (map term, smoothing,
standardisation, score), the ELBO's KL term and the final maxima; ``"all"`` leaves the choice to NNCF, which
also quantised the map itself (magnetic_tile: every verdict OK). Measured in docs/BENCHMARKS.md.
The metadata (thresholds, config, calibration) is the ONNX export's, in the IR's ``rt_info``
(``formats.openvinoir``); ``imganom.export`` says how the weights were made (``int8``). Load the IR with
``load_inspector("model.xml")`` (openvino backend).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from imganom.config import Config
from imganom.data.discovery import normal_images
from imganom.data.preprocess import prepare
from imganom.data.readers import ImageReadError, read_image, read_options
from imganom.export.onnx import ExportError, ExportReport, export_onnx
from imganom.formats.onnxfile import INPUT_NAME, META_PREFIX, read_onnx_meta
from imganom.formats.openvinoir import IR_SUFFIX, is_ir, openvino_core, set_ir_props

SCOPES = ("vae", "all")
HEAD_PATTERN = r"(^|.*/)head/.*"  # the traced head's op names ("/head/Conv_3"; torchscript exporter)
DEFAULT_CALIB_SIZE = 300  # NNCF's default subset size
WEIGHTED_OPS = {"Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData",
                "MatMul"}  # fmt: skip  # what scope "vae" quantises (outside the head)


def calibration_images(training: dict[str, Any], calib: str | Path | None) -> tuple[Path, list[Path]]:
    """(folder, images) to calibrate on: ``calib``, else the model's training data (``training.data``);
    ``train/good`` of an MVTec-style root. Raises ExportError when there is no folder or no image."""
    src = calib if calib is not None else training.get("data")
    if not src:
        raise ExportError("--int8 needs normal images: the model records no training data; pass --calib DIR")
    try:
        return normal_images(src)
    except FileNotFoundError:
        what = "--calib" if calib is not None else "the model's training data folder"
        raise ExportError(f"{what} {src} is not a folder; pass --calib DIR with normal images") from None
    except ValueError as e:
        raise ExportError(f"{e} for INT8 calibration") from None


def calibration_views(
    paths: list[Path], cfg: Config, limit: int = DEFAULT_CALIB_SIZE
) -> tuple[list[np.ndarray], list[str]]:
    """Up to ``limit`` model inputs (1, C, h, w) float32 from ``paths`` (spread evenly over the list), each
    preprocessed as inspection does; unreadable files are skipped and named in the second list."""
    pick = (
        paths
        if len(paths) <= limit
        else [paths[i] for i in np.linspace(0, len(paths) - 1, limit).astype(int)]
    )
    views: list[np.ndarray] = []
    skipped: list[str] = []
    for p in pick:
        try:
            chw, _ = read_image(p, **read_options(cfg.preprocess))
        except ImageReadError as e:
            skipped.append(str(e))
            continue
        views.extend(np.ascontiguousarray(v[None], dtype=np.float32) for v in prepare(chw, cfg.preprocess)[0])
    return views[:limit], skipped


def quantize_int8(model: Any, views: list[np.ndarray], scope: str = "vae") -> Any:
    """NNCF post-training INT8 quantisation of an ``openvino.Model`` calibrated on ``views``.

    ``scope="vae"``: only the VAE's convolutions and linear layers (their weights and input activations) are
    quantised; every other op is in NNCF's ignored scope and stays fp32: the head (map term, smoothing,
    standardisation, score), the KL term of the ELBO and the final maxima (``all`` quantised those too and
    put the anomaly map on 256 levels: every magnetic_tile verdict flipped to OK). NNCF's default
    "performance" preset (symmetric activations): "mixed" changed more verdicts and ran slower there."""
    import nncf
    from nncf.common.logging.logger import nncf_logger

    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    names: list[str] = []
    if scope == "vae":
        ops = [(op.get_friendly_name(), op.get_type_name()) for op in model.get_ops()]
        if not any(re.fullmatch(HEAD_PATTERN, n) for n, _ in ops):
            raise ExportError("INT8: cannot find the head's ops to keep them fp32 (use scope 'all')")
        names = [n for n, t in ops if t not in WEIGHTED_OPS or re.fullmatch(HEAD_PATTERN, n)]
    ignored = nncf.IgnoredScope(names=names, validate=False) if names else None
    level = nncf_logger.level
    nncf.set_log_level(logging.WARNING)  # one INFO line per op otherwise
    try:
        return nncf.quantize(
            model,
            nncf.Dataset(views, lambda x: {INPUT_NAME: x}),
            subset_size=len(views),
            ignored_scope=ignored,
        )
    finally:
        nncf.set_log_level(level)


def _save_ir_atomic(model: Any, out: Path) -> None:
    """``openvino.save_model`` (weights as they are: no fp16 compression) to temporary names in ``out``'s
    folder, then the ``.bin`` and the ``.xml`` renamed into place (the ``.bin`` is found by the stem)."""
    import openvino as ov

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=IR_SUFFIX, dir=out.parent)
    os.close(fd)
    tmp_xml = Path(tmp)
    try:
        ov.save_model(model, str(tmp_xml), compress_to_fp16=False)
        os.replace(tmp_xml.with_suffix(".bin"), out.with_suffix(".bin"))
        os.replace(tmp_xml, out)
    finally:
        for p in (tmp_xml, tmp_xml.with_suffix(".bin")):
            p.unlink(missing_ok=True)


def _compare(ref: Any, got: Any, views: list[np.ndarray], threshold: float | None) -> dict[str, Any]:
    """The IR against the fp32 graph on ``views``: the largest map difference (of the largest map value),
    relative score differences and, with a threshold, how many views change side of it."""
    core, hint = openvino_core(), {"INFERENCE_PRECISION_HINT": "f32"}
    a, b = core.compile_model(ref, "CPU", hint), core.compile_model(got, "CPU", hint)
    map_diff, map_max, rel, flips = 0.0, 1e-12, [], 0
    for v in views:
        ra, rb = a({INPUT_NAME: v}), b({INPUT_NAME: v})
        ma, mb = ra[a.output("anomaly_map")], rb[b.output("anomaly_map")]
        sa, sb = float(ra[a.output("score")][0]), float(rb[b.output("score")][0])
        map_diff, map_max = max(map_diff, float(np.abs(mb - ma).max())), max(map_max, float(np.abs(ma).max()))
        rel.append(abs(sb - sa) / max(abs(sa), 1e-12))
        flips += threshold is not None and (sa > threshold) != (sb > threshold)
    return {
        "views": len(views),
        "max_map_diff": map_diff / map_max,
        "median_score_diff": float(np.median(rel)),
        "max_score_diff": float(np.max(rel)),
        "threshold_flips": None if threshold is None else int(flips),
    }


def _check_note(cmp: dict[str, Any]) -> str:
    note = (
        f"INT8 vs fp32 on {cmp['views']} calibration views: scores {cmp['median_score_diff']:.2%} (median), "
    )
    note += f"{cmp['max_score_diff']:.2%} (max) apart; maps {cmp['max_map_diff']:.2g} of the largest value"
    if cmp["threshold_flips"] is not None:
        note += f"; {cmp['threshold_flips']} view(s) on the other side of the image threshold"
    return note


def export_openvino(
    model_path: str | Path,
    out: str | Path,
    *,
    int8: bool = False,
    calib: str | Path | None = None,
    calib_size: int = DEFAULT_CALIB_SIZE,
    scope: str = "vae",
    check: bool = False,
    allow_mc: bool = False,
) -> ExportReport:
    """Export a model file (or run directory) to an OpenVINO IR ``out`` (``.xml``, weights in the ``.bin``
    beside it) with the ONNX export's metadata. ``int8``: quantise (``quantize_int8``) on up to ``calib_size``
    views of normal images from ``calib`` (default: the model's training data). ``check``: the ONNX export's
    check (onnxruntime against torch; ExportError beyond its tolerance) and, with ``int8``, the INT8 graph
    against fp32 on the calibration views (measured, in the notes and the metadata). Raises ModelFileError
    for a bad model file, UnsupportedModelError (an MC model without ``allow_mc``), ExportError otherwise."""
    import openvino as ov

    t0 = time.perf_counter()
    out = Path(out)
    if not is_ir(out):
        raise ExportError(
            f"--out {out}: an OpenVINO IR is written as a .xml file (weights in the .bin beside it)"
        )
    if calib_size < 1:
        raise ExportError(f"calib_size must be >= 1, got {calib_size}")
    with tempfile.TemporaryDirectory(prefix="imganom-ov-") as tmp:
        ort = importlib.util.find_spec("onnxruntime") is not None  # the ONNX check runs onnxruntime
        onnx_rep = export_onnx(model_path, Path(tmp) / "graph.onnx", check=check and ort, allow_mc=allow_mc)
        d = read_onnx_meta(onnx_rep.path)
        try:
            fp32 = openvino_core().read_model(str(onnx_rep.path))
        except Exception as e:  # noqa: BLE001 - OpenVINO raises its own exception types
            raise ExportError(f"openvino cannot read the exported graph ({str(e)[:300]})") from None
    cfg = Config.model_validate(d["config"])
    notes, info = list(onnx_rep.notes), {**d["export"], "format": "openvino-ir", "openvino": ov.__version__}
    if check and not ort:
        notes.append("onnxruntime is not installed: the graph was not checked against torch")
    model, diff = fp32, onnx_rep.max_rel_diff
    if int8:
        import nncf

        folder, paths = calibration_images(d["model"].get("training") or {}, calib)
        views, skipped = calibration_views(paths, cfg, calib_size)
        if skipped:
            notes.append(f"{len(skipped)} calibration image(s) skipped: " + "; ".join(skipped[:3]))
        if not views:
            raise ExportError(f"no readable calibration image under {folder}")
        model = quantize_int8(fp32, views, scope)
        info["int8"] = {"nncf": nncf.__version__, "scope": scope,
                        "calibration": {"folder": str(folder), "images": len(paths), "views": len(views),
                                        "skipped": len(skipped)}}  # fmt: skip
        if check:
            info["int8"]["check"] = cmp = _compare(fp32, model, views, d["thresholds"].get("image_threshold"))
            diff = cmp["max_map_diff"]
            notes.append(_check_note(cmp))
    props = {META_PREFIX + k: json.dumps(v, allow_nan=False) for k, v in d.items()}
    props[META_PREFIX + "export"] = json.dumps(info, allow_nan=False)
    set_ir_props(model, props)
    _save_ir_atomic(model, out)
    size = out.stat().st_size + out.with_suffix(".bin").stat().st_size
    return ExportReport(out, onnx_rep.opset, onnx_rep.exporter, time.perf_counter() - t0, size, diff, notes)
