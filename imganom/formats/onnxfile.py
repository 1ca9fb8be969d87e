"""The exported ONNX file's contract: graph input/output names and the ``imganom.*`` metadata codec.

Export (``imganom.export``) writes these files and inference (``imganom.inference``) reads them; neither
imports the other, so what both must agree on lives here. Every ``metadata_props`` value is a JSON document
under the ``imganom.`` prefix: format, model_id, config, preprocess, calibration, thresholds, model, export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from imganom.config import Config
from imganom.formats.modelfile import (
    FORMAT_VERSION,
    ModelFileError,
    ModelMeta,
    meta_problems,
    model_file_error,
)

ONNX_FORMAT = "imganom-onnx"
ONNX_FORMAT_VERSION = 1
INPUT_NAME = "images"
OUTPUT_NAMES = ("anomaly_map", "score", "elbo")  # + "score_map" with map.standardize = "score"
SCORE_MAP = "score_map"
REFERENCE = "reference"  # (N,) neighbours' mean raw score, with calibration.neighbours (ops.neighbours)
META_PREFIX = "imganom."


def onnx_meta_props(meta: ModelMeta, cfg: Config, export_info: dict[str, Any]) -> dict[str, str]:
    """The ``metadata_props`` of an exported file (every value a JSON document)."""
    cal = meta.calibration
    thr = {k: (cal or {}).get(k) for k in ("image_threshold", "pixel_threshold", "score_scale")}
    props = {
        "format": {"format": ONNX_FORMAT, "version": ONNX_FORMAT_VERSION},
        "model_id": meta.model_id,
        "config": cfg.model_dump(mode="json"),
        "preprocess": cfg.preprocess.model_dump(mode="json"),
        "calibration": cal,
        "thresholds": thr,
        "model": {
            "in_channels": meta.in_channels,
            "size": list(meta.size),
            "training": meta.training,
            "versions": meta.versions,
            "model_format_version": meta.format_version,
        },
        "export": export_info,
    }
    return {META_PREFIX + k: json.dumps(v, allow_nan=False) for k, v in props.items()}


def parse_onnx_props(props: dict[str, str], path: Path) -> dict[str, Any]:
    """Decode the ``imganom.*`` metadata; raises ModelFileError when it is missing or malformed."""
    out: dict[str, Any] = {}
    for k, v in props.items():
        if k.startswith(META_PREFIX):
            try:
                out[k[len(META_PREFIX) :]] = json.loads(v)
            except json.JSONDecodeError as e:
                raise ModelFileError(f"{path}: metadata {k} is not valid JSON ({e})") from None
    fmt = out.get("format")
    if not isinstance(fmt, dict) or fmt.get("format") != ONNX_FORMAT:
        raise ModelFileError(f"{path}: ONNX file has no imganom metadata (not exported by imganom export)")
    if int(fmt.get("version", 0)) > ONNX_FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: imganom ONNX format {fmt['version']} is newer than this imganom "
            f"supports ({ONNX_FORMAT_VERSION}); upgrade imganom"
        )
    missing = [k for k in ("config", "model", "thresholds") if not isinstance(out.get(k), dict)]
    if missing:
        raise ModelFileError(f"{path}: imganom metadata is missing {', '.join(missing)}")
    return out


def model_meta_from_onnx(d: dict[str, Any], path: Path) -> ModelMeta:
    """A ``ModelMeta`` (what ``Inspector`` reads) from decoded metadata; ``thresholds`` wins over
    ``calibration`` so that a hand-edited file stays self-consistent."""
    cal = dict(d["calibration"]) if isinstance(d.get("calibration"), dict) else None
    thr = d["thresholds"]
    if thr.get("image_threshold") is not None or thr.get("pixel_threshold") is not None:
        cal = cal or {"source": "manual"}
        for k in ("image_threshold", "pixel_threshold", "score_scale"):
            if thr.get(k) is not None:
                cal[k] = thr[k]
    m = d["model"]
    as_file = {"config": d["config"], "in_channels": m.get("in_channels"), "size": m.get("size"),
               "calibration": cal, "training": m.get("training") or {}, "versions": m.get("versions") or {}}
    problems = meta_problems(as_file)  # fmt: skip
    if problems:  # the same checks as a .safetensors file: no verdict from a NaN threshold either
        raise model_file_error(path, problems)
    meta = ModelMeta(
        config=d["config"],
        in_channels=int(m.get("in_channels", 0)),
        size=tuple(m.get("size", ())),
        training=m.get("training") or {},
        calibration=cal,
        versions=m.get("versions") or {},
        model_id=str(d.get("model_id") or ""),
        format_version=int(m.get("model_format_version", FORMAT_VERSION)),
    )
    try:
        cfg = meta.cfg
    except ValueError as e:
        raise ModelFileError(f"{path}: {e}") from None
    if tuple(cfg.preprocess.size) != meta.size or cfg.preprocess.channels != meta.in_channels:
        raise ModelFileError(f"{path}: metadata size/channels disagree with its config")
    return meta


def load_onnx_proto(p: Path) -> Any:
    """The ModelProto of an exported file (external weight data, if any, is left where it is)."""
    import onnx

    if not p.is_file():
        raise ModelFileError(f"ONNX file not found: {p}")
    try:
        return onnx.load(str(p), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several types
        raise ModelFileError(f"{p}: not a readable ONNX file ({e})") from None


def read_onnx_meta(path: str | Path) -> dict[str, Any]:
    """The decoded ``imganom.*`` metadata of an exported file (keys without the prefix)."""
    p = Path(path)
    return parse_onnx_props({x.key: x.value for x in load_onnx_proto(p).metadata_props}, p)


def open_session(path: Path, providers: list[str], threads: int | None = None, spinning: bool = False) -> Any:
    """An onnxruntime session on ``providers``; ``threads``: intra-op threads (None: onnxruntime's default).
    ``spinning``: let idle intra-op threads busy-wait for the next op (onnxruntime's default). Off here: on a
    few cores the spinning threads take the CPU that decoding, post-processing and writing need (2-core
    machine, 256 px: 32 instead of 49-55 CPU ms per image for the forward pass alone, end to end 1.5x faster;
    docs/BENCHMARKS.md). Raises ModelFileError when onnxruntime cannot load the file."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads, so.inter_op_num_threads = int(threads), 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
    try:
        return ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ModelFileError(f"{path}: onnxruntime cannot load it ({str(e)[:300]})") from None
