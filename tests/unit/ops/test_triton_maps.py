"""Fused Triton anomaly-map kernels (imganom.ops.triton_maps) against the torch reference (imganom.ops.maps).

How interpreter mode is made robust: ``ops.triton_maps`` wraps its kernels with ``triton.jit`` lazily, once
per mode, at call time. So the ``interpret`` fixture only has to set ``TRITON_INTERPRET=1`` (monkeypatch)
before the call; it does not matter whether triton or ops.triton_maps were imported earlier, by this or any
other module, without it. The interpreter is slow: inputs here are tiny. ``TestGPU`` (skipped without CUDA)
unsets the variable so the compiled kernels run, and checks half-precision error bounds at 256x256.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from imganom.config import MapConfig
from imganom.ops import maps as am
from imganom.ops import triton_maps as kernels
from imganom.ops.maps import anomaly_map
from imganom.ops.triton_maps import compute_anomaly_map, fused_anomaly_map, triton_available

HAVE_TRITON = kernels.triton is not None
HAVE_CUDA = torch.cuda.is_available()
FP32_TOL = 1e-5  # abs; same fp32 math, different summation order


@pytest.fixture
def interpret(monkeypatch):
    """Run the Triton kernels in the CPU interpreter for this test."""
    if not HAVE_TRITON:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def no_interpret(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _pair(shape, dtype=torch.float32, seed=0, flat=False):
    """Random image in [0, 1] and a noisy 'reconstruction' with a defect; optionally a flat patch in both."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g)
    r = (x + 0.1 * torch.randn(shape, generator=g)).clamp(0, 1)
    h, w = shape[-2:]
    r[..., h // 2 :, : max(1, w // 3)] = 1.0  # defect
    if flat:  # SSIM variances ~0 there: the cancellation-sensitive case
        x[..., : h // 2, w // 3 :] = 0.4
        r[..., : h // 2, w // 3 :] = 0.4
    return x.to(dtype), r.to(dtype)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# (shape, MapConfig overrides, sigma)
CASES = [
    ((1, 1, 16, 16), {}, 0.0),
    ((1, 1, 16, 16), {}, 2.0),
    ((2, 3, 17, 23), {}, 2.0),
    ((2, 3, 17, 23), {"channel_reduce": "max"}, 0.0),
    ((1, 4, 9, 31), {"channel_reduce": "max"}, 2.0),
    ((1, 4, 9, 31), {"l1": 0.0, "l2": 1.0, "ssim": 2.0}, 0.3),
    ((1, 3, 5, 7), {}, 2.0),  # smaller than the SSIM window and the blur radius: replicate padding
    ((1, 3, 5, 7), {"channel_reduce": "max"}, 0.0),
    ((1, 2, 6, 40), {"l2": 1.0}, 2.0),  # reflect for SSIM (6 > 5), replicate for the blur (6 <= 6)
    ((1, 1, 70, 20), {"ssim_window": 7}, 1.0),  # several row tiles
    ((1, 2, 13, 12), {"l1": 0.0, "ssim": 1.0, "ssim_window": 3}, 2.0),
    ((1, 3, 12, 13), {"l1": 1.0, "l2": 0.5, "ssim": 0.0}, 2.0),  # no SSIM: residual-only kernel variant
    ((1, 1, 1, 9), {}, 1.0),  # a single row
]


@pytest.mark.parametrize("shape,over,sigma", CASES, ids=[f"{s}-{o}-{g}" for s, o, g in CASES])
def test_fp32_matches_reference(interpret, shape, over, sigma):
    cfg = MapConfig(**over)
    x, r = _pair(shape)
    out = fused_anomaly_map(x, r, cfg, sigma)
    ref = anomaly_map(x, r, cfg, sigma)
    assert out.shape == (shape[0], *shape[2:]) and out.dtype == torch.float32
    assert _max_err(out, ref) <= FP32_TOL


def _pixel_map_f64(x: torch.Tensor, r: torch.Tensor, cfg: MapConfig) -> torch.Tensor:
    """The reference formula evaluated in float64 (ground truth for the cancellation-sensitive case)."""
    x, r = x.double(), r.double()
    k = am.gaussian_kernel1d(am.SSIM_SIGMA, radius=cfg.ssim_window // 2).double()
    k5 = am.sep_kernel(k, 5 * x.shape[1])
    mx, mr, xx, rr, xr = am.sep_conv(torch.cat([x, r, x * x, r * r, x * r], 1), k5).split(x.shape[1], 1)
    num = (2 * mx * mr + am.SSIM_C1) * (2 * (xr - mx * mr) + am.SSIM_C2)
    den = (mx * mx + mr * mr + am.SSIM_C1) * (xx - mx * mx + rr - mr * mr + am.SSIM_C2)
    m = cfg.l1 * (x - r).abs() + cfg.l2 * (x - r) ** 2 + cfg.ssim * 0.5 * (1 - num / den)
    return m.amax(1) if cfg.channel_reduce == "max" else m.mean(1)


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_flat_regions_as_accurate_as_reference(interpret, reduce):
    # Flat areas: SSIM variances are differences of nearly equal moments, so any fp32 evaluation is off by
    # ~1e-5 there (the torch reference too: up to ~1.4e-5 here). Check the kernel against float64 instead.
    cfg = MapConfig(channel_reduce=reduce)
    x, r = _pair((2, 3, 17, 23), flat=True)
    truth = _pixel_map_f64(x, r, cfg)
    out = fused_anomaly_map(x, r, cfg, 0.0)
    assert _max_err(out.double(), truth) <= 2e-5
    assert _max_err(out, anomaly_map(x, r, cfg, 0.0)) <= 5e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_half_inputs_match_reference_on_upcast_inputs(interpret, dtype, reduce):
    # The kernel upcasts on load, so vs the reference on the same (rounded) inputs it is fp32-exact: 1e-5 abs.
    cfg = MapConfig(channel_reduce=reduce)
    x, r = _pair((2, 3, 17, 23), dtype=dtype, seed=1)
    out = fused_anomaly_map(x, r, cfg, 2.0)
    assert out.dtype == torch.float32
    assert _max_err(out, anomaly_map(x.float(), r.float(), cfg, 2.0)) <= FP32_TOL


def test_mixed_dtypes_and_strided_inputs(interpret):
    cfg = MapConfig()
    x, r = _pair((2, 3, 21, 30), seed=2)
    ref = anomaly_map(x[:, :, 2:19, 3:26], r[:, :, 2:19, 3:26].bfloat16().float(), cfg, 2.0)
    xv = x[:, :, 2:19, 3:26]  # non-contiguous crop
    rv = r.bfloat16().contiguous(memory_format=torch.channels_last)[:, :, 2:19, 3:26]
    assert not xv.is_contiguous() and not rv.is_contiguous()
    assert _max_err(fused_anomaly_map(xv, rv, cfg, 2.0), ref) <= FP32_TOL


def test_empty_batch_and_bad_shapes(interpret):
    x = torch.rand(0, 3, 8, 8)
    assert fused_anomaly_map(x, x, MapConfig(), 2.0).shape == (0, 8, 8)
    with pytest.raises(ValueError, match="same shape|one shape"):
        fused_anomaly_map(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9), MapConfig(), 2.0)
    with pytest.raises(ValueError):
        fused_anomaly_map(torch.rand(3, 8, 8), torch.rand(3, 8, 8), MapConfig(), 2.0)


def test_map_localises_defect(interpret):
    x = torch.full((1, 1, 24, 24), 0.5)
    r = x.clone()
    r[..., 10:14, 10:14] = 0.9
    out = fused_anomaly_map(x, r, MapConfig(), 1.0)[0]
    peak = divmod(int(out.argmax()), 24)
    assert 9 <= peak[0] <= 14 and 9 <= peak[1] <= 14
    assert out[0, 0] < 1e-6 < out[11, 11]


# --- backend selection ---------------------------------------------------------------------------------


def _boom(*args, **kwargs):
    raise AssertionError("fused path must not be used here")


def test_auto_on_cpu_uses_torch_path(no_interpret, monkeypatch):
    monkeypatch.setattr(kernels, "fused_anomaly_map", _boom)
    x, r = _pair((1, 3, 16, 16))
    cfg = MapConfig()
    assert torch.equal(compute_anomaly_map(x, r, cfg, 2.0), anomaly_map(x, r, cfg, 2.0))
    assert torch.equal(compute_anomaly_map(x, r, cfg, 2.0, backend="torch"), anomaly_map(x, r, cfg, 2.0))


def test_auto_on_cpu_uses_torch_path_even_in_interpreter_mode(interpret, monkeypatch):
    monkeypatch.setattr(kernels, "fused_anomaly_map", _boom)
    x, r = _pair((1, 1, 8, 8))
    assert torch.equal(compute_anomaly_map(x, r, MapConfig(), 0.0), anomaly_map(x, r, MapConfig(), 0.0))


def test_forced_triton_backend_in_interpreter(interpret):
    x, r = _pair((1, 3, 10, 12))
    cfg = MapConfig(channel_reduce="max")
    out = compute_anomaly_map(x, r, cfg, 2.0, backend="triton")
    assert _max_err(out, anomaly_map(x, r, cfg, 2.0)) <= FP32_TOL


def test_forced_triton_on_cpu_tensors_without_interpreter_raises(no_interpret):
    x, r = _pair((1, 1, 8, 8))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET|not installed"):
        compute_anomaly_map(x, r, MapConfig(), 2.0, backend="triton")


def test_triton_available_follows_interpreter_env(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_available() == HAVE_TRITON
    monkeypatch.delenv("TRITON_INTERPRET")
    assert triton_available() == (HAVE_TRITON and HAVE_CUDA)


def test_unsupported_inputs_raise_for_triton_backend(interpret):
    x, r = _pair((1, 1, 8, 8))
    with pytest.raises(RuntimeError, match="dtypes"):
        compute_anomaly_map(x.double(), r.double(), MapConfig(), 0.0, backend="triton")
    with pytest.raises(RuntimeError, match="ssim_window"):
        compute_anomaly_map(x, r, MapConfig(ssim_window=2 * kernels.MAX_RADIUS + 3), 0.0, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        compute_anomaly_map(x, r, MapConfig(), 0.0, backend="cuda")


def test_works_without_triton_installed():
    """A subprocess where `import triton` fails: the module imports, reports no Triton, falls back."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from imganom.config import MapConfig\n"
        "from imganom.ops.maps import anomaly_map\n"
        "from imganom.ops.triton_maps import compute_anomaly_map, triton_available\n"
        "assert not triton_available()\n"
        "x = torch.rand(1, 2, 9, 9); r = torch.rand(1, 2, 9, 9)\n"
        "cfg = MapConfig()\n"
        "assert torch.equal(compute_anomaly_map(x, r, cfg, 1.0), anomaly_map(x, r, cfg, 1.0))\n"
        "try:\n"
        "    compute_anomaly_map(x, r, MapConfig(), 1.0, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'not installed' in str(e)\n"
        "else:\n"
        "    raise SystemExit('expected RuntimeError')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


# --- the compiled (GPU) path ----------------------------------------------------------------------------


def _compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int):
    """Ahead-of-time compile a kernel for an H100 (sm_90a) with no GPU present; returns the CompiledKernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    sig = {n: signature.get(n, "constexpr") for n in names}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return kernels.triton.compile(src, target=GPUTarget("cuda", 90, 128), options={"num_warps": num_warps})


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_kernels_compile_for_h100_with_tensor_core_vertical_pass(no_interpret):
    """Lowers both kernels to sm_90a (ptxas included) as fused_anomaly_map launches them: bf16, 3 channels,
    256x256, 11-tap SSIM, sigma 2. Checks the banded vertical pass became wgmma (tensor-core) instructions."""
    pixel, blur = kernels._kernels(False)
    ph, bw, warps = kernels._tile(256, 256, 5, max_bw=16)
    ints = ["C", "H", "W", "sx_b", "sx_c", "sx_h", "sr_b", "sr_c", "sr_h"]
    sig = {"x_ptr": "*bf16", "r_ptr": "*bf16", "w_ptr": "*fp32", "out_ptr": "*fp32"}
    sig |= {n: "i32" for n in ints} | {n: "fp32" for n in ["l1", "l2", "ssim_half", "c1", "c2"]}
    const = {"sx_w": 1, "sr_w": 1, "WIN": 11, "REFLECT": True, "USE_SSIM": True, "REDUCE_MAX": False}
    const |= {"PH": ph, "BW": bw, "PREC": kernels._DOT_PRECISION}
    ptx = _compile_sm90(pixel, sig, const, warps).asm["ptx"]
    assert "wgmma" in ptx and "ld.global" in ptx
    ph, bw, warps = kernels._tile(256, 256, 6, max_bw=64)
    sig = {"m_ptr": "*fp32", "w_ptr": "*fp32", "out_ptr": "*fp32", "H": "i32", "W": "i32"}
    const = {"WIN": 13, "REFLECT": True, "PH": ph, "BW": bw, "PREC": kernels._DOT_PRECISION}
    assert "wgmma" in _compile_sm90(blur, sig, const, warps).asm["ptx"]


def _scene(b, c, h, w, seed=0):
    """Smooth texture with a flat area; recon = noisy copy with a bright defect (map max ~0.4)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, c, h // 16, w // 16, generator=g)
    low = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    x = (0.2 + 0.6 * low + 0.05 * torch.rand(b, c, h, w, generator=g)).clamp(0, 1)
    x[:, :, h // 8 : h // 3, w // 8 : w // 2] = 0.5
    r = (x + 0.02 * torch.randn(b, c, h, w, generator=g)).clamp(0, 1)
    r[:, :, h // 2 : h // 2 + h // 10, w // 2 : w // 2 + w // 10] += 0.4
    return x.cuda(), r.clamp(0, 1).cuda()


@pytest.mark.skipif(not (HAVE_CUDA and HAVE_TRITON), reason="needs a CUDA device and triton")
class TestGPU:
    @pytest.fixture(autouse=True)
    def _compiled_and_exact_reference(self, monkeypatch):
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        # cuDNN's default TF32 convolutions make the *reference* SSIM inaccurate (~0.07 abs in flat areas).
        prev = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        yield
        torch.backends.cudnn.allow_tf32 = prev

    # Bound vs the fp32 reference, as a fraction of the map's max. bf16 input rounding alone costs ~0.6%
    # (mean) / ~1.1% (max over channels) on this content (measured with the torch reference): 2e-2 there.
    BOUNDS = {
        (torch.float32, "mean"): 1e-3,
        (torch.float32, "max"): 1e-3,
        (torch.float16, "mean"): 1e-2,
        (torch.float16, "max"): 1e-2,
        (torch.bfloat16, "mean"): 1e-2,
        (torch.bfloat16, "max"): 2e-2,
    }

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("reduce", ["mean", "max"])
    def test_error_bounds_vs_fp32_reference(self, dtype, reduce):
        cfg = MapConfig(channel_reduce=reduce)
        x, r = _scene(8, 3, 256, 256)
        ref = anomaly_map(x, r, cfg, 2.0)
        xh, rh = x.to(dtype), r.to(dtype)
        out = fused_anomaly_map(xh, rh, cfg, 2.0)
        scale = ref.abs().max().item()
        assert out.dtype == torch.float32 and out.shape == (8, 256, 256)
        assert _max_err(out, ref) <= self.BOUNDS[(dtype, reduce)] * scale
        # The kernel itself (tf32x3 tensor-core vertical pass) adds ~nothing beyond input rounding.
        assert _max_err(out, anomaly_map(xh.float(), rh.float(), cfg, 2.0)) <= 1e-3 * scale

    @pytest.mark.parametrize("shape", [(1, 1, 255, 257), (3, 4, 100, 37), (2, 3, 5, 7)])
    def test_odd_shapes(self, shape):
        cfg = MapConfig(l2=0.5)
        x, r = _scene(shape[0], shape[1], max(shape[2], 32), max(shape[3], 32))
        x, r = x[..., : shape[2], : shape[3]], r[..., : shape[2], : shape[3]]
        ref = anomaly_map(x, r, cfg, 2.0)
        out = fused_anomaly_map(x.half(), r.half(), cfg, 2.0)
        assert _max_err(out, ref) <= 1e-2 * ref.abs().max().item()

    def test_auto_uses_fused_path_on_cuda_unless_grad(self, monkeypatch):
        x, r = _scene(1, 3, 64, 64)
        calls = []
        real = kernels.fused_anomaly_map
        monkeypatch.setattr(kernels, "fused_anomaly_map", lambda *a: calls.append(1) or real(*a))
        compute_anomaly_map(x, r, MapConfig(), 2.0)
        assert calls == [1]
        out = compute_anomaly_map(x.requires_grad_(), r, MapConfig(), 2.0)
        assert calls == [1] and out.requires_grad
