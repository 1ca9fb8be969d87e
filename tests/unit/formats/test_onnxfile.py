"""formats.onnxfile: an exported model's metadata passes the same checks as a .safetensors file."""

from __future__ import annotations

import math

import pytest

from imganom.config import load_config
from imganom.formats.modelfile import ModelFileError
from imganom.formats.onnxfile import model_meta_from_onnx

CFG = load_config("tiny", {"preprocess": {"size": [32, 32]}}).model_dump(mode="json")


def _props(thresholds: dict, calibration=None, size=(32, 32)) -> dict:
    """Decoded ``imganom.*`` metadata as an export writes it."""
    return {"config": CFG, "thresholds": thresholds, "calibration": calibration,
            "model": {"in_channels": 1, "size": list(size), "training": {}, "versions": {}}}  # fmt: skip


def test_valid_metadata_gives_the_meta(tmp_path):
    meta = model_meta_from_onnx(_props({"image_threshold": 0.5, "pixel_threshold": 0.4}), tmp_path / "m.onnx")
    assert meta.calibration["image_threshold"] == 0.5 and meta.size == (32, 32)


@pytest.mark.parametrize(
    ("props", "words"),
    [
        (_props({"image_threshold": math.nan}), "calibration.image_threshold: must be finite, got nan"),
        (_props({"image_threshold": "0.5"}), "calibration.image_threshold: must be a number, got string"),
        (_props({"image_threshold": 0.5}, {"normal_scores": [1]}), "normal_scores: must be an object"),
        (_props({}, {"image_threshold": math.inf}), "calibration.image_threshold: must be finite, got inf"),
        (_props({"image_threshold": 0.5}, size=("32", 32)), "size: must be [height, width] integers"),
    ],
)
def test_hostile_metadata_is_refused(tmp_path, props, words):
    with pytest.raises(ModelFileError, match="m.onnx") as ei:
        model_meta_from_onnx(props, tmp_path / "m.onnx")
    assert words in str(ei.value)
