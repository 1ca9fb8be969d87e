"""The OpenVINO IR (``.xml`` + ``.bin``) as an imganom model file: the inspection graph (fp32 or with INT8
weights from ``imganom export --format openvino [--int8]``) and the same ``imganom.*`` metadata as an ONNX
export (``formats.onnxfile``), stored in the IR's ``rt_info`` under the section ``imganom``.

Export (``imganom.export``) writes it and the openvino backend (``imganom.inference``) reads it; the codec
lives here because neither imports the other. OpenVINO is imported only when an IR is read or written.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from imganom.formats.modelfile import ModelFileError
from imganom.formats.onnxfile import META_PREFIX, parse_onnx_props

IR_SUFFIX = ".xml"
IR_SECTION = "imganom"


def is_ir(path: str | Path) -> bool:
    """True for an OpenVINO IR path (``.xml``; its weights are the ``.bin`` next to it)."""
    return str(path).lower().endswith(IR_SUFFIX)


@functools.lru_cache(maxsize=1)
def openvino_core() -> Any:
    """One OpenVINO Core per process, never destroyed: a Core torn down while torch's and OpenVINO's thread
    pools are alive crashed the process (seen as a segfault in the test suite)."""
    import openvino as ov

    return ov.Core()


def set_ir_props(model: Any, props: dict[str, str]) -> None:
    """Store ``imganom.*`` metadata props (as ``formats.onnxfile.onnx_meta_props`` gives them) in an
    ``openvino.Model``'s rt_info; saved with the model."""
    for k, v in props.items():
        if k.startswith(META_PREFIX):
            model.set_rt_info(v, [IR_SECTION, k[len(META_PREFIX) :]])


def ir_props(model: Any) -> dict[str, str]:
    """The ``imganom.*`` props of an ``openvino.Model`` (empty when it has none)."""
    info = model.get_rt_info()
    if IR_SECTION not in list(info.keys()):
        return {}
    section = info[IR_SECTION]
    return {META_PREFIX + k: str(v.astype(str)) for k, v in section.items()}


def read_ir_model(path: str | Path) -> Any:
    """``openvino.Model`` of an IR; raises ModelFileError for a missing or unreadable file or weights."""
    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"OpenVINO IR not found: {p}")
    if not p.with_suffix(".bin").is_file():
        raise ModelFileError(f"{p}: its weights file {p.with_suffix('.bin').name} is missing")
    try:
        return openvino_core().read_model(str(p))
    except Exception as e:  # noqa: BLE001 - OpenVINO raises its own exception types
        raise ModelFileError(f"{p}: not a readable OpenVINO IR ({str(e)[:300]})") from None


def read_ir_meta(path: str | Path) -> dict[str, Any]:
    """The decoded ``imganom.*`` metadata of an IR (keys without the prefix), as ``read_onnx_meta``."""
    p = Path(path)
    props = ir_props(read_ir_model(p))
    if not props:
        raise ModelFileError(f"{p}: OpenVINO IR has no imganom metadata (not written by imganom export)")
    return parse_onnx_props(props, p)
