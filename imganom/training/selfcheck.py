"""Self-supervised validation: synthetic anomalies (``data.pseudo``) pasted into held-out normal images,
scored with the map the Inspector would compute, without any labelled defect.

Used three ways by the trainer: to choose the checkpoint (``train.select: pseudo``, plain map), to choose the
map and score settings that need no retraining (``map: auto``) and to report a self-check after training.
Maps and image scores come from ``ops.head.AnomalyHead`` at model resolution, as the Inspector computes them
(decode of the posterior mean; per-pixel standardisation and smoothing scales from normal-map statistics of
the training images, computed as calibration does).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from imganom.config import Config, MapConfig
from imganom.data.pseudo import FAMILIES, pseudo_anomalies
from imganom.models.vae import ConvVAE
from imganom.ops.foreground import foreground_mask
from imganom.ops.head import AnomalyHead, HeadOutput, image_scores
from imganom.ops.maps import gaussian_blur
from imganom.ops.metrics import EvalAccumulator, PixelMetrics

log = logging.getLogger(__name__)

METRICS = ("image_auroc", "pixel_auroc", "aupro")
MAX_STATS_IMAGES = 512  # as calibration: normal-map statistics converge long before
# map: auto candidates (postprocess.topk stays as configured)
MIXES = ((1.0, 0.0), (0.5, 0.5), (0.0, 1.0))  # (l1, ssim)
SCALES = ((), (4.0,), (8.0,), (16.0,))
SIGMAS = (1.0, 2.0, 4.0)
STANDARDIZE = ("off", "score")
SCORES = ("max", "topk_mean")
# below these the self-check warns. Pseudo AUPRO is no absolute quality measure (0.12-0.51 for models with
# real AUPRO 0.70-0.96, docs/BENCHMARKS.md), so it only informs; see also the average-image baseline
POOR = {"image_auroc": 0.7, "pixel_auroc": 0.6}
# map: auto replaces the configured setting only when a candidate's mean pseudo metric is this much higher:
# pairs of settings closer than 0.02 are ordered the same way by real labels about half the time
# (0.50-0.66 on magnetic_tile and three synthetic sets, docs/BENCHMARKS.md)
MARGIN = 0.02


@dataclass
class PseudoSet:
    """Held-out normals followed by their pseudo-anomalous copies (one per family and image)."""

    images: torch.Tensor  # (n + m, C, h, w) float32: n normals, then m anomalous
    masks: np.ndarray  # (n + m, h, w) bool; all False for the normals
    families: list[str]  # "" for the normals
    n_normal: int

    @classmethod
    def build(cls, views: Sequence[np.ndarray], seed: int, families: Sequence[str] = FAMILIES) -> PseudoSet:
        """From model-sized normal views (CHW float32)."""
        samples = pseudo_anomalies(list(views), seed, families)
        imgs = np.stack([*views, *(s.image for s in samples)]).astype(np.float32)
        h, w = imgs.shape[-2:]
        masks = np.concatenate([np.zeros((len(views), h, w), bool), np.stack([s.mask for s in samples])])
        return cls(torch.from_numpy(imgs), masks, [""] * len(views) + [s.family for s in samples], len(views))

    @property
    def labels(self) -> np.ndarray:
        return (np.arange(len(self.families)) >= self.n_normal).astype(np.int64)


@torch.no_grad()
def reconstruct(model: ConvVAE, x: torch.Tensor, device: torch.device, batch: int = 32) -> torch.Tensor:
    """Decode of the posterior mean, fp32, eval mode (as the Inspector on the CPU): (N, C, h, w), CPU."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(x), batch):
            xb = x[i : i + batch].to(device)
            mu, _ = model.encode(xb)
            out.append(model.decode(mu).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def _sigmas(mcfg: MapConfig, sigma: float) -> list[float]:
    return [float(sigma), *mcfg.scales] if mcfg.scales else []


def normal_statistics(
    raw: torch.Tensor, mcfg: MapConfig, sigma: float, fg: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Calibration's normal-map statistics from raw (unsmoothed) normal maps (N, h, w): per-pixel mean and
    floored std, and for ``map.scales`` each smoothing scale's global mean and std. ``fg`` (N, h, w) bool
    (``postprocess.roi`` auto): only foreground pixels count, as only they are scored."""
    if fg is not None:
        return _masked_statistics(raw, mcfg, sigma, fg)
    r = raw.double()
    std = r.std(0, correction=1) if len(r) > 1 else torch.zeros_like(r[0])
    out = {"map_mean": r.mean(0).float(), "map_std": std.clamp_min(float(std.mean()) * 0.1 + 1e-6).float()}
    sig = _sigmas(mcfg, sigma)
    if sig:
        blurred = [gaussian_blur(raw, s).double() for s in sig]
        out["scale_mean"] = torch.tensor([float(b.mean()) for b in blurred], dtype=torch.float32)
        out["scale_std"] = torch.tensor([max(float(b.std(correction=0)), 1e-6) for b in blurred])
    return out


def _masked_statistics(
    raw: torch.Tensor, mcfg: MapConfig, sigma: float, fg: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``normal_statistics`` over foreground pixels only: per pixel, over the maps where it is foreground
    (pixels never foreground get mean 0 and the std floor); per scale, over all foreground pixels."""
    r, w = raw.double(), fg.double()
    cnt = w.sum(0)
    mean = (r * w).sum(0) / cnt.clamp_min(1)
    var = (((r - mean) ** 2) * w).sum(0) / (cnt - 1).clamp_min(1)
    std = var.sqrt()
    seen = cnt > 1
    floor = (float(std[seen].mean()) if bool(seen.any()) else 0.0) * 0.1 + 1e-6
    std = torch.where(seen, std, torch.zeros_like(std))
    out = {"map_mean": mean.float(), "map_std": std.clamp_min(floor).float()}
    sig = _sigmas(mcfg, sigma)
    if sig:
        vals = [gaussian_blur(raw, s).double()[fg] for s in sig]
        vals = [v if v.numel() else torch.zeros(1, dtype=torch.float64) for v in vals]
        out["scale_mean"] = torch.tensor([float(v.mean()) for v in vals], dtype=torch.float32)
        out["scale_std"] = torch.tensor([max(float(v.std(correction=0)), 1e-6) for v in vals])
    return out


def _with(cfg: Config, mcfg: MapConfig, sigma: float, score: str | None = None) -> Config:
    pp = cfg.postprocess.model_copy(update={"sigma": sigma, "score": score or cfg.postprocess.score})
    return cfg.model_copy(update={"map": mcfg, "postprocess": pp})


def roi_of(cfg: Config, views: torch.Tensor) -> torch.Tensor | None:
    """The foreground (N, h, w) of ``views`` under ``postprocess.roi`` auto (``ops.foreground``) or None."""
    pp = cfg.postprocess
    return foreground_mask(views, pp.roi_erode) if pp.roi == "auto" else None


def raw_maps(head: AnomalyHead, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Unsmoothed single-scale maps (N, h, w) of the head's map definition (what statistics measure)."""
    return head.raw_map(x, [recon], smooth=False, backend="torch")


def head_output(head: AnomalyHead, raw: torch.Tensor, x: torch.Tensor | None = None) -> HeadOutput:
    """``AnomalyHead`` outputs from unsmoothed raw maps of views ``x``: its smoothing, standardisation,
    scales and (``postprocess.roi`` auto, which needs ``x``) foreground."""
    if head.fused:  # the head smooths the map term in the same pass: the same blur
        raw = gaussian_blur(raw, head.sigma)
    return head.finish(raw, torch.zeros(len(raw)), x)


def pixel_metrics(maps: torch.Tensor, pset: PseudoSet) -> dict[str, float]:
    """Pooled pixel AUROC and AUPRO@0.3 (``ops.metrics``) of maps (N, h, w) against the pseudo masks."""
    m = maps.numpy()
    lo, hi = float(m.min()), float(m.max())
    pm = PixelMetrics(lo, hi + max(hi - lo, 1e-6) * 1e-3, bins=4096)
    for a, k in zip(m, pset.masks):
        pm.add(a, k)
    r = pm.compute(0.3)
    return {"pixel_auroc": r["auroc"], "aupro": r["aupro_0.3"]}


def evaluate(head: AnomalyHead, out: HeadOutput, pset: PseudoSet) -> dict[str, Any]:
    """Image AUROC, pixel AUROC and AUPRO (and per family) of one map setting on the pseudo set."""
    scores = image_scores(out, head.post_cfg, head.roi, head.n_roi).numpy()
    m = out.maps.numpy()
    lo, hi = float(m.min()), float(m.max())
    acc = EvalAccumulator(lo, hi + max(hi - lo, 1e-6) * 1e-3, bins=4096)
    for s, y, a, k, fam in zip(scores, pset.labels, m, pset.masks, pset.families):
        acc.add(float(s), int(y), a, k, fam)
    r = acc.compute()
    out: dict[str, Any] = {
        "image_auroc": r["image"]["auroc"], "pixel_auroc": r["pixel"]["auroc"],
        "aupro": r["pixel"]["aupro_0.3"], "n_normal": pset.n_normal,
        "n_anomalous": len(pset.families) - pset.n_normal,
    }  # fmt: skip
    out["per_family"] = {
        f: {"image_auroc": t["image_auroc"], "pixel_auroc": t["pixel_auroc"], "aupro": t["aupro_0.3"]}
        for f, t in r["per_type"].items()
    }
    return out


def mean_metric(m: dict[str, Any]) -> float:
    """The single number that ranks settings and checkpoints: mean of image AUROC, pixel AUROC and AUPRO."""
    vals = [m[k] for k in METRICS if m.get(k) is not None]
    return float(np.mean(vals)) if vals else float("nan")


def pseudo_score(model: ConvVAE, pset: PseudoSet, cfg: Config, device: torch.device) -> dict[str, Any]:
    """Checkpoint choice: metrics of the configured map without normal-map statistics (plain, one scale)."""
    recon = reconstruct(model, pset.images, device)
    head = AnomalyHead(
        _with(cfg, cfg.map.model_copy(update={"standardize": "off", "scales": []}), cfg.postprocess.sigma)
    )
    return evaluate(head, head_output(head, raw_maps(head, pset.images, recon), pset.images), pset)


def _candidate_maps(cfg: Config, tile: bool) -> list[MapConfig]:
    reduces = ("mean", "max") if cfg.preprocess.channels > 1 else (cfg.map.channel_reduce,)
    out = []
    for (l1, ss), red in itertools.product(MIXES, reduces):
        base = cfg.map.model_copy(
            update={"l1": l1, "l2": 0.0, "ssim": ss, "channel_reduce": red, "auto": False}
        )
        for scales, z in itertools.product(SCALES, STANDARDIZE):
            if tile and (scales or z != "off"):
                continue  # tiled views have no fixed place: no normal-map statistics (calibration)
            out.append(base.model_copy(update={"scales": list(scales), "standardize": z}))
    return out


def setting_of(mcfg: MapConfig, sigma: float, score: str) -> dict[str, Any]:
    """The map/score setting ``map: auto`` chooses, as a plain dict (model-file metadata)."""
    return {
        "l1": mcfg.l1, "l2": mcfg.l2, "ssim": mcfg.ssim, "channel_reduce": mcfg.channel_reduce,
        "standardize": mcfg.standardize, "scales": list(mcfg.scales), "sigma": float(sigma), "score": score,
    }  # fmt: skip


def rank_settings(
    model: ConvVAE,
    pset: PseudoSet,
    normal_views: torch.Tensor,
    cfg: Config,
    device: torch.device,
    extra: Sequence[tuple[MapConfig, float]] = (),
) -> list[dict[str, Any]]:
    """Every ``map: auto`` candidate (and the ``extra`` (map, sigma) pairs) scored on ``pset`` (any labelled
    set in ``PseudoSet`` form), best mean first: ``[{"setting": {...}, "image_auroc", "pixel_auroc",
    "aupro", "mean"}]``."""
    recon_p = reconstruct(model, pset.images, device)
    recon_n = reconstruct(model, normal_views, device)
    tile = cfg.preprocess.resize == "tile"
    rows: list[dict[str, Any]] = []
    raw_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    pix_cache: dict[tuple, dict[str, float]] = {}
    stat_cache: dict[tuple, dict[str, torch.Tensor]] = {}
    pairs = list(itertools.product(_candidate_maps(cfg, tile), SIGMAS))
    pairs += [(m, float(sg)) for m, sg in extra if (m, float(sg)) not in pairs]
    for mcfg, sigma in pairs:
        key = (mcfg.l1, mcfg.l2, mcfg.ssim, mcfg.channel_reduce)
        if key not in raw_cache:
            plain = AnomalyHead(_with(cfg, mcfg, sigma))
            raw_cache[key] = (raw_maps(plain, pset.images, recon_p), raw_maps(plain, normal_views, recon_n))
        raw_p, raw_n = raw_cache[key]
        pkey = (*key, tuple(mcfg.scales), sigma)
        needs = not tile and (mcfg.standardize != "off" or bool(mcfg.scales))
        if needs and pkey not in stat_cache:
            stat_cache[pkey] = normal_statistics(raw_n, mcfg, sigma, roi_of(cfg, normal_views))
        head = AnomalyHead(_with(cfg, mcfg, sigma), stat_cache[pkey] if needs else None)
        out = head_output(head, raw_p, pset.images)
        if pkey not in pix_cache:
            pix_cache[pkey] = pixel_metrics(out.maps, pset)
        for score in SCORES:
            pp = head.post_cfg.model_copy(update={"score": score})
            img = float(roc_auc_score(pset.labels, image_scores(out, pp, head.roi, head.n_roi).numpy()))
            m = {"image_auroc": img, **pix_cache[pkey]}
            rows.append({"setting": setting_of(mcfg, sigma, score), **m, "mean": mean_metric(m)})
    rows.sort(key=lambda r: -r["mean"])
    return rows


def choose_map(
    model: ConvVAE, pset: PseudoSet, normal_views: torch.Tensor, cfg: Config, device: torch.device
) -> tuple[Config, dict[str, Any]]:
    """``map: auto``: the candidate with the best mean pseudo metric, unless it beats the configured setting
    by less than ``MARGIN`` (then the configured one stays: smaller differences do not predict real ones).
    Returns the config with the choice (``map.auto`` off) and a record: the choice, why, its metrics and the
    ranked candidates."""
    own_map = cfg.map.model_copy(update={"auto": False})
    sigma, score = cfg.postprocess.sigma, cfg.postprocess.score
    rows = rank_settings(model, pset, normal_views, cfg, device, extra=[(own_map, sigma)])
    own = next((r for r in rows if r["setting"] == setting_of(own_map, sigma, score)), None)
    pick = rows[0]
    if own is not None and pick["mean"] < own["mean"] + MARGIN:
        pick = own
        why = f"kept the configured setting: the best candidate beats it by less than {MARGIN}"
    else:
        why = f"best mean pseudo metric of {len(rows)} settings" + (
            f" (configured setting {own['mean']:.3f})" if own is not None else ""
        )
    best = pick["setting"]
    upd = {k: best[k] for k in ("l1", "l2", "ssim", "channel_reduce", "standardize", "scales")}
    new = _with(cfg, cfg.map.model_copy(update={**upd, "auto": False}), best["sigma"], best["score"])
    log.info("map: auto chose %s: %s (pseudo mean %.3f)", best, why, pick["mean"])
    metrics = {k: pick[k] for k in (*METRICS, "mean")}
    return new, {"chosen": best, "reason": why, "metrics": metrics, "candidates": rows}


def _scores_of(
    recon_p: torch.Tensor, recon_n: torch.Tensor, pset: PseudoSet, normal_views: torch.Tensor, cfg: Config
) -> dict[str, Any]:
    mcfg, sigma = cfg.map, cfg.postprocess.sigma
    plain = AnomalyHead(cfg)
    stats = None
    if (mcfg.standardize != "off" or mcfg.scales) and cfg.preprocess.resize != "tile":
        raw_n = raw_maps(plain, normal_views, recon_n)
        stats = normal_statistics(raw_n, mcfg, sigma, roi_of(cfg, normal_views))
    head = AnomalyHead(cfg, stats)
    return evaluate(head, head_output(head, raw_maps(plain, pset.images, recon_p), pset.images), pset)


def self_check(
    model: ConvVAE, pset: PseudoSet, normal_views: torch.Tensor, cfg: Config, device: torch.device
) -> dict[str, Any]:
    """Metrics of the final map settings (with normal-map statistics from ``normal_views``, as calibration
    computes them from the training images) on a pseudo set; ``poor`` names the metrics below ``POOR``.
    ``baseline``: the same metrics when every image is "reconstructed" as the average normal image (what a
    model that learned nothing but the mean would score: synthetic defects stand out even then)."""
    recon_p, recon_n = reconstruct(model, pset.images, device), reconstruct(model, normal_views, device)
    out = _scores_of(recon_p, recon_n, pset, normal_views, cfg)
    mean = normal_views.mean(0, keepdim=True)
    base = _scores_of(mean.expand_as(pset.images), mean.expand_as(normal_views), pset, normal_views, cfg)
    out["baseline"] = {k: base[k] for k in METRICS}
    out["poor"] = [k for k, lim in POOR.items() if out.get(k) is not None and out[k] < lim]
    return out


def stats_subset(n: int) -> slice:
    """Every k-th of ``n`` normal images so that at most ``MAX_STATS_IMAGES`` are used (as calibration)."""
    return slice(None, None, max(1, -(-n // MAX_STATS_IMAGES)))
