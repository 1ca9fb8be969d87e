"""``ops.head.AnomalyHead`` against the formulas written out in float64 numpy (independent of ``ops.maps``),
for every map mix, standardisation, scale and score mode; traced to ONNX with a dynamic batch axis; and its
Triton backend (in the CPU interpreter) against its torch backend."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from imganom.config import load_config
from imganom.ops import triton_maps
from imganom.ops.head import AnomalyHead, HeadOutput, image_scores

H = W = 32


def _cfg(channels: int = 1, size: int = H, **sections: dict):
    over = {"preprocess": {"size": [size, size], "channels": channels}, "model": {"depth": 3}}
    for k, v in sections.items():
        over.setdefault(k, {}).update(v)
    return load_config(None, over)


def _gauss(sigma: float, r: int | None = None) -> np.ndarray:
    r = math.ceil(3 * sigma) if r is None else r
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    return k / k.sum()


def _blur(a: np.ndarray, sigma: float, r: int | None = None) -> np.ndarray:
    """Separable Gaussian over the last two axes, reflect padding (d c b | a b c d | c b a)."""
    if sigma <= 0:
        return a
    k = _gauss(sigma, r)
    r = len(k) // 2
    for ax in (a.ndim - 1, a.ndim - 2):
        pad = [(0, 0)] * a.ndim
        pad[ax] = (r, r)
        p = np.pad(a, pad, mode="reflect")
        a = sum(k[i] * np.take(p, range(i, i + a.shape[ax]), axis=ax) for i in range(len(k)))
    return a


def _pixel(x: np.ndarray, r: np.ndarray, mcfg) -> np.ndarray:
    d = x - r
    m = mcfg.l1 * np.abs(d) + mcfg.l2 * d * d
    if mcfg.ssim:
        w = mcfg.ssim_window // 2
        mx, mr = _blur(x, 1.5, w), _blur(r, 1.5, w)
        vx, vr = _blur(x * x, 1.5, w) - mx * mx, _blur(r * r, 1.5, w) - mr * mr
        cov = _blur(x * r, 1.5, w) - mx * mr
        c1, c2 = 0.01**2, 0.03**2
        s = (2 * mx * mr + c1) * (2 * cov + c2) / ((mx * mx + mr * mr + c1) * (vx + vr + c2))
        m = m + mcfg.ssim * 0.5 * (1 - s)
    return m.max(1) if mcfg.channel_reduce == "max" else m.mean(1)


def _reference(cfg, x, recons, kl, stats):
    """(maps, elbo, score maps or None, scores) in float64 from the formulas in the config's docs."""
    mcfg, post = cfg.map, cfg.postprocess
    sigma = post.sigma
    raw = np.mean([_pixel(x, r, mcfg) for r in recons], axis=0)
    z = mcfg.standardize if stats else "off"
    scales = [sigma, *mcfg.scales] if mcfg.scales and stats else []
    fused = len(recons) == 1 and z == "off" and not scales
    elbo = (_blur(raw, sigma) if fused else raw).reshape(len(x), -1).mean(1) + kl / x[0].size
    smaps = _blur((raw - stats["map_mean"]) / stats["map_std"], sigma) if z == "score" else None
    if z == "map":
        raw = (raw - stats["map_mean"]) / stats["map_std"]
    if scales:
        zs = [(_blur(raw, s) - stats["scale_mean"][k]) / stats["scale_std"][k] for k, s in enumerate(scales)]
        maps = np.max(zs, axis=0)
    else:
        maps = _blur(raw, sigma)
    b = post.border
    src = maps if smaps is None else smaps
    flat = (src[:, b : H - b, b : W - b] if b else src).reshape(len(x), -1)
    if post.score == "elbo":
        scores = elbo
    elif post.score == "max":
        scores = flat.max(1)
    else:
        k = max(1, math.ceil(post.topk * flat.shape[1]))
        scores = np.sort(flat, 1)[:, -k:].mean(1)
    return maps, elbo, smaps, scores


def _inputs(n: int, c: int, seed: int = 0, draws: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(n, c, 8, 8, generator=g), size=(H, W), mode="bilinear")
    recons = [(x + 0.08 * torch.randn(x.shape, generator=g)).clamp(0, 1) for _ in range(draws)]
    recons[0][..., 10:16, 12:20] = 0.9  # a defect
    kl = torch.rand(n, generator=g) * 50
    return x, recons, kl


def _stats(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "map_mean": 0.05 * torch.rand(H, W, generator=g),
        "map_std": 0.02 + 0.05 * torch.rand(H, W, generator=g),
        "scale_mean": torch.tensor([0.04, 0.03]),
        "scale_std": torch.tensor([0.01, 0.007]),
    }


MODES = [
    ("l1_ssim_mean", 1, {}, {}, False),
    ("l2_max_rgb", 3, {"map": {"l1": 0.0, "l2": 1.0, "ssim": 0.5, "channel_reduce": "max"}}, {}, False),
    ("l1_only_sigma0", 1, {"map": {"l1": 1.0, "ssim": 0.0}, "postprocess": {"sigma": 0.0}}, {}, False),
    ("standardize_map", 1, {"map": {"standardize": "map"}}, {}, True),
    ("standardize_score", 3, {"map": {"standardize": "score"}}, {}, True),
    ("scales", 1, {"map": {"scales": [3.0]}}, {}, True),
    ("scales_score_topk", 1, {"map": {"scales": [3.0], "standardize": "score"}},
     {"score": "topk_mean", "topk": 0.05, "border": 2}, True),
    ("uncalibrated_scales", 1, {"map": {"scales": [3.0], "standardize": "score"}}, {}, False),
    ("elbo_score", 1, {}, {"score": "elbo"}, False),
    ("topk_border", 1, {}, {"score": "topk_mean", "topk": 0.02, "border": 3}, False),
    ("mc_draws", 1, {"map": {"mc_samples": 2}}, {}, False),
]  # fmt: skip


@pytest.mark.parametrize("name, channels, over, post, with_stats", MODES, ids=[m[0] for m in MODES])
def test_head_matches_float64_formulas(name, channels, over, post, with_stats) -> None:
    sections = {k: v for k, v in over.items() if k != "postprocess"}
    cfg = _cfg(channels, **sections, postprocess={"sigma": 1.0, **over.get("postprocess", {}), **post})
    stats = _stats() if with_stats else None
    head = AnomalyHead(cfg, stats, backend="torch")
    x, recons, kl = _inputs(3, channels, draws=1 + cfg.map.mc_samples)
    out = head.finish(head.raw_map(x, recons), kl)
    scores = image_scores(out, cfg.postprocess, head.roi, head.n_roi)
    s64 = {k: v.double().numpy() for k, v in stats.items()} if stats else None
    want = _reference(cfg, x.double().numpy(), [r.double().numpy() for r in recons], kl.double().numpy(), s64)
    tol = 2e-4 if with_stats else 2e-5  # standardised maps divide fp32 rounding by the normal std
    np.testing.assert_allclose(out.maps.numpy(), want[0], rtol=0, atol=tol * np.abs(want[0]).max())
    np.testing.assert_allclose(out.elbo.numpy(), want[1], rtol=1e-5)
    assert (out.score_maps is None) == (want[2] is None)
    if want[2] is not None:
        np.testing.assert_allclose(out.score_maps.numpy(), want[2], rtol=0, atol=tol * np.abs(want[2]).max())
    np.testing.assert_allclose(scores.numpy(), want[3], rtol=tol)
    assert scores.dtype == torch.float64 and out.maps.shape == (3, H, W)
    # forward: the exported outputs, score in float32
    if not cfg.map.mc_samples:
        fwd = head(x, recons[0], kl)
        assert len(fwd) == len(head.output_names)
        torch.testing.assert_close(fwd[0], out.maps)
        torch.testing.assert_close(fwd[1], scores.float())


def test_head_modes_follow_statistics_and_config() -> None:
    cfg = _cfg(map={"standardize": "score", "scales": [4.0]}, postprocess={"sigma": 2.0})
    bare = AnomalyHead(cfg)
    assert (bare.standardize, bare.scales, bare.fused) == ("off", [], True)
    assert bare.output_names == ("anomaly_map", "score", "elbo")
    full = AnomalyHead(cfg, _stats())
    assert (full.standardize, full.scales, full.fused) == ("score", [2.0, 4.0], False)
    assert full.output_names == ("anomaly_map", "score", "elbo", "score_map")
    assert full.map_mean.shape == (1, H, W) and full.kernel("ssim").h.shape == (5, 1, 1, 11)
    with pytest.raises(ValueError, match="backend"):
        AnomalyHead(cfg, backend="cuda")
    with pytest.raises(ValueError, match="border"):
        AnomalyHead(_cfg(postprocess={"border": 16}))


def test_head_traces_to_onnx_with_a_dynamic_batch_axis(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    cfg = _cfg(map={"standardize": "score", "scales": [3.0]},
               postprocess={"sigma": 1.0, "score": "topk_mean", "topk": 0.05, "border": 2})  # fmt: skip
    head = AnomalyHead(cfg, _stats(), backend="torch").eval()
    x, recons, kl = _inputs(2, 1)
    path = tmp_path / "head.onnx"
    axes = {n: {0: "batch"} for n in ("x", "recon", "kl", *head.output_names)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(head, (x, recons[0], kl), str(path), input_names=["x", "recon", "kl"],
                          output_names=list(head.output_names), dynamic_axes=axes, dynamo=False)  # fmt: skip
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 3, 5):  # other batch sizes than the traced one
        x, recons, kl = _inputs(n, 1, seed=n)
        got = sess.run(None, {"x": x.numpy(), "recon": recons[0].numpy(), "kl": kl.numpy()})
        with torch.no_grad():
            want = [t.numpy() for t in head(x, recons[0], kl)]
        assert [g.shape for g in got] == [w.shape for w in want] == [(n, H, W), (n,), (n,), (n, H, W)]
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-4 * np.abs(w).max())


@pytest.fixture
def interpret(monkeypatch):
    if triton_maps.triton is None:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("standardize", ["off", "score"])
def test_triton_backend_matches_torch_backend(interpret, standardize: str) -> None:
    mcfg = {"standardize": standardize, "channel_reduce": "max"}
    cfg = _cfg(3, size=16, map=mcfg, postprocess={"sigma": 1.0})
    g = torch.Generator().manual_seed(0)
    mean, std = 0.05 * torch.rand(16, 16, generator=g), 0.05 + torch.rand(16, 16, generator=g)
    head = AnomalyHead(cfg, {"map_mean": mean, "map_std": std})
    x = torch.rand(2, 3, 16, 16, generator=g)
    r = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    kl = torch.rand(2, generator=g)
    assert triton_maps.map_backend(x, r, cfg.map, "auto") == "torch"  # CPU tensors: torch, even interpreted
    a = head.finish(head.raw_map(x, [r], backend="triton"), kl)
    b = head.finish(head.raw_map(x, [r], backend="torch"), kl)
    torch.testing.assert_close(a.maps, b.maps, rtol=0, atol=1e-5 if standardize == "off" else 1e-4)
    torch.testing.assert_close(a.elbo, b.elbo, rtol=1e-5, atol=1e-6)
    assert (a.score_maps is None) == (standardize == "off")
    out = HeadOutput(a.maps, a.elbo, a.score_maps)
    assert image_scores(out, cfg.postprocess).shape == (2,)
