"""training.selfcheck: pseudo sets, normal-map statistics and the map: auto choice rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imganom.config import load_config
from imganom.training import selfcheck


def test_pseudo_set_puts_normals_first_with_empty_masks() -> None:
    views = [np.random.default_rng(i).uniform(0.3, 0.6, (1, 32, 32)).astype(np.float32) for i in range(3)]
    ps = selfcheck.PseudoSet.build(views, seed=4)
    assert ps.images.shape == (15, 1, 32, 32) and ps.n_normal == 3
    assert (
        ps.labels.tolist() == [0] * 3 + [1] * 12
        and not ps.masks[:3].any()
        and ps.masks[3:].any(axis=(1, 2)).all()
    )
    assert ps.families[3:7] == ["cutpaste", "perlin", "blob", "scratch"]
    assert torch.equal(ps.images, selfcheck.PseudoSet.build(views, seed=4).images)


def test_normal_statistics_match_their_definition() -> None:
    raw = torch.rand(6, 16, 16)
    mcfg = load_config(None, {"map": {"scales": [4.0]}}).map
    st = selfcheck.normal_statistics(raw, mcfg, 1.0)
    assert torch.allclose(st["map_mean"], raw.mean(0))
    assert (st["map_std"] >= raw.std(0) - 1e-6).all() and st["scale_mean"].shape == (2,)
    assert "scale_mean" not in selfcheck.normal_statistics(raw, load_config(None).map, 1.0)


@pytest.mark.parametrize("gain, keeps_own", [(0.05, False), (0.01, True)])
def test_map_auto_keeps_the_configured_setting_unless_clearly_beaten(
    monkeypatch: pytest.MonkeyPatch, gain: float, keeps_own: bool
) -> None:
    cfg = load_config("tiny", {"map": {"auto": True}})
    own = selfcheck.setting_of(cfg.map, cfg.postprocess.sigma, cfg.postprocess.score)
    other = {**own, "l1": 1.0, "ssim": 0.0, "scales": [8.0], "standardize": "score", "sigma": 2.0}
    rows = [
        {"setting": other, "image_auroc": 0.9, "pixel_auroc": 0.8, "aupro": 0.5, "mean": 0.7 + gain},
        {"setting": own, "image_auroc": 0.9, "pixel_auroc": 0.7, "aupro": 0.5, "mean": 0.7},
    ]
    seen = {}

    def fake_rank(model, pset, normals, c, device, extra=()):
        seen["extra"] = extra
        return rows

    monkeypatch.setattr(selfcheck, "rank_settings", fake_rank)
    new, rec = selfcheck.choose_map(None, None, None, cfg, torch.device("cpu"))
    assert seen["extra"][0][1] == cfg.postprocess.sigma and not seen["extra"][0][0].auto  # own setting ranked
    want = own if keeps_own else other
    assert rec["chosen"] == want and rec["metrics"]["mean"] == pytest.approx(0.7 + (0 if keeps_own else gain))
    assert (new.map.l1, new.map.scales, new.map.standardize, new.postprocess.sigma) == (
        want["l1"], want["scales"], want["standardize"], want["sigma"]
    )  # fmt: skip
    assert not new.map.auto and ("kept the configured" in rec["reason"]) == keeps_own
