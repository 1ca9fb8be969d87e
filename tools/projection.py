"""Iterative energy-based projection of an input onto the normal manifold (Dehaene et al., ICLR 2020).

A plain VAE reconstructs normal texture blurrily, so its residual is high everywhere on busy surfaces. The
projection instead moves the *input* a few gradient steps towards images the VAE reconstructs well, while an
L1 term keeps it close to the original:

    E(x) = L_rec(x, f(x)) + lam * |x - x0|_1,     x <- clamp(x - alpha * dE/dx * (x - f(x))^2, 0, 1)

with f = decode(encode_mean(.)). The (x - f(x))^2 factor concentrates the change on poorly reconstructed
pixels, i.e. on the defect; normal detail barely moves. The anomaly evidence is then the residual between
the original and the projected image's reconstruction. Costs ``steps`` forward+backward passes per image.
"""

from __future__ import annotations

import torch

from imganom.models.vae import ConvVAE
from imganom.ops.maps import ssim_map


def _energy(x: torch.Tensor, r: torch.Tensor, x0: torch.Tensor, lam: float, ssim_w: float, win: int):
    """Per-batch energy: summed (not averaged) per pixel so that each pixel's gradient is O(1)."""
    e = (x - r).abs().sum() + lam * (x - x0).abs().sum()
    if ssim_w:
        e = e + ssim_w * 0.5 * (1.0 - ssim_map(x, r, win)).sum()
    return e


def project(
    model: ConvVAE,
    x0: torch.Tensor,
    steps: int,
    alpha: float,
    lam: float,
    ssim_weight: float = 1.0,
    ssim_window: int = 11,
    amp: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Project ``x0`` (B, C, H, W) in [0, 1]: returns (projected input, its reconstruction), both fp32.

    Gradients flow to the input only (the model's parameters are untouched, so concurrent use is safe as
    long as callers serialise device work, as ``Inspector`` does).
    """
    x0 = x0.detach().float()
    x = x0.clone()
    dev = x0.device.type
    for _ in range(steps):
        x.requires_grad_(True)
        with torch.enable_grad(), torch.autocast(dev, dtype=amp or torch.bfloat16, enabled=amp is not None):
            mu, _ = model.encode(x)
            r = model.decode(mu).float()
            (g,) = torch.autograd.grad(_energy(x, r, x0, lam, ssim_weight, ssim_window), x)
        with torch.no_grad():
            x = (x - alpha * g * (x - r).pow(2)).clamp_(0.0, 1.0)
    with torch.no_grad(), torch.autocast(dev, dtype=amp or torch.bfloat16, enabled=amp is not None):
        mu, _ = model.encode(x)
        r = model.decode(mu).float()
    return x.detach(), r
