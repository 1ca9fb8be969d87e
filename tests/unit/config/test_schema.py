"""Configuration: presets, validation errors that name the key path, YAML errors, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from imganom.config import CONFIG_DIR, Config, ConfigError, config_from_dict, load_config

PRESETS = ["default", "industrial-gray", "industrial-rgb", "medical-mri", "tiny"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load(name: str) -> None:
    cfg = load_config(name)
    assert isinstance(cfg, Config)
    assert cfg.name == name
    h, w = cfg.preprocess.size
    assert h % 2**cfg.model.depth == 0 and w % 2**cfg.model.depth == 0
    # a preset is fully round-trippable through its own dump (what model files store)
    assert config_from_dict(cfg.model_dump(mode="json")) == cfg


def test_preset_values_are_applied() -> None:
    assert load_config("tiny").preprocess.size == (64, 64)
    assert load_config("tiny").model.depth == 3
    assert load_config("industrial-rgb").preprocess.channels == 3
    assert load_config("industrial-rgb").map.channel_reduce == "max"
    mri = load_config("medical-mri")
    assert (mri.preprocess.resize, mri.preprocess.intensity.mode) == ("letterbox", "foreground")
    assert mri.preprocess.channel_policy == "strict" and mri.postprocess.roi == "auto"
    assert load_config(None) == Config()


def test_all_shipped_yaml_files_are_presets() -> None:
    shipped = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert set(PRESETS) <= set(shipped)


@pytest.mark.parametrize(
    ("data", "path", "words"),
    [
        ({"model": {"bogus": 1}}, "model.bogus", "unknown key"),
        ({"preprocess": {"intensity": {"gamma": 2}}}, "preprocess.intensity.gamma", "unknown key"),
        ({"nonsense": True}, "nonsense", "unknown key"),
        ({"train": {"epochs": "many"}}, "train.epochs", "integer"),
        ({"train": {"epochs": 0}}, "train.epochs", "greater than or equal"),
        ({"model": {"latent": "sparse"}}, "model.latent", "dense"),
        ({"preprocess": {"size": [64]}}, "preprocess.size", ""),
        ({"preprocess": {"tile_overlap": 1.0}}, "preprocess.tile_overlap", "less than"),
        ({"calibration": {"target_fpr": 0.7}}, "calibration.target_fpr", "less than"),
        ({"map": {"ssim_window": 8}}, "map", "odd"),
    ],
)
def test_bad_values_name_the_key_path(data: dict, path: str, words: str) -> None:
    with pytest.raises(ConfigError) as ei:
        config_from_dict(data, "test.yaml")
    msg = str(ei.value)
    assert path in msg and words in msg
    assert "test.yaml" in msg


def test_size_must_be_multiple_of_depth() -> None:
    with pytest.raises(ConfigError, match=r"preprocess\.size 100x100 must be multiples of 2\*\*model\.depth"):
        config_from_dict({"preprocess": {"size": [100, 100]}})
    # depth 2 makes the same size legal
    ok = config_from_dict({"preprocess": {"size": [100, 100]}, "model": {"depth": 2}})
    assert ok.preprocess.size == (100, 100)


@pytest.mark.parametrize("mode", ["fixed", "percentile"])
def test_window_high_must_exceed_low(mode: str) -> None:
    with pytest.raises(ConfigError) as ei:
        config_from_dict({"preprocess": {"intensity": {"mode": mode, "low": 50, "high": 50}}})
    assert "preprocess.intensity" in str(ei.value) and "high" in str(ei.value)


def test_percentile_window_bounds() -> None:
    with pytest.raises(ConfigError, match="preprocess.intensity"):
        config_from_dict({"preprocess": {"intensity": {"mode": "percentile", "low": 1, "high": 150}}})
    # the same window is fine as a fixed raw-unit window
    assert config_from_dict({"preprocess": {"intensity": {"mode": "fixed", "low": 1, "high": 150}}})


def test_several_errors_are_all_reported() -> None:
    with pytest.raises(ConfigError) as ei:
        config_from_dict({"model": {"bogus": 1}, "train": {"lr": -1}})
    assert "model.bogus" in str(ei.value) and "train.lr" in str(ei.value)


def test_assignment_is_validated() -> None:
    cfg = load_config("tiny")
    with pytest.raises(ValueError):
        cfg.train.epochs = 0


def test_yaml_syntax_error_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "broken.yaml"
    p.write_text("model: {depth: 3\ntrain: [\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert str(p) in str(ei.value) and "YAML" in str(ei.value)


def test_yaml_top_level_must_be_mapping(tmp_path: Path) -> None:
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(p)


def test_yaml_validation_error_names_file_and_key(tmp_path: Path) -> None:
    p = tmp_path / "bad.yml"
    p.write_text("train:\n  epochs: 3\n  batchsize: 8\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert str(p) in str(ei.value) and "train.batchsize" in str(ei.value)


def test_missing_file_and_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/cfg.yaml")
    with pytest.raises(ConfigError, match="unknown preset 'no-such-preset'.*tiny"):
        load_config("no-such-preset")


def test_empty_yaml_is_defaults(tmp_path: Path) -> None:
    p = tmp_path / "empty.yaml"
    p.write_text("# nothing\n")
    assert load_config(p) == Config()


def test_overrides_merge_deeply(tmp_path: Path) -> None:
    base = load_config("tiny")
    window = {"mode": "fixed", "low": 0, "high": 4095}
    cfg = load_config("tiny", {"train": {"epochs": 2}, "preprocess": {"intensity": window}})
    assert cfg.train.epochs == 2
    # siblings of overridden keys keep the preset's values
    assert cfg.train.lr == base.train.lr and cfg.train.batch_size == base.train.batch_size
    assert cfg.preprocess.size == base.preprocess.size
    assert (cfg.preprocess.intensity.mode, cfg.preprocess.intensity.high) == ("fixed", 4095)
    # overrides on a YAML file, and overrides are validated too
    p = tmp_path / "mine.yaml"
    p.write_text("name: mine\ntrain: {epochs: 7, seed: 3}\n")
    cfg = load_config(p, {"train": {"seed": 9}})
    assert (cfg.name, cfg.train.epochs, cfg.train.seed) == ("mine", 7, 9)
    with pytest.raises(ConfigError, match="train.seeed"):
        load_config(p, {"train": {"seeed": 9}})


def test_standardize_modes_and_legacy_booleans() -> None:
    assert load_config(None, {"map": {"standardize": True}}).map.standardize == "map"
    assert load_config(None, {"map": {"standardize": False}}).map.standardize == "off"
    assert load_config(None, {"map": {"standardize": "score"}}).map.standardize == "score"
    with pytest.raises(ConfigError, match="map.standardize"):
        load_config(None, {"map": {"standardize": "sometimes"}})


def test_map_auto_and_model_selection_options(tmp_path: Path) -> None:
    cfg = load_config("default", {"map": "auto"})
    assert cfg.map.auto and cfg.map.standardize == "off"  # auto replaces the preset's map settings
    assert load_config("default", {"map": {"auto": True, "l1": 1.0}}).map.l1 == 1.0
    yml = tmp_path / "a.yaml"
    yml.write_text("map: auto\ntrain: {select: pseudo, pseudo_every: 3, denoise: 0.5}\n")
    cfg = load_config(yml)
    assert cfg.map.auto
    assert (cfg.train.select, cfg.train.pseudo_every, cfg.train.denoise) == ("pseudo", 3, 0.5)
    assert config_from_dict(cfg.model_dump(mode="json")) == cfg
    assert not load_config("default").map.auto and load_config("default").train.select == "recon"
    with pytest.raises(ConfigError, match="train.select"):
        load_config(None, {"train": {"select": "elbo"}})
    with pytest.raises(ConfigError, match="train.denoise"):
        load_config(None, {"train": {"denoise": 1.5}})
    with pytest.raises(ConfigError, match="map"):
        load_config(None, {"map": "best"})
