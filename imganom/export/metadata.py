"""Export-time metadata work on ONNX files: writing the ``imganom.*`` props into a traced graph, and
editing thresholds in place (recalibration is a metadata edit, never a re-export). The codec itself
(names, keys, parsing) is ``formats.onnxfile``, shared with the loader in ``inference``."""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from imganom.config import Config
from imganom.formats.modelfile import ModelMeta
from imganom.formats.onnxfile import META_PREFIX, load_onnx_proto, onnx_meta_props, parse_onnx_props
from imganom.utils.files import atomic_path


def write_meta_props(proto: Any, meta: ModelMeta, cfg: Config, export_info: dict[str, Any]) -> None:
    """Replace ``proto``'s metadata with the imganom props of ``meta`` exported under ``cfg``."""
    del proto.metadata_props[:]
    meta = replace(meta, config=cfg.model_dump(mode="json"))
    for k, v in onnx_meta_props(meta, cfg, export_info).items():
        proto.metadata_props.add(key=k, value=v)
    proto.producer_name, proto.doc_string = "imganom", f"imganom anomaly graph, model {meta.model_id}"


def save_onnx_atomic(model: Any, path: Path) -> None:
    """``onnx.save`` through a temporary file in the same folder and a rename."""
    import onnx

    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))


def update_onnx_thresholds(
    path: str | Path, image_threshold: float | None = None, pixel_threshold: float | None = None
) -> dict[str, Any]:
    """Set the thresholds of an exported file in place (metadata only; the graph is untouched).

    ``None`` keeps a value. Updates both ``imganom.thresholds`` and ``imganom.calibration``; returns the new
    thresholds dict. The file is rewritten atomically.
    """
    if image_threshold is None and pixel_threshold is None:
        raise ValueError("give image_threshold and/or pixel_threshold")
    for name, v in (("image_threshold", image_threshold), ("pixel_threshold", pixel_threshold)):
        if v is not None and not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {v}")
    p = Path(path)
    m = load_onnx_proto(p)
    d = parse_onnx_props({x.key: x.value for x in m.metadata_props}, p)
    thr = dict(d["thresholds"])
    cal = dict(d["calibration"]) if isinstance(d.get("calibration"), dict) else {"source": "manual"}
    for k, v in (("image_threshold", image_threshold), ("pixel_threshold", pixel_threshold)):
        if v is not None:
            thr[k] = cal[k] = float(v)
    cal["edited"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    new = {META_PREFIX + "thresholds": json.dumps(thr), META_PREFIX + "calibration": json.dumps(cal)}
    for prop in m.metadata_props:
        if prop.key in new:
            prop.value = new.pop(prop.key)
    for k, v in new.items():
        m.metadata_props.add(key=k, value=v)
    save_onnx_atomic(m, p)
    return thr
