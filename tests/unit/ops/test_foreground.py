"""``ops.foreground``: the body/brain mask of ``postprocess.roi: auto`` on generated phantoms (a bright noisy
ellipse with a dark 'ventricle' on a dark noisy background), and the 'foreground' intensity mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imganom.config import IntensityConfig, load_config
from imganom.data.readers import normalize_intensity
from imganom.ops.foreground import foreground_fraction, foreground_mask
from imganom.ops.head import AnomalyHead


def phantom(size: int = 64, seed: int = 0, lesion: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(C=3, size, size) float32 in [0, 1] head-like phantom and its bool ellipse; optional bright lesion."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    ellipse = ((yy - 0.5) / 0.36) ** 2 + ((xx - 0.47) / 0.27) ** 2 < 1
    img = np.where(ellipse, 0.45, 0.02) + rng.normal(0, 0.02, (size, size))
    img[((yy - 0.45) / 0.08) ** 2 + ((xx - 0.47) / 0.05) ** 2 < 1] = 0.03  # dark hole inside the tissue
    if lesion is not None:
        img[((yy - 0.6) / 0.08) ** 2 + ((xx - 0.55) / 0.08) ** 2 < 1] = lesion
    chw = np.repeat(np.clip(img, 0, 1)[None], 3, axis=0).astype(np.float32)
    return chw, ellipse


def test_mask_covers_the_ellipse_and_not_the_background() -> None:
    chw, ellipse = phantom()
    m = foreground_mask(torch.from_numpy(chw[None]))[0].numpy()
    assert m[ellipse].mean() > 0.99  # the dark hole inside is filled in
    assert m[~ellipse].mean() < 0.1  # the noisy air is not tissue (a pixel or two of the edge may be)
    assert not m[:4].any() and not m[:, :4].any()  # the field-of-view edges never


def test_erode_shrinks_the_mask_and_dark_views_have_none() -> None:
    chw, ellipse = phantom()
    x = torch.from_numpy(chw[None])
    m0, m3 = foreground_mask(x)[0], foreground_mask(x, erode=3)[0]
    assert bool((m3 <= m0).all()) and int(m3.sum()) < int(m0.sum()) - 3 * 40
    assert m3.numpy()[ellipse].mean() > 0.6
    assert not foreground_mask(torch.zeros(2, 3, 32, 32)).any()
    frac = foreground_fraction(torch.cat([x, torch.zeros_like(x)]))
    assert frac[0] == pytest.approx(ellipse.mean(), abs=0.05) and frac[1] == 0


def test_mask_rejects_wrong_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(N, C, h, w\)"):
        foreground_mask(torch.zeros(32, 32))


def test_foreground_mode_is_not_compressed_by_a_bright_lesion() -> None:
    """Raw 12-bit-like values: the tissue's normalised level stays put when a very bright lesion appears
    (percentile window: it drops, the lesion compresses the rest)."""
    raw, ellipse = phantom()
    raw = raw * 2000  # tissue ~900 raw units
    lesion = phantom(lesion=1.0)[0][0] == 1.0
    les = raw.copy()
    les[:, lesion] = 6000.0  # the lesion is the brightest tissue by far (~5 % of the slice)
    tissue = ellipse & ~lesion & (raw[0] > 200)
    fg = IntensityConfig(mode="foreground", low=-3.0, high=5.0)
    pc = IntensityConfig(mode="percentile", low=0.5, high=99.5)
    a, b = normalize_intensity(raw, fg, raw.dtype), normalize_intensity(les, fg, les.dtype)
    assert abs(float(a[0][tissue].mean() - b[0][tissue].mean())) < 0.05  # ~0.3 robust SD
    assert float(b[0][lesion].mean()) == 1.0  # the lesion is at the top, clipped
    pa, pb = normalize_intensity(raw, pc, raw.dtype), normalize_intensity(les, pc, les.dtype)
    assert float(pa[0][tissue].mean() - pb[0][tissue].mean()) > 0.2  # what the percentile window does
    assert a.dtype == np.float32 and 0.0 <= a.min() and a.max() <= 1.0
    assert float(a[0][~ellipse].mean()) < 0.05  # air far below the tissue: 0


def test_foreground_mode_windows_channels_separately_and_handles_flat_images() -> None:
    raw, _ = phantom()
    raw = raw * np.array([100.0, 1000.0, 10.0], np.float32)[:, None, None]  # unrelated channel scales
    out = normalize_intensity(raw, IntensityConfig(mode="foreground", low=-3.0, high=5.0), raw.dtype)
    means = [float(c[c > 0.05].mean()) for c in out]
    assert max(means) - min(means) < 0.05
    flat = normalize_intensity(np.full((2, 8, 8), 7.0, np.float32), IntensityConfig(mode="foreground",
                               low=-3.0, high=5.0), np.dtype(np.float32))  # fmt: skip
    assert np.isfinite(flat).all() and flat.shape == (2, 8, 8)


def test_head_zeroes_the_map_outside_the_foreground_only_with_roi_auto() -> None:
    over = {"preprocess": {"size": [64, 64], "channels": 3}, "model": {"depth": 3}}
    chw, ellipse = phantom()
    x = torch.from_numpy(chw[None])
    recon = torch.rand_like(x)  # errors everywhere, background included
    plain = AnomalyHead(load_config(None, over))
    auto = AnomalyHead(load_config(None, {**over, "postprocess": {"roi": "auto"}}))
    m_plain = plain.finish(plain.raw_map(x, [recon]), torch.zeros(1), x).maps[0]
    m_auto = auto.finish(auto.raw_map(x, [recon]), torch.zeros(1), x).maps[0]
    fg = foreground_mask(x)[0]
    assert bool((m_auto[~fg] == 0).all()) and float(m_plain[~fg].min()) > 0
    assert torch.equal(m_auto[fg], m_plain[fg])
    assert torch.equal(plain.finish(plain.raw_map(x, [recon]), torch.zeros(1)).maps[0], m_plain)
    with pytest.raises(ValueError, match="needs the views"):
        auto.finish(auto.raw_map(x, [recon]), torch.zeros(1))


@pytest.mark.parametrize("preset", ["default", "industrial-gray", "industrial-rgb", "tiny"])
def test_industrial_presets_keep_the_roi_off(preset: str) -> None:
    cfg = load_config(preset)
    assert cfg.postprocess.roi == "none" and cfg.train.min_foreground == 0
    assert cfg.preprocess.intensity.mode != "foreground"


def test_foreground_mode_keeps_air_at_zero_when_tissue_varies_widely() -> None:
    """Tissue spread so wide that median - 3 SD falls below the air level (skull-base slices: fat, bone,
    sinuses): the window starts at the air's median instead, so air stays 0 and the ROI stays on tissue."""
    rng = np.random.default_rng(3)
    raw, ellipse = phantom()
    raw = np.where(ellipse, rng.uniform(10, 200, ellipse.shape), 8 + rng.normal(0, 1, ellipse.shape))
    raw = np.repeat(raw[None], 3, axis=0).astype(np.float32)
    out = normalize_intensity(raw, IntensityConfig(mode="foreground", low=-3.0, high=5.0), raw.dtype)
    assert float(np.median(out[:, ~ellipse])) == 0.0
    m = foreground_mask(torch.from_numpy(out[None]))[0].numpy()
    assert m[~ellipse].mean() < 0.1 and m[ellipse].mean() > 0.95
