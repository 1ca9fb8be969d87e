"""``AnomalyHead``: everything between the VAE's reconstruction and the image score, in one module.

    raw   = mean over reconstructions of pixel_map(x, recon)     (posterior mean, then Monte-Carlo draws)
    elbo  = mean(raw) + KL / (C*H*W)
    maps  = max over scales of z-scored blurs | blur((raw - mean) / std) ("map") | blur(raw)
    score = max | topk_mean of the maps (of blur((raw - mean) / std) with standardize "score") | elbo

It is the one implementation of that arithmetic: the Inspector's torch backend runs it after the VAE, the
ONNX export traces VAE + head, calibration takes its raw maps. Built from the config and the normal-map
statistics; every kernel and statistic is a buffer of static shape, so it traces with a dynamic batch axis
only. The map term has two backends, the torch reference (``ops.maps``) and the fused Triton kernels
(``ops.triton_maps``): ``backend="auto"`` picks Triton for CUDA inputs when it can run.
When no map needs standardising or several scales (and there is no Monte-Carlo sampling), the map term is
smoothed in the same pass ("fused") and the ELBO's map term is then the smoothed map's mean.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch
from torch import nn

from imganom.config import Config, PostprocessConfig
from imganom.ops.device_post import image_scores_t
from imganom.ops.foreground import foreground_mask
from imganom.ops.maps import (
    SSIM_SIGMA,
    SepKernel,
    gaussian_blur,
    gaussian_kernel1d,
    multiscale_map,
    pixel_map,
    sep_kernel,
)
from imganom.ops.neighbours import NeighbourReference, has_reference
from imganom.ops.postprocess import border_roi
from imganom.ops.triton_maps import fused_anomaly_map, map_backend

BACKENDS = ("auto", "torch", "triton")


class HeadOutput(NamedTuple):
    """Model-resolution outputs of the head for a batch of N views."""

    maps: torch.Tensor  # (N, h, w) float32: the smoothed map (masks, regions; the score unless score_maps)
    elbo: torch.Tensor  # (N,) float32: negative ELBO per view
    score_maps: torch.Tensor | None  # (N, h, w) standardised smoothed maps (standardize "score"), else None
    reference: torch.Tensor | None = None  # (N,) neighbours' mean raw score (calibration.neighbours)


def image_scores(
    out: HeadOutput, cfg: PostprocessConfig, roi: torch.Tensor | None = None, n_roi: int | None = None
) -> torch.Tensor:
    """Image scores (N,) float64 of head outputs (at any resolution): the ELBO, or ``cfg.score`` of the
    score maps (where there are any, else the maps) inside the ROI (``image_scores_t``)."""
    if cfg.score == "elbo":
        return out.elbo.double()
    return image_scores_t(out.maps if out.score_maps is None else out.score_maps, cfg, roi, n_roi)


class AnomalyHead(nn.Module):
    """Input and reconstruction(s) -> smoothed map, ELBO and score maps; ``forward`` adds the image score.

    ``stats``: normal-map statistics (``map_mean``/``map_std`` (h, w) for ``map.standardize``,
    ``scale_mean``/``scale_std`` (S,) for ``map.scales``); without them the map is neither standardised
    nor multi-scale. ``backend`` ("auto" | "torch" | "triton"): the map term's implementation.
    """

    def __init__(self, cfg: Config, stats: Mapping[str, torch.Tensor] | None = None, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        mcfg, post, pp = cfg.map, cfg.postprocess, cfg.preprocess
        stats = stats or {}
        self.map_cfg, self.post_cfg, self.backend = mcfg, post, backend
        h, w = (int(s) for s in pp.size)
        self.numel = int(pp.channels) * h * w
        self.sigma = float(post.sigma)
        self.mc_samples = int(mcfg.mc_samples)
        self.standardize = mcfg.standardize if "map_mean" in stats else "off"
        self.scales = [self.sigma, *mcfg.scales] if mcfg.scales and "scale_mean" in stats else []
        self.fused = not self.mc_samples and self.standardize == "off" and not self.scales
        self._radius: dict[str, int] = {}
        self._kernel(
            "ssim", gaussian_kernel1d(SSIM_SIGMA, radius=mcfg.ssim_window // 2), 5 * int(pp.channels)
        )
        self._kernel("blur", gaussian_kernel1d(self.sigma) if self.sigma > 0 else torch.ones(1), 1)
        for k, s in enumerate(self.scales):
            self._kernel(f"scale{k}", gaussian_kernel1d(s), 1)
        if self.standardize != "off":
            self.register_buffer("map_mean", stats["map_mean"].float().reshape(1, h, w).clone())
            self.register_buffer("map_std", stats["map_std"].float().reshape(1, h, w).clone())
        if self.scales:
            self.register_buffer("scale_mean", stats["scale_mean"].float().clone())
            self.register_buffer("scale_std", stats["scale_std"].float().clone())
        self.roi_auto, self.roi_erode = post.roi == "auto", int(post.roi_erode)
        roi = border_roi((h, w), int(post.border))  # the exported score ignores the border, as Inspector
        self.n_roi = h * w if roi is None else int(roi.sum())
        self.register_buffer("roi", None if roi is None else torch.from_numpy(roi))
        k = int(cfg.calibration.neighbours)
        self.reference = NeighbourReference(stats, k) if k and has_reference(stats) else None

    def _kernel(self, name: str, taps: torch.Tensor, channels: int) -> None:
        """Keep a ``SepKernel`` as two buffers (they follow the module's device) and its radius."""
        k = sep_kernel(taps, channels, expand=False)
        self.register_buffer(f"{name}_kh", k.h)
        self.register_buffer(f"{name}_kv", k.v)
        self._radius[name] = k.radius

    def kernel(self, name: str) -> SepKernel:
        """The separable kernel ``name``: "ssim", "blur" or "scale<k>"."""
        return SepKernel(getattr(self, f"{name}_kh"), getattr(self, f"{name}_kv"), self._radius[name])

    @property
    def output_names(self) -> tuple[str, ...]:
        """Names of ``forward``'s outputs, in order (the exported graph's outputs)."""
        names = ("anomaly_map", "score", "elbo") + (("score_map",) if self.standardize == "score" else ())
        return names + (("reference",) if self.reference is not None else ())

    def reference_of(self, mu: torch.Tensor) -> torch.Tensor | None:
        """The neighbours' mean raw score (N,) for posterior means ``mu`` (spatial latents averaged over
        space), or None without ``calibration.neighbours`` references."""
        if self.reference is None:
            return None
        return self.reference(mu.float().flatten(1) if mu.dim() == 2 else mu.float().mean((2, 3)))

    def map_term(
        self, x: torch.Tensor, recon: torch.Tensor, smooth: bool, backend: str | None = None
    ) -> torch.Tensor:
        """Pixel map (N, h, w) float32 of one reconstruction, smoothed with sigma when ``smooth``."""
        sigma = self.sigma if smooth else 0.0
        if map_backend(x, recon, self.map_cfg, backend or self.backend) == "triton":
            return fused_anomaly_map(x, recon, self.map_cfg, sigma)
        return gaussian_blur(
            pixel_map(x, recon, self.map_cfg, self.kernel("ssim")), sigma, self.kernel("blur")
        )

    def raw_map(
        self,
        x: torch.Tensor,
        recons: Iterable[torch.Tensor],
        smooth: bool | None = None,
        backend: str | None = None,
    ) -> torch.Tensor:
        """Mean map over the reconstructions (the posterior-mean decode first, then any Monte-Carlo draws),
        consumed one at a time; smoothed when ``smooth`` (default: in the fused case)."""
        smooth = self.fused if smooth is None else smooth
        it = iter(recons)
        raw = self.map_term(x, next(it), smooth, backend)
        n = 1
        for r in it:
            raw = raw + self.map_term(x, r, smooth, backend)
            n += 1
        return raw / n if n > 1 else raw

    def finish(self, raw: torch.Tensor, kl: torch.Tensor, x: torch.Tensor | None = None) -> HeadOutput:
        """ELBO (with ``kl`` = per-view KL divergence), standardisation and smoothing of ``raw_map``'s map;
        with ``postprocess.roi`` auto, maps are 0 outside the foreground of the views ``x`` (required)."""
        elbo = raw.flatten(1).mean(1) + kl / self.numel
        score_maps = None
        if self.standardize == "score":
            score_maps = gaussian_blur((raw - self.map_mean) / self.map_std, self.sigma, self.kernel("blur"))
        elif self.standardize == "map":
            raw = (raw - self.map_mean) / self.map_std
        if self.scales:
            kernels = [self.kernel(f"scale{k}") for k in range(len(self.scales))]
            raw = multiscale_map(raw, self.scales, self.scale_mean, self.scale_std, kernels)
        elif not self.fused:
            raw = gaussian_blur(raw, self.sigma, self.kernel("blur"))
        if self.roi_auto:
            if x is None:
                raise ValueError("postprocess.roi auto: AnomalyHead.finish needs the views x")
            fg = self.foreground(x)
            raw = torch.where(fg, raw, torch.zeros_like(raw))
            if score_maps is not None:
                score_maps = torch.where(fg, score_maps, torch.zeros_like(score_maps))
        return HeadOutput(raw, elbo, score_maps)

    def foreground(self, x: torch.Tensor) -> torch.Tensor:
        """The ROI (N, h, w) bool of views ``x`` under ``postprocess.roi`` auto (``ops.foreground``)."""
        return foreground_mask(x, self.roi_erode)

    def forward(
        self, x: torch.Tensor, recon: torch.Tensor, kl: torch.Tensor, mu: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Model-sized views, their mean reconstruction, KL and posterior mean -> ``output_names`` tensors:
        the map, the image score (float32; the border excluded, no other ROI; divided by the reference),
        the ELBO, with standardize "score" the score map and, with neighbours, the reference. No
        Monte-Carlo draws: the exported graph is deterministic."""
        out = self.finish(self.raw_map(x, [recon]), kl, x)
        score = image_scores(out, self.post_cfg, self.roi, self.n_roi).float()
        ref = None
        if self.reference is not None:
            if mu is None:
                raise ValueError("calibration.neighbours: AnomalyHead.forward needs the posterior mean mu")
            ref = self.reference_of(mu)
            score = score / ref
        extra = (() if out.score_maps is None else (out.score_maps,)) + (() if ref is None else (ref,))
        return (out.maps, score, out.elbo) + extra
