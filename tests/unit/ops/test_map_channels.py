"""``map.channel_weights`` and ``map.residual: positive`` (medical-mri: only the FLAIR's hyperintensities)
against the formula in numpy, their validation, and the unchanged default."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imganom.config import ConfigError, MapConfig, load_config
from imganom.ops.maps import pixel_map
from imganom.ops.triton_maps import map_backend


def _pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g)


def test_weights_and_positive_residual_follow_the_formula() -> None:
    x, r = _pair()
    mcfg = MapConfig(l1=1.0, l2=0.5, ssim=0.0, channel_weights=[0.0, 2.0, 1.0], residual="positive")
    d = np.clip((x - r).numpy().astype(np.float64), 0, None)
    per = d + 0.5 * d * d
    want = (2.0 * per[:, 1] + per[:, 2]) / 3.0
    np.testing.assert_allclose(pixel_map(x, r, mcfg).numpy(), want, rtol=1e-5, atol=1e-6)
    mx = pixel_map(x, r, mcfg.model_copy(update={"channel_reduce": "max"})).numpy()
    np.testing.assert_allclose(mx, np.maximum(2.0 * per[:, 1], per[:, 2]), rtol=1e-5, atol=1e-6)


def test_only_the_weighted_channel_matters() -> None:
    x, r = _pair(1)
    mcfg = MapConfig(l1=0.5, ssim=0.5, channel_weights=[0.0, 1.0, 0.0], residual="positive")
    y = x.clone()
    y[:, 0] = torch.rand(2, 16, 16)  # another T1: no change
    torch.testing.assert_close(pixel_map(x, r, mcfg), pixel_map(y, r, mcfg))
    darker = x.clone()
    darker[:, 1] = r[:, 1] - 0.2  # input darker than the reconstruction: no L1 term left
    single = MapConfig(l1=1.0, ssim=0.0, channel_weights=[0.0, 1.0, 0.0], residual="positive")
    assert float(pixel_map(darker, r, single).abs().max()) == 0.0
    assert float(pixel_map(darker, r, single.model_copy(update={"residual": "abs"})).min()) > 0.19


def test_defaults_are_unchanged_and_validated() -> None:
    x, r = _pair(2)
    plain = MapConfig(l1=0.5, ssim=0.5)
    assert plain.channel_weights is None and plain.residual == "abs"
    assert torch.equal(pixel_map(x, r, plain), pixel_map(x, r, MapConfig(l1=0.5, ssim=0.5, residual="abs")))
    with pytest.raises(ValueError, match="channel_weights"):
        MapConfig(channel_weights=[0.0, 0.0])
    with pytest.raises(ConfigError, match="channel_weights has 2 entries"):
        load_config(None, {"preprocess": {"channels": 3}, "map": {"channel_weights": [1.0, 1.0]}})
    assert map_backend(x, r, MapConfig(channel_weights=[1.0, 1.0, 1.0])) == "torch"
