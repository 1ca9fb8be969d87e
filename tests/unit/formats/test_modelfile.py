"""formats.modelfile: no verdict without a valid model. Every hostile metadata edit is written into a real
safetensors file and must be refused with a ModelFileError naming the field, before weights are allocated."""

from __future__ import annotations

import json
import resource
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli_env, imganom_cmd
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from imganom.config import load_config
from imganom.formats.modelfile import (
    MAX_FIRST_ACTIVATION,
    MAX_INPUT_SIDE,
    MAX_PARAMETERS,
    ModelFileError,
    load_model,
    read_meta,
    save_model,
)
from imganom.models.vae import ConvVAE

CAL = {"image_threshold": 0.5, "pixel_threshold": 0.4, "score_scale": 0.1, "source": "normal",
       "normal_scores": {"mean": 0.2, "quantiles": {"p50": 0.2}},
       "f1_max": {"image_threshold": 0.6}}  # fmt: skip


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small valid model file (untrained tiny VAE, calibrated by hand)."""
    cfg = load_config("tiny", {"preprocess": {"size": [32, 32]}})
    torch.manual_seed(0)
    model = ConvVAE(cfg.model, 1, (32, 32))
    p = tmp_path_factory.mktemp("model") / "m.safetensors"
    save_model(p, model, cfg, calibration=CAL)
    return p


def _tensors_and_meta(p: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(p), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["imganom"])


def _edited(valid: Path, tmp_path: Path, edit, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """A copy of ``valid`` whose metadata dict went through ``edit`` (NaN/Infinity written as JSON allows)."""
    have, meta = _tensors_and_meta(valid)
    edit(meta)
    out = tmp_path / "edited.safetensors"
    save_file(tensors or have, out, metadata={"imganom": json.dumps(meta)})
    return out


def _set(path: str, value):
    def edit(meta: dict) -> None:
        *keys, last = path.split(".")
        d = meta
        for k in keys:
            d = d[k]
        d[last] = value

    return edit


def test_valid_file_round_trips(valid):
    model, meta, _ = load_model(valid)
    assert meta.calibration == CAL and meta.size == (32, 32) and isinstance(model, ConvVAE)


@pytest.mark.parametrize(
    ("path", "value", "words"),
    [
        ("calibration.image_threshold", float("nan"), "calibration.image_threshold: must be finite, got nan"),
        ("calibration.pixel_threshold", float("inf"), "calibration.pixel_threshold: must be finite, got inf"),
        ("calibration.image_threshold", "0.5", "calibration.image_threshold: must be a number, got string"),
        ("calibration.score_scale", [0.1], "calibration.score_scale: must be a number, got list"),
        ("calibration.score_scale", -1.0, "calibration.score_scale: must be >= 0"),
        ("calibration.image_threshold", True, "calibration.image_threshold: must be a number, got boolean"),
        ("calibration", [0.5], "calibration: must be an object or null, got list"),
        ("calibration.normal_scores", [1, 2], "calibration.normal_scores: must be an object, got list"),
        ("calibration.normal_scores.quantiles.p50", -np.inf, "normal_scores.quantiles.p50: must be finite"),
        ("calibration.f1_max", {"image_threshold": None}, "f1_max.image_threshold: must be a number"),
        ("calibration.f1_max.image_threshold", np.nan, "f1_max.image_threshold: must be finite"),
        ("size", "32x32", "size: must be [height, width] integers, got string"),
        ("size", [32, 32.5], "size: must be [height, width] integers"),
        ("in_channels", "1", "in_channels: must be an integer, got string"),
        ("config", [1], "config: must be an object, got list"),
        ("training", [], "training: must be an object, got list"),
        ("config.preprocess.channels", "one", "config.preprocess.channels"),
        ("format_version", "1", "format_version must be an integer"),
    ],
)  # fmt: skip
def test_hostile_metadata_is_refused_naming_the_field(valid, tmp_path, path, value, words):
    bad = _edited(valid, tmp_path, _set(path, value))
    for fn in (read_meta, load_model):
        with pytest.raises(ModelFileError) as ei:
            fn(bad)
        assert words in str(ei.value) and str(bad) in str(ei.value)


def test_one_line_per_problem(valid, tmp_path):
    def edit(meta: dict) -> None:
        meta["calibration"]["image_threshold"] = float("nan")
        meta["calibration"]["score_scale"] = "big"
        meta["in_channels"] = None

    msg = str(pytest.raises(ModelFileError, read_meta, _edited(valid, tmp_path, edit)).value)
    lines = msg.splitlines()
    assert "3 problems" in lines[0] and len(lines) == 4
    assert any("image_threshold: must be finite" in x for x in lines)
    assert any("score_scale: must be a number, got string 'big'" in x for x in lines)
    assert any("in_channels: must be an integer, got null" in x for x in lines)


def _arch(size: int, **model) -> callable:
    def edit(meta: dict) -> None:
        meta["config"]["preprocess"]["size"] = [size, size]
        meta["config"]["model"].update(model)
        meta["size"] = [size, size]

    return edit


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (_arch(1 << 20), f"exceeds the limit of {MAX_INPUT_SIDE} px a side"),
        (_arch(4096, base_channels=512, max_channels=512), f"(limit {MAX_FIRST_ACTIVATION})"),
        # dense latent from a 2048 x 256 x 256 bottom: 2 * 4096 * 2**27 weights, about 4 TB in float32
        (_arch(4096, depth=4, base_channels=32, max_channels=2048, latent_dim=4096),
         f"parameters (limit {MAX_PARAMETERS})"),
    ],
)  # fmt: skip
def test_absurd_architecture_is_refused_before_allocating(valid, tmp_path, edit, words):
    bad = _edited(valid, tmp_path, edit)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ModelFileError, match="config") as ei:
        load_model(bad)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert words in str(ei.value)
    assert grown_mb < 100, f"peak RSS grew by {grown_mb:.0f} MB"


def test_weights_are_checked_against_the_architecture_before_loading(valid, tmp_path):
    tensors, _ = _tensors_and_meta(valid)
    tensors["vae.to_stats.weight"] = torch.zeros(3, 3)
    bad = _edited(valid, tmp_path, lambda m: None, tensors)
    with pytest.raises(ModelFileError, match=r"weights do not match .*vae.to_stats.weight: file \[3, 3\]"):
        load_model(bad)


def test_save_refuses_a_calibration_that_could_not_be_read_back(valid, tmp_path):
    model, meta, _ = load_model(valid)
    nan_cal = {**CAL, "image_threshold": np.nan}
    with pytest.raises(ModelFileError, match="calibration.image_threshold: must be finite"):
        save_model(tmp_path / "nan.safetensors", model, meta.cfg, calibration=nan_cal)
    assert not (tmp_path / "nan.safetensors").exists()


def test_cli_exits_2_with_the_message(valid, tmp_path):
    bad = _edited(valid, tmp_path, _set("calibration.image_threshold", float("nan")))
    img = tmp_path / "in" / "a.png"
    img.parent.mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(img)
    for args in (["info", str(bad)], ["inspect", "--model", str(bad), "--input", str(img.parent),
                                       "--out", str(tmp_path / "out")]):  # fmt: skip
        r = subprocess.run(imganom_cmd(*args), capture_output=True, text=True, env=cli_env(), timeout=120)
        assert r.returncode == 2, (args[0], r.stdout, r.stderr)
        assert "calibration.image_threshold: must be finite, got nan" in r.stdout + r.stderr
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "results.jsonl").exists()
