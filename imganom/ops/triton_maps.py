"""Fused mixed-precision Triton kernels for the anomaly map (the torch reference is ``maps.py``).

Two launches, each about one pass over memory:

1. ``_pixel_map_kernel`` reads x and recon once (fp32/fp16/bf16, upcast to fp32 in registers), computes
   l1*|d| + l2*d^2 + ssim*(1-SSIM)/2 per channel, reduces over channels (mean/max) and writes the unsmoothed
   (B, H, W) float32 map.
2. ``_blur_kernel`` applies the separable Gaussian smoothing to that map (fp32 in, fp32 out).

Tiling (both kernels): a program owns ``BW`` columns and ``PH`` "halo" rows starting ``R`` rows above its
first output row. The horizontal Gaussian pass is a loop over the taps with shifted loads (neighbouring
columns are L1/L2 hits). The vertical pass is a banded matrix product ``band[PH, PH] @ h[PH, BW]`` with
``band[i, j] = w[j - i]``: row i of the product is the output for image row ``y0 + i``; only the first
``PH - 2R`` rows are complete, so tiles advance by ``PH - 2R`` rows. On the GPU the product runs on tensor
cores in ``tf32x3`` (about fp32 accuracy: SSIM variances are differences of moments and need it).

Padding matches ``maps.sep_conv``: reflect by index reflection, or replicate (index clamping) when the
image's smaller side is not larger than the radius.

The kernels are wrapped with ``triton.jit`` lazily, once per interpreter mode, so ``TRITON_INTERPRET=1`` is
honoured whenever it is set before a call (tests), not only when set before this module was imported. For the
same reason they use only builtin ``tl`` ops (``tl.full``, not ``tl.zeros``): triton's own ``@jit`` library
functions are bound to the mode that was active when triton was imported, and fail in the other mode.
"""

import math
import os
from contextlib import nullcontext

import torch

from imganom.config import MapConfig
from imganom.ops.maps import SSIM_C1, SSIM_C2, SSIM_SIGMA, anomaly_map, gaussian_blur, gaussian_kernel1d

try:  # Optional dependency: without it the package works, on the torch path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised by a subprocess test
    triton = None
    tl = None

__all__ = ["triton_available", "fused_anomaly_map", "compute_anomaly_map", "map_backend"]

MAX_RADIUS = 31  # largest window radius the kernels take (63 taps); larger falls back to torch
_DOT_PRECISION = "tf32x3"  # vertical pass on tensor cores with ~fp32 accuracy ("ieee": exact fp32 FMAs)
_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    """Triton is importable and can run here: a CUDA device is present, or TRITON_INTERPRET=1."""
    return triton is not None and (torch.cuda.is_available() or _interpret_mode())


if triton is not None:

    def _pixel_map_kernel(
        x_ptr, r_ptr, w_ptr, out_ptr,
        C, H, W,
        sx_b, sx_c, sx_h, sx_w,
        sr_b, sr_c, sr_h, sr_w,
        l1, l2, ssim_half, c1, c2,
        WIN: tl.constexpr, REFLECT: tl.constexpr, USE_SSIM: tl.constexpr, REDUCE_MAX: tl.constexpr,
        PH: tl.constexpr, BW: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """Unsmoothed map for one (image, tile): grid = (column tiles, row tiles, batch)."""
        R: tl.constexpr = WIN // 2
        b = tl.program_id(2).to(tl.int64)
        y0 = tl.program_id(1) * (PH - 2 * R)
        t = tl.arange(0, PH)
        cols = tl.program_id(0) * BW + tl.arange(0, BW)

        # Output pixels: row y0 + t for t < PH - 2R. Unused lanes are clamped so every load stays in bounds.
        valid = ((t < PH - 2 * R) & (y0 + t < H))[:, None] & (cols < W)[None, :]
        orow = tl.minimum(y0 + t, H - 1)
        ocol = tl.minimum(cols, W - 1)

        # Input rows feeding the vertical pass (halo of R above), reflected or clamped.
        hrow = y0 - R + t
        if REFLECT:
            hrow = tl.abs(hrow)
            hrow = tl.where(hrow > H - 1, 2 * H - 2 - hrow, hrow)
        hrow = tl.minimum(tl.maximum(hrow, 0), H - 1)

        if USE_SSIM:
            # Banded Toeplitz matrix of the Gaussian taps: band[i, j] = w[j - i] for 0 <= j - i < WIN.
            kk = t[None, :] - t[:, None]
            in_band = (kk >= 0) & (kk < WIN)
            band = tl.load(w_ptr + tl.where(in_band, kk, 0), mask=in_band, other=0.0)

        if REDUCE_MAX:
            acc = tl.full((PH, BW), float("-inf"), tl.float32)
        else:
            acc = tl.full((PH, BW), 0.0, tl.float32)
        x_img = x_ptr + b * sx_b
        r_img = r_ptr + b * sr_b
        for c in range(C):
            xc = x_img + c * sx_c
            rc = r_img + c * sr_c
            xo = tl.load(xc + orow[:, None] * sx_h + ocol[None, :] * sx_w).to(tl.float32)
            ro = tl.load(rc + orow[:, None] * sr_h + ocol[None, :] * sr_w).to(tl.float32)
            d = xo - ro
            val = l1 * tl.abs(d) + l2 * d * d
            if USE_SSIM:
                # Horizontal pass: Gaussian-weighted moments of x, r, x^2, r^2, x*r along each halo row.
                hx = tl.full((PH, BW), 0.0, tl.float32)
                hr = tl.full((PH, BW), 0.0, tl.float32)
                hxx = tl.full((PH, BW), 0.0, tl.float32)
                hrr = tl.full((PH, BW), 0.0, tl.float32)
                hxr = tl.full((PH, BW), 0.0, tl.float32)
                for k in range(WIN):
                    col = cols + (k - R)
                    if REFLECT:
                        col = tl.abs(col)
                        col = tl.where(col > W - 1, 2 * W - 2 - col, col)
                    col = tl.minimum(tl.maximum(col, 0), W - 1)
                    xv = tl.load(xc + hrow[:, None] * sx_h + col[None, :] * sx_w).to(tl.float32)
                    rv = tl.load(rc + hrow[:, None] * sr_h + col[None, :] * sr_w).to(tl.float32)
                    wk = tl.load(w_ptr + k)
                    hx += wk * xv
                    hr += wk * rv
                    hxx += wk * (xv * xv)
                    hrr += wk * (rv * rv)
                    hxr += wk * (xv * rv)
                # Vertical pass as banded matrix products.
                mx = tl.dot(band, hx, input_precision=PREC)
                mr = tl.dot(band, hr, input_precision=PREC)
                vx = tl.dot(band, hxx, input_precision=PREC) - mx * mx
                vr = tl.dot(band, hrr, input_precision=PREC) - mr * mr
                cov = tl.dot(band, hxr, input_precision=PREC) - mx * mr
                num = (2 * mx * mr + c1) * (2 * cov + c2)
                den = (mx * mx + mr * mr + c1) * (vx + vr + c2)
                val += ssim_half * (1.0 - num / den)
            if REDUCE_MAX:
                acc = tl.maximum(acc, val)
            else:
                acc += val
        if not REDUCE_MAX:
            acc = acc / C
        tl.store(out_ptr + b * H * W + orow[:, None] * W + ocol[None, :], acc, mask=valid)

    def _blur_kernel(
        m_ptr, w_ptr, out_ptr, H, W,
        WIN: tl.constexpr, REFLECT: tl.constexpr, PH: tl.constexpr, BW: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """Separable Gaussian smoothing of a contiguous (B, H, W) float32 map; same tiling as above."""
        R: tl.constexpr = WIN // 2
        b = tl.program_id(2).to(tl.int64)
        y0 = tl.program_id(1) * (PH - 2 * R)
        t = tl.arange(0, PH)
        cols = tl.program_id(0) * BW + tl.arange(0, BW)
        valid = ((t < PH - 2 * R) & (y0 + t < H))[:, None] & (cols < W)[None, :]
        orow = tl.minimum(y0 + t, H - 1)
        ocol = tl.minimum(cols, W - 1)
        hrow = y0 - R + t
        if REFLECT:
            hrow = tl.abs(hrow)
            hrow = tl.where(hrow > H - 1, 2 * H - 2 - hrow, hrow)
        hrow = tl.minimum(tl.maximum(hrow, 0), H - 1)
        kk = t[None, :] - t[:, None]
        in_band = (kk >= 0) & (kk < WIN)
        band = tl.load(w_ptr + tl.where(in_band, kk, 0), mask=in_band, other=0.0)

        img = m_ptr + b * H * W
        h = tl.full((PH, BW), 0.0, tl.float32)
        for k in range(WIN):
            col = cols + (k - R)
            if REFLECT:
                col = tl.abs(col)
                col = tl.where(col > W - 1, 2 * W - 2 - col, col)
            col = tl.minimum(tl.maximum(col, 0), W - 1)
            h += tl.load(w_ptr + k) * tl.load(img + hrow[:, None] * W + col[None, :])
        out = tl.dot(band, h, input_precision=PREC)
        tl.store(out_ptr + b * H * W + orow[:, None] * W + ocol[None, :], out, mask=valid)

    _KERNELS: dict = {}

    def _kernels(interpret: bool) -> tuple:
        """(pixel kernel, blur kernel) wrapped by triton.jit for this mode (compiled or interpreter)."""
        if interpret not in _KERNELS:
            _KERNELS[interpret] = (triton.jit(_pixel_map_kernel), triton.jit(_blur_kernel))
        return _KERNELS[interpret]


_TAPS: dict = {}


def _taps(sigma: float, radius: int, device: torch.device) -> torch.Tensor:
    """Cached Gaussian taps on ``device`` (avoids tiny host->device work on every call)."""
    key = (sigma, radius, str(device))
    if key not in _TAPS:
        _TAPS[key] = gaussian_kernel1d(sigma, radius=radius, device=device).contiguous()
    return _TAPS[key]


def _tile(h: int, w: int, radius: int, max_bw: int) -> tuple[int, int, int]:
    """(PH halo rows, BW columns, warps): PH - 2*radius output rows per tile, smaller tiles for small images.

    Sized so that the sm_90 build does not spill registers for the usual windows (11-tap SSIM, sigma <= 5).
    """
    ph = max(16, triton.next_power_of_2(2 * radius + min(h, 32)))
    bw = max(16, min(max_bw, triton.next_power_of_2(w)))
    return ph, bw, 4 if ph * bw <= 64 * 16 else 8


def _unsupported(x: torch.Tensor, recon: torch.Tensor, cfg: MapConfig) -> str | None:
    """Why the fused path cannot run on these inputs, or None when it can."""
    if triton is None:
        return "triton is not installed"
    if not x.is_cuda and not _interpret_mode():
        return f"inputs are on {x.device}: the kernels need CUDA tensors (CPU tensors: TRITON_INTERPRET=1)"
    if x.is_cuda and not torch.cuda.is_available():  # pragma: no cover - impossible in practice
        return "CUDA is not available"
    if x.dtype not in _INPUT_DTYPES or recon.dtype not in _INPUT_DTYPES:
        return f"dtypes {x.dtype}/{recon.dtype} not supported (float32, float16, bfloat16)"
    if cfg.channel_weights is not None or cfg.residual != "abs":
        return "channel_weights / positive residual: torch only"
    if cfg.ssim and cfg.ssim_window // 2 > MAX_RADIUS:
        return f"ssim_window {cfg.ssim_window} larger than {2 * MAX_RADIUS + 1}"
    return None


def _check_shapes(x: torch.Tensor, recon: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape != recon.shape:
        raise ValueError(f"x and recon must be (B, C, H, W) of one shape, got {x.shape} and {recon.shape}")
    if x.shape[1] < 1:
        raise ValueError("x must have at least one channel")
    if x.device != recon.device:
        raise ValueError(f"x and recon are on different devices ({x.device}, {recon.device})")


def _blur(m: torch.Tensor, sigma: float, interpret: bool) -> torch.Tensor:
    """Gaussian smoothing of a contiguous (B, H, W) float32 map with the Triton blur kernel."""
    radius = int(math.ceil(3.0 * sigma))
    if radius > MAX_RADIUS:
        return gaussian_blur(m, sigma)
    bsz, h, w = m.shape
    ph, bw, warps = _tile(h, w, radius, max_bw=64)
    out = torch.empty_like(m)
    grid = (triton.cdiv(w, bw), triton.cdiv(h, ph - 2 * radius), bsz)
    _kernels(interpret)[1][grid](
        m, _taps(sigma, radius, m.device), out, h, w,
        WIN=2 * radius + 1, REFLECT=min(h, w) > radius, PH=ph, BW=bw,
        PREC="ieee" if interpret else _DOT_PRECISION, num_warps=warps,
    )  # fmt: skip
    return out


def fused_anomaly_map(x: torch.Tensor, recon: torch.Tensor, cfg: MapConfig, sigma: float) -> torch.Tensor:
    """Smoothed anomaly map (B, H, W) float32 with the fused Triton kernels; same contract as ``anomaly_map``.

    Inputs (B, C, H, W) float32/float16/bfloat16 (x and recon may differ, any strides) on CUDA, or CPU tensors
    under TRITON_INTERPRET=1; arithmetic in float32. The result carries no autograd history.
    Raises RuntimeError when the kernels cannot run here, ValueError for bad shapes.
    """
    _check_shapes(x, recon)
    reason = _unsupported(x, recon, cfg)
    if reason is not None:
        raise RuntimeError(f"fused_anomaly_map cannot run: {reason}")
    bsz, c, h, w = x.shape
    out = torch.empty((bsz, h, w), dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out
    interpret = _interpret_mode()
    use_ssim = bool(cfg.ssim)
    radius = cfg.ssim_window // 2 if use_ssim else 0
    ph, bw, warps = _tile(h, w, radius, max_bw=16)
    grid = (triton.cdiv(w, bw), triton.cdiv(h, ph - 2 * radius), bsz)
    with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
        _kernels(interpret)[0][grid](
            x.detach(), recon.detach(), _taps(SSIM_SIGMA, radius, x.device), out,
            c, h, w, *x.stride(), *recon.stride(),
            float(cfg.l1), float(cfg.l2), float(cfg.ssim) * 0.5, SSIM_C1, SSIM_C2,
            WIN=2 * radius + 1, REFLECT=min(h, w) > radius, USE_SSIM=use_ssim,
            REDUCE_MAX=cfg.channel_reduce == "max", PH=ph, BW=bw,
            PREC="ieee" if interpret else _DOT_PRECISION, num_warps=warps,
        )  # fmt: skip
        if sigma > 0:
            out = _blur(out, sigma, interpret)
    return out


def map_backend(x: torch.Tensor, recon: torch.Tensor, cfg: MapConfig, backend: str = "auto") -> str:
    """``"triton"`` or ``"torch"``: which implementation computes the map term for these inputs.

    ``auto``: the fused Triton kernels for CUDA inputs when Triton is available (and no gradient is needed),
    else the torch reference; ``torch`` / ``triton`` force one (``triton`` raises later if impossible).
    """
    if backend in ("torch", "triton"):
        return backend
    if backend != "auto":
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or recon.requires_grad)
    if x.is_cuda and triton_available() and not needs_grad and _unsupported(x, recon, cfg) is None:
        return "triton"
    return "torch"


def compute_anomaly_map(
    x: torch.Tensor, recon: torch.Tensor, cfg: MapConfig, sigma: float, backend: str = "auto"
) -> torch.Tensor:
    """Smoothed anomaly map (B, H, W) float32 on the backend ``map_backend`` picks."""
    if map_backend(x, recon, cfg, backend) == "triton":
        return fused_anomaly_map(x, recon, cfg, sigma)
    return anomaly_map(x, recon, cfg, sigma)
