"""A convolutional VAE as a plain ``nn.Module``: strided conv encoder, dense or spatial latent,
mirrored decoder.

Training and scoring live beside it (``training/``, ``ops/head.py``), never inside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from imganom.config import ModelConfig


@dataclass
class VAEOutput:
    """What ``ConvVAE.forward`` returns: the reconstruction in [0, 1] and the posterior parameters."""

    recon: torch.Tensor  # (B, C, H, W)
    mu: torch.Tensor  # (B, D) dense or (B, D, h, w) spatial
    logvar: torch.Tensor


def _norm(kind: str, ch: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(ch)
    if kind == "group":
        return nn.GroupNorm(min(8, ch), ch)
    return nn.Identity()


def _act(kind: str) -> nn.Module:
    return {"leaky_relu": nn.LeakyReLU(0.2), "relu": nn.ReLU(), "silu": nn.SiLU()}[kind]


def _block(cin: int, cout: int, cfg: ModelConfig, up: bool) -> nn.Sequential:
    conv = (
        nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=cfg.norm == "none")
        if up
        else nn.Conv2d(cin, cout, 4, stride=2, padding=1, bias=cfg.norm == "none")
    )
    return nn.Sequential(conv, _norm(cfg.norm, cout), _act(cfg.activation))


class ConvVAE(nn.Module):
    """VAE for ``in_channels`` images of ``size`` (H, W), each side a multiple of ``2**cfg.depth``."""

    def __init__(self, cfg: ModelConfig, in_channels: int, size: tuple[int, int]):
        super().__init__()
        f = 2**cfg.depth
        if size[0] % f or size[1] % f:
            raise ValueError(f"input size {size} must be multiples of 2**depth = {f}")
        self.cfg, self.in_channels, self.size = cfg, in_channels, tuple(size)
        chans = [min(cfg.base_channels * 2**i, cfg.max_channels) for i in range(cfg.depth)]
        self.bottom = (chans[-1], size[0] // f, size[1] // f)

        enc, cin = [], in_channels
        for c in chans:
            enc.append(_block(cin, c, cfg, up=False))
            cin = c
        self.encoder = nn.Sequential(*enc)

        c, h, w = self.bottom
        if cfg.latent == "dense":
            self.to_stats = nn.Linear(c * h * w, 2 * cfg.latent_dim)
            self.from_latent = nn.Linear(cfg.latent_dim, c * h * w)
        else:
            self.to_stats = nn.Conv2d(c, 2 * cfg.latent_dim, 1)
            self.from_latent = nn.Conv2d(cfg.latent_dim, c, 1)

        dec = []
        rev = chans[::-1]
        for i, c in enumerate(rev[:-1]):
            dec.append(_block(c, rev[i + 1], cfg, up=True))
        dec.append(nn.ConvTranspose2d(rev[-1], in_channels, 4, stride=2, padding=1))
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance."""
        h = self.encoder(x)
        if self.cfg.latent == "dense":
            h = h.flatten(1)
        stats = self.to_stats(h).float()
        mu, logvar = stats.chunk(2, dim=1)
        return mu, logvar.clamp(-20.0, 10.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent -> reconstruction in [0, 1]."""
        h = self.from_latent(z)
        if self.cfg.latent == "dense":
            h = h.view(-1, *self.bottom)
        return torch.sigmoid(self.decoder(h))

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inspection's deterministic pass: (mu, logvar, decode(mu)); what the Inspector runs (compiled or
        not) and the ONNX export traces."""
        mu, logvar = self.encode(x)
        return mu, logvar, self.decode(mu)

    @staticmethod
    def sample(
        mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Reparameterised draw z = mu + sigma * eps."""
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps

    def forward(self, x: torch.Tensor, sample: bool | None = None) -> VAEOutput:
        """Sample z in training mode, decode the mean in eval mode (deterministic inspection)."""
        mu, logvar = self.encode(x)
        z = self.sample(mu, logvar) if (self.training if sample is None else sample) else mu
        return VAEOutput(self.decode(z), mu, logvar)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(q(z|x) || N(0, I)), summed over latent dims."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)
