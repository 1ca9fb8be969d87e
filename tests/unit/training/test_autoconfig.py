"""``--config auto``: channels, intensity mode and size from the normal images; the CLI records the choice."""

from __future__ import annotations

import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import cli_env, imganom_cmd

from imganom.config import ConfigError, load_config
from imganom.data.synth import make_dataset
from imganom.training.autoconfig import auto_config, resolve_config


def _data(root: Path, **kw) -> Path:
    make_dataset(root, n_train=kw.pop("n_train", 16), n_test_good=0, n_test_defect=0, seed=0, **kw)
    return root


def test_controlled_gray_images_get_the_dtype_range(tmp_path: Path) -> None:
    cfg, info = auto_config(_data(tmp_path / "g", size=48), {"train": {"epochs": 2}})
    assert cfg.preprocess.channels == 1 and cfg.preprocess.intensity.mode == "dtype"
    assert cfg.preprocess.size == (128, 128) and cfg.map.auto and cfg.name == "auto"
    assert info["base_preset"] == "industrial-gray" and cfg.train.epochs == 2
    assert cfg.model == load_config("industrial-gray").model
    assert info["statistics"]["n_images"] == 16 and any("dtype range" in r for r in info["reasons"])


def test_brightness_varying_between_images_gets_a_percentile_window(tmp_path: Path) -> None:
    root = _data(tmp_path / "v", size=48)
    for k, p in enumerate(sorted((root / "train" / "good").iterdir())):
        img = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE).astype(np.float32)
        cv2.imwrite(str(p), np.clip(img * (0.35 + 0.1 * (k % 8)), 0, 255).astype(np.uint8))  # gain 0.35-1.05
    cfg, info = auto_config(root)
    assert cfg.preprocess.intensity.mode == "percentile"
    assert (cfg.preprocess.intensity.low, cfg.preprocess.intensity.high) == (1.0, 99.0)
    assert info["statistics"]["brightness_spread"] > 0.15
    assert any("brightness varies" in r for r in info["reasons"])


def test_colour_images_and_a_consistent_wide_aspect(tmp_path: Path) -> None:
    cfg, info = auto_config(_data(tmp_path / "c", size=(40, 80), channels=3, texture="weave"))
    assert cfg.preprocess.channels == 3 and info["base_preset"] == "industrial-rgb"
    assert cfg.preprocess.size == (128, 256)  # aspect 2, within the 256 px cap
    assert cfg.preprocess.size[1] % 2**cfg.model.depth == 0


def test_resolve_config_passes_presets_through(tmp_path: Path) -> None:
    cfg, info = resolve_config("tiny", tmp_path / "not-read")
    assert info is None and cfg == load_config("tiny")
    with pytest.raises(FileNotFoundError):
        resolve_config("auto", tmp_path / "missing")
    with pytest.raises(ConfigError, match="train.epochs"):
        auto_config(_data(tmp_path / "e", size=32, n_train=4), {"train": {"epochs": 0}})


def test_cli_train_config_auto_records_the_choice(tmp_path: Path) -> None:
    from imganom.formats.modelfile import read_meta

    root = _data(tmp_path / "d", size=48, n_train=12)
    out = tmp_path / "run"
    cmd = imganom_cmd("train", "--data", str(root), "--config", "auto", "--out", str(out), "--epochs", "1")
    p = subprocess.run([*cmd, "--device", "cpu"], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert p.returncode == 0, p.stderr
    assert "config auto: 1 channel: colour spread" in p.stderr and "config auto: dtype range" in p.stderr
    assert "map: auto chose" in p.stderr
    meta = read_meta(out)
    auto = meta.training["auto_config"]
    assert auto["base_preset"] == "industrial-gray" and auto["chosen"]["preprocess"]["channels"] == 1
    assert meta.config["name"] == "auto" and not meta.config["map"]["auto"]
    assert meta.training["map_auto"]["chosen"]["sigma"] == meta.config["postprocess"]["sigma"]
