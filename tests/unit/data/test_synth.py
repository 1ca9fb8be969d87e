"""Synthetic data generator: image statistics, exact masks, on-disk layout, formats and determinism."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from helpers import ROOT

from imganom.data.synth import (
    DEFECTS,
    MASK_TOL,
    SPLIT_IDS,
    TEXTURES,
    add_defect,
    make_dataset,
    normal_image,
)


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _read(path: Path) -> np.ndarray:
    if path.suffix == ".tiff":
        return tifffile.imread(path)
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, path
    return img[..., ::-1] if img.ndim == 3 else img  # BGR -> RGB


# ------------------------------------------------------------------------------------------ normal images


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("texture", [*TEXTURES, "mixed"])
def test_normal_image_shape_range_and_structure(texture: str, channels: int) -> None:
    img = normal_image(np.random.default_rng(3), (48, 80), texture, channels)
    assert img.shape == (48, 80, channels) and img.dtype == np.float32
    assert 0.1 < img.min() and img.max() < 0.9  # room for bright and dark defects
    g = img.mean(-1)
    assert 0.02 < g.std() < 0.12  # visible texture, but moderate
    # Structured, not white noise: little of the variance lives above a 1-px Gaussian blur.
    high = g - cv2.GaussianBlur(g, (0, 0), 1.0)
    assert high.var() / g.var() < 0.3


def test_normal_image_jitters_per_image_and_is_reproducible() -> None:
    a = normal_image(np.random.default_rng(1), 64, "stripes")
    b = normal_image(np.random.default_rng(2), 64, "stripes")
    assert np.array_equal(a, normal_image(np.random.default_rng(1), 64, "stripes"))
    assert np.abs(a - b).mean() > 0.02  # different phase / noise per image


def test_rgb_is_tinted_not_gray() -> None:
    img = normal_image(np.random.default_rng(0), 32, "weave", channels=3)
    assert img[..., 0].mean() > img[..., 2].mean() + 0.05  # weave tint is warm (R > B)


@pytest.mark.parametrize(
    "kwargs", [{"texture": "wood"}, {"texture": "grain", "channels": 2}, {"texture": "grain", "size": 8}]
)
def test_normal_image_rejects_bad_arguments(kwargs: dict) -> None:
    kwargs = {"size": 32, **kwargs}
    with pytest.raises(ValueError):
        normal_image(np.random.default_rng(0), **kwargs)


# ------------------------------------------------------------------------------------------ defects


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", DEFECTS)
def test_add_defect_mask_is_exactly_the_changed_pixels(kind: str, channels: int) -> None:
    for seed in range(4):
        rng = np.random.default_rng(seed)
        clean = normal_image(rng, 64, TEXTURES[seed], channels)
        before = clean.copy()
        out, mask = add_defect(clean, rng, kind)
        assert np.array_equal(clean, before)  # input untouched
        assert out.shape == clean.shape and out.dtype == np.float32
        assert mask.shape == (64, 64) and mask.dtype == bool
        assert 0.0 <= out.min() and out.max() <= 1.0
        diff = np.abs(out - clean).max(-1)
        assert np.array_equal(diff > 0, mask)  # unchanged outside, changed inside
        assert diff[mask].min() > MASK_TOL
        assert mask.sum() >= 16 and mask[4:-4, 4:-4].sum() > 0.8 * mask.sum()  # not a border sliver
        assert mask.sum() < 0.2 * mask.size  # a local defect, not a global change


@pytest.mark.parametrize("kind", DEFECTS)
def test_defects_stand_out_against_the_texture(kind: str) -> None:
    """The defect's core contrast is several times the clean texture's variation around it."""
    ratios = []
    for seed in range(6):
        rng = np.random.default_rng(100 + seed)
        clean = normal_image(rng, 64, "grain")
        out, mask = add_defect(clean, rng, kind)
        ys, xs = np.nonzero(mask)
        window = clean[max(0, ys.min() - 6) : ys.max() + 7, max(0, xs.min() - 6) : xs.max() + 7]
        ratios.append(np.percentile(np.abs(out - clean)[mask], 75) / window.std())
    assert min(ratios) > 3.0, ratios


def test_add_defect_keeps_2d_input_2d_and_rejects_unknown_kind() -> None:
    clean = normal_image(np.random.default_rng(0), 32, "gradient")[..., 0]
    out, mask = add_defect(clean, np.random.default_rng(1), "spot")
    assert out.shape == (32, 32) and mask.shape == (32, 32) and mask.any()
    with pytest.raises(ValueError, match="unknown defect"):
        add_defect(clean, np.random.default_rng(1), "dent")


# ------------------------------------------------------------------------------------------ datasets


def test_make_dataset_layout_counts_and_masks(tmp_path: Path) -> None:
    s = make_dataset(tmp_path, n_train=4, n_test_good=2, n_test_defect=7, size=(32, 48), seed=5)
    expected = {"train/good": 4, "test/good": 2, "test/scratch": 2, "test/spot": 2}
    expected |= {"test/crack": 1, "test/hole": 1, "test/contamination": 1}
    assert s["counts"] == expected
    assert s["size"] == (32, 48) and s["channels"] == 1 and s["bit_depth"] == 8 and s["seed"] == 5
    assert s["texture"] == "grain" and s["root"] == str(tmp_path)
    for sub, n in expected.items():
        assert sorted(p.name for p in (tmp_path / sub).iterdir()) == [f"{i:03d}.png" for i in range(n)]
    assert sorted(p.name for p in (tmp_path / "ground_truth").iterdir()) == sorted(DEFECTS)

    # Each mask matches its image: regenerate the clean image from the documented per-image generator.
    order = [DEFECTS[i % len(DEFECTS)] for i in range(7)]
    for i, kind in enumerate(order):
        j = order[:i].count(kind)
        img = _read(tmp_path / "test" / kind / f"{j:03d}.png")
        mask = _read(tmp_path / "ground_truth" / kind / f"{j:03d}_mask.png")
        assert img.shape == mask.shape == (32, 48) and img.dtype == mask.dtype == np.uint8
        assert set(np.unique(mask)) == {0, 255}
        rng = np.random.default_rng([5, SPLIT_IDS["test_defect"], i])
        clean = np.round(normal_image(rng, (32, 48), "grain")[..., 0] * 255)
        changed = np.abs(img - clean) > 2
        assert changed.sum() > 0 and (changed & (mask == 0)).sum() == 0


def test_make_dataset_is_deterministic_and_splits_are_independent(tmp_path: Path) -> None:
    kw = {"n_train": 3, "n_test_good": 2, "n_test_defect": 5, "size": 32, "texture": "mixed"}
    a = _hashes(Path(make_dataset(tmp_path / "a", seed=7, **kw)["root"]))
    b = _hashes(Path(make_dataset(tmp_path / "b", seed=7, **kw)["root"]))
    c = _hashes(Path(make_dataset(tmp_path / "c", seed=8, **kw)["root"]))
    assert a == b and len(a) == 3 + 2 + 2 * 5
    images = [k for k in a if not k.startswith("ground_truth")]
    assert all(a[k] != c[k] for k in images)  # another seed changes every image
    d = _hashes(Path(make_dataset(tmp_path / "d", seed=7, **{**kw, "n_train": 5})["root"]))
    assert all(d[k] == v for k, v in a.items())  # more training images leave the others unchanged


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_16_bit_output_uses_the_extra_levels(tmp_path: Path, fmt: str) -> None:
    make_dataset(tmp_path, n_train=1, n_test_good=0, n_test_defect=1, size=64, bit_depth=16, fmt=fmt)
    for path in [tmp_path / f"train/good/000.{fmt}", tmp_path / f"test/scratch/000.{fmt}"]:
        img = _read(path)
        assert img.dtype == np.uint16 and img.shape == (64, 64)
        assert len(np.unique(img)) > 256
    assert _read(tmp_path / "ground_truth/scratch/000_mask.png").dtype == np.uint8


@pytest.mark.parametrize("fmt", ["png", "tiff", "jpg"])
def test_rgb_output_has_three_channels_in_rgb_order(tmp_path: Path, fmt: str) -> None:
    make_dataset(
        tmp_path, n_train=1, n_test_good=0, n_test_defect=1, size=32, channels=3, texture="weave", fmt=fmt
    )
    img = _read(tmp_path / f"train/good/000.{fmt}")
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert img[..., 0].mean() > img[..., 2].mean() + 10  # warm weave tint survives: R > B, not swapped
    assert _read(tmp_path / "ground_truth/scratch/000_mask.png").shape == (32, 32)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fmt": "jpg", "bit_depth": 16},
        {"fmt": "bmp"},
        {"bit_depth": 12},
        {"defects": ["dent"]},
        {"channels": 4},
    ],
)
def test_make_dataset_rejects_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        make_dataset(tmp_path, n_train=1, n_test_good=0, n_test_defect=1, size=32, **kwargs)


def test_cli_writes_dataset_and_prints_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("make_synthetic", ROOT / "tools" / "make_synthetic.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args = [str(tmp_path), "--n-train", "2", "--n-test-good", "1", "--n-test-defect", "2"]
    summary = cli.main([*args, "--size", "32", "40", "--defects", "hole,crack", "--texture", "stripes"])
    assert summary["counts"] == {"train/good": 2, "test/good": 1, "test/hole": 1, "test/crack": 1}
    assert summary["size"] == (32, 40)
    assert '"seconds"' in capsys.readouterr().out
    assert (tmp_path / "ground_truth/crack/000_mask.png").is_file()
    with pytest.raises(SystemExit):
        cli.main([str(tmp_path), "--defects", "dent"])
