"""Anomaly maps in plain torch: the reference implementation and the CPU path.

``pixel_map`` = l1*|x-r| + l2*(x-r)^2 + ssim*(1-SSIM)/2, reduced over channels (mean or max);
``gaussian_blur`` smooths it. Every function takes its Gaussian kernel precomputed (``AnomalyHead`` keeps
them as buffers, so the graph traces with static kernels) or computes it from sigma. The fused Triton
kernels in ``triton_maps.py`` must match these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from imganom.config import MapConfig

SSIM_SIGMA = 1.5
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2


def gaussian_kernel1d(sigma: float, radius: int | None = None, device=None) -> torch.Tensor:
    """Normalised 1-D Gaussian taps, radius = ceil(3*sigma) unless given."""
    r = int(math.ceil(3.0 * sigma)) if radius is None else radius
    x = torch.arange(-r, r + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


class SepKernel(NamedTuple):
    """A separable Gaussian as depthwise conv weights: horizontal (c, 1, 1, K), vertical (c, 1, K, 1), and
    the radius as a Python int (static shapes and pads: what the ONNX tracer needs)."""

    h: torch.Tensor
    v: torch.Tensor
    radius: int


def sep_kernel(taps: torch.Tensor, channels: int, expand: bool = True) -> SepKernel:
    """``SepKernel`` of 1-D taps for ``channels`` channels; ``expand=False`` gives contiguous weights (to
    keep as buffers), ``True`` stride-0 views (cheap, per call)."""
    kh, kv = taps.view(1, 1, 1, -1), taps.view(1, 1, -1, 1)
    if expand:
        return SepKernel(kh.expand(channels, 1, 1, -1), kv.expand(channels, 1, -1, 1), taps.numel() // 2)
    return SepKernel(kh.repeat(channels, 1, 1, 1), kv.repeat(channels, 1, 1, 1), taps.numel() // 2)


def sep_conv(x: torch.Tensor, k: SepKernel) -> torch.Tensor:
    """Depthwise separable convolution of (N, C, H, W) with ``k`` (C channels); reflect padding, or
    replicate when a side is not larger than the radius."""
    c, r = k.h.shape[0], k.radius
    mode = "reflect" if min(x.shape[-2:]) > r else "replicate"
    x = _conv(F.pad(x, (r, r, 0, 0), mode=mode), k.h, c)
    return _conv(F.pad(x, (0, 0, r, r), mode=mode), k.v, c)


def _conv(x: torch.Tensor, k: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped conv in true fp32: cuDNN's default TF32 would put ~1e-1 errors into low-contrast SSIM terms."""
    if x.is_cuda:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            return F.conv2d(x, k, groups=groups)
    return F.conv2d(x, k, groups=groups)


def gaussian_blur(m: torch.Tensor, sigma: float, kernel: SepKernel | None = None) -> torch.Tensor:
    """Smooth (B, H, W) or (B, C, H, W) maps (``kernel``: sigma's, computed when None); sigma <= 0
    returns the input as float32."""
    m = m.float()
    if sigma <= 0:
        return m
    squeeze = m.dim() == 3
    x = m.unsqueeze(1) if squeeze else m
    out = sep_conv(x, kernel or sep_kernel(gaussian_kernel1d(sigma, device=m.device), x.shape[1]))
    return out.squeeze(1) if squeeze else out


def ssim_map(
    x: torch.Tensor, y: torch.Tensor, window: int = 11, kernel: SepKernel | None = None
) -> torch.Tensor:
    """Local SSIM per pixel and channel (Gaussian window of ``window`` taps, sigma 1.5), inputs in [0, 1];
    ``kernel``: that window for 5 x the channels (the five moments), computed when None."""
    x, y = x.float(), y.float()
    c = x.shape[1]
    if kernel is None:
        kernel = sep_kernel(gaussian_kernel1d(SSIM_SIGMA, radius=window // 2, device=x.device), 5 * c)
    moments = sep_conv(torch.cat([x, y, x * x, y * y, x * y], dim=1), kernel)
    mx, my, xx, yy, xy = moments.split(c, dim=1)
    vx, vy, cov = xx - mx * mx, yy - my * my, xy - mx * my
    num = (2 * mx * my + SSIM_C1) * (2 * cov + SSIM_C2)
    den = (mx * mx + my * my + SSIM_C1) * (vx + vy + SSIM_C2)
    return num / den


def pixel_map(
    x: torch.Tensor, recon: torch.Tensor, cfg: MapConfig, ssim_kernel: SepKernel | None = None
) -> torch.Tensor:
    """Unsmoothed anomaly map (B, H, W) float32 from input and reconstruction (B, C, H, W)."""
    x, r = x.float(), recon.float()
    d = x - r
    if cfg.residual == "positive":
        d = d.clamp_min(0.0)
    m = torch.zeros_like(d)
    if cfg.l1:
        m = m + cfg.l1 * d.abs()
    if cfg.l2:
        m = m + cfg.l2 * d * d
    if cfg.ssim:
        m = m + cfg.ssim * 0.5 * (1.0 - ssim_map(x, r, cfg.ssim_window, ssim_kernel))
    if cfg.channel_weights is not None:  # weighted: max of weighted terms, or their weighted mean
        wt = torch.tensor(cfg.channel_weights, dtype=m.dtype, device=m.device).view(1, -1, 1, 1)
        m = m * wt
        return m.amax(1) if cfg.channel_reduce == "max" else m.sum(1) / float(sum(cfg.channel_weights))
    return m.amax(1) if cfg.channel_reduce == "max" else m.mean(1)


def anomaly_map(x: torch.Tensor, recon: torch.Tensor, cfg: MapConfig, sigma: float) -> torch.Tensor:
    """Smoothed anomaly map (B, H, W) float32: the reference for the fused kernel path."""
    return gaussian_blur(pixel_map(x, recon, cfg), sigma)


def multiscale_map(
    raw: torch.Tensor,
    sigmas: Sequence[float],
    mean: torch.Tensor,
    std: torch.Tensor,
    kernels: Sequence[SepKernel] | None = None,
) -> torch.Tensor:
    """Max over ``sigmas`` of ``(blur(raw, s) - mean[k]) / std[k]``: raw (B, H, W) -> (B, H, W) float32.

    ``mean``/``std`` (len(sigmas),) are each scale's normal-map statistics (``calibrate.map_statistics``);
    ``kernels``: each scale's, computed when None."""
    out = None
    for k, s in enumerate(sigmas):
        z = (gaussian_blur(raw, s, None if kernels is None else kernels[k]) - mean[k]) / std[k]
        out = z if out is None else torch.maximum(out, z)
    return out
