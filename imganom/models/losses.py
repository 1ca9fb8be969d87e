"""VAE training objective: a reconstruction mix (L1, L2, 1-SSIM) plus beta * KL with a linear warm-up."""

from __future__ import annotations

import torch

from imganom.config import LossConfig
from imganom.models.vae import VAEOutput, kl_divergence
from imganom.ops.maps import ssim_map


def kl_weight(cfg: LossConfig, epoch_progress: float) -> float:
    """beta scaled linearly from 0 to 1 over ``kl_warmup_epochs`` (fractional epochs allowed)."""
    if cfg.kl_warmup_epochs <= 0:
        return cfg.beta
    return cfg.beta * min(1.0, epoch_progress / cfg.kl_warmup_epochs)


def vae_loss(x: torch.Tensor, out: VAEOutput, cfg: LossConfig, beta: float) -> dict[str, torch.Tensor]:
    """Loss terms (batch means, fp32). KL is per pixel (divided by C*H*W) so beta=1 balances a per-pixel
    reconstruction term the way a summed ELBO would."""
    x, r = x.float(), out.recon.float()
    terms: dict[str, torch.Tensor] = {}
    recon = torch.zeros((), device=x.device)
    if cfg.l1:
        terms["l1"] = (x - r).abs().mean()
        recon = recon + cfg.l1 * terms["l1"]
    if cfg.l2:
        terms["l2"] = (x - r).pow(2).mean()
        recon = recon + cfg.l2 * terms["l2"]
    if cfg.ssim:
        terms["ssim"] = 1.0 - ssim_map(x, r, cfg.ssim_window).mean()
        recon = recon + cfg.ssim * terms["ssim"]
    terms["kl"] = kl_divergence(out.mu, out.logvar).mean() / x[0].numel()
    terms["recon"] = recon
    terms["loss"] = recon + beta * terms["kl"]
    return terms
