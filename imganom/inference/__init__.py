"""Inspection: ``load_inspector(path)`` -> ``Inspector`` -> ``Result`` (torch or ONNX backend)."""

from imganom.inference.inspector import Inspector, load_inspector
from imganom.inference.result import Result

__all__ = ["Inspector", "Result", "load_inspector"]
