"""Thresholds from normal images only (and, optionally, F1-max thresholds from labelled anomalies).

Image threshold: an order-statistic upper confidence bound on the (1 - target_fpr) quantile of normal image
scores (``thresholds.quantile_upper_bound``), so a small calibration set errs towards fewer false rejects.
Pixel threshold: a high quantile of pooled normal pixel scores (bounded-memory reservoir sample).
With ``map.standardize`` / ``map.scales`` a first pass measures each pixel's mean and spread of the raw
normal map / each smoothing scale's mean and spread (not for tiled models: their views have no fixed place).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imganom.config import CalibrationConfig
from imganom.data.preprocess import prepare
from imganom.data.readers import ImageReadError, read_image, read_options
from imganom.inference.inspector import Inspector
from imganom.ops.latent import fit_latent_stats
from imganom.ops.maps import gaussian_blur
from imganom.ops.neighbours import KEYS as NEIGHBOUR_KEYS
from imganom.ops.neighbours import MAX_REFERENCE, NonPositiveScores, fit_reference, has_reference
from imganom.ops.thresholds import ReservoirSampler, f1_max_threshold, pixel_threshold, quantile_upper_bound
from imganom.training import selfcheck

log = logging.getLogger(__name__)


def _decoded(insp: Inspector, paths: Sequence[Path]):
    pp = insp.cfg.preprocess
    for p in paths:
        try:
            chw, meta = read_image(p, **read_options(pp))
        except ImageReadError as e:
            log.warning("calibration: skipping %s", e)
            continue
        yield str(p), chw, meta


def _chunks(it, n: int):
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


@torch.no_grad()
def map_statistics(insp: Inspector, paths: Sequence[Path], batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Normal-map statistics at model resolution: per-pixel mean and std of raw (unsmoothed) maps (Welford
    over views; for ``map.standardize``) and, for ``map.scales``, each smoothing scale's mean and std.
    Reads ``insp`` only (``Inspector.raw_maps``); apply them with ``insp.with_calibration(stats=...)``."""
    if insp.cfg.postprocess.roi == "auto":
        return _roi_statistics(insp, paths, batch_size)
    h, w = insp.cfg.preprocess.size
    n, mean, m2 = 0, torch.zeros(h, w, dtype=torch.float64), torch.zeros(h, w, dtype=torch.float64)
    mcfg, pp = insp.cfg.map, insp.cfg.postprocess
    sigmas = [float(pp.sigma), *mcfg.scales] if mcfg.scales else []
    s1 = torch.zeros(len(sigmas), dtype=torch.float64)
    s2 = torch.zeros(len(sigmas), dtype=torch.float64)
    for chunk in _chunks(_decoded(insp, paths), batch_size):
        views = np.concatenate([prepare(chw, insp.cfg.preprocess)[0] for _, chw, _ in chunk])
        maps = insp.raw_maps(torch.from_numpy(views))
        for k, sg in enumerate(sigmas):
            b = gaussian_blur(maps, sg).double()
            s1[k] += float(b.sum())
            s2[k] += float((b * b).sum())
        for m in maps.double().cpu():
            n += 1
            d = m - mean
            mean += d / n
            m2 += d * (m - mean)
    std = (m2 / max(n - 1, 1)).sqrt()
    floor = float(std.mean()) * 0.1 + 1e-6  # avoid dividing by ~0 where normals never vary
    out = {"map_mean": mean.float(), "map_std": std.clamp_min(floor).float()}
    if sigmas:
        cnt = max(n * h * w, 1)
        smean = s1 / cnt
        sstd = (s2 / cnt - smean * smean).clamp_min(0).sqrt().clamp_min(1e-6)
        out.update({"scale_mean": smean.float(), "scale_std": sstd.float()})
    return out


def _roi_statistics(insp: Inspector, paths: Sequence[Path], batch_size: int) -> dict[str, torch.Tensor]:
    """``map_statistics`` under ``postprocess.roi`` auto: over each view's foreground only (in memory: at
    most ``MAX_STATS_IMAGES`` model-sized maps), by the self-check's ``normal_statistics``."""
    raws, fgs = [], []
    for chunk in _chunks(_decoded(insp, paths), batch_size):
        views = torch.from_numpy(np.concatenate([prepare(c, insp.cfg.preprocess)[0] for _, c, _ in chunk]))
        raws.append(insp.raw_maps(views).float().cpu())
        fgs.append(selfcheck.roi_of(insp.cfg, views))
    if not raws:
        raise ValueError("calibration: none of the given images could be read")
    cfg = insp.cfg
    return selfcheck.normal_statistics(torch.cat(raws), cfg.map, cfg.postprocess.sigma, torch.cat(fgs))


def normal_scores(
    insp: Inspector,
    paths: Sequence[Path],
    batch_size: int = 16,
    pixel_capacity: int = 2_000_000,
    seed: int = 0,
    latents: list[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Image scores and a uniform sample of pixel scores over the given normal images; their latent means
    are appended to ``latents`` when given (and the backend has them)."""
    scores, res = [], ReservoirSampler(pixel_capacity, seed)
    roi_auto = insp.cfg.postprocess.roi == "auto"
    for chunk in _chunks(_decoded(insp, paths), batch_size):
        for r in insp.predict_arrays(chunk):
            scores.append(r.score)
            # roi auto: the head leaves the map exactly 0 outside the foreground; only tissue sets thresholds
            res.add(r.anomaly_map[r.anomaly_map != 0] if roi_auto else r.anomaly_map.ravel())
            if latents is not None and r.latent is not None:
                latents.append(r.latent)
    if not scores:
        raise ValueError("calibration: none of the given images could be read")
    return np.asarray(scores), res.sample()


def _without_reference(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: v for key, v in stats.items() if key not in NEIGHBOUR_KEYS}


def neighbour_reference(
    insp: Inspector, paths: Sequence[Path], k: int, batch_size: int = 16
) -> dict[str, torch.Tensor]:
    """Raw scores and latent means of (up to ``MAX_REFERENCE``) normal ``paths`` -> the neighbour reference
    stats tensors (``ops.neighbours``). Scored with ``insp``'s normal-map statistics, without any reference
    it may already hold. Torch backend (a graph has no latent output to fit on)."""
    paths = list(paths)
    if len(paths) > MAX_REFERENCE:
        paths = paths[:: -(-len(paths) // MAX_REFERENCE)]
    raw = insp.with_calibration(stats=_without_reference(insp.stats), replace_stats=True)
    scores, zs = [], []
    for chunk in _chunks(_decoded(raw, paths), batch_size):
        for r in raw.predict_arrays(chunk):
            if r.latent is None:
                raise ValueError("calibration.neighbours needs latent means: calibrate the .safetensors file")
            scores.append(r.score)
            zs.append(r.latent)
    if not scores:
        raise ValueError("calibration: none of the reference images could be read")
    return fit_reference(np.stack(zs), np.asarray(scores), k)


def image_scores(insp: Inspector, paths: Sequence[Path], batch_size: int = 16) -> dict[str, float]:
    """Image score per readable path (``str(path)`` keys); unreadable images are logged and left out."""
    out: dict[str, float] = {}
    for chunk in _chunks(_decoded(insp, paths), batch_size):
        for r in insp.predict_arrays(chunk):
            out[r.id] = float(r.score)
    return out


MIN_PER_NEIGHBOUR = 3  # calibration.neighbours = k needs >= 3k reference images, else scores stay raw
MAX_STATS_IMAGES = 512  # normal-map statistics converge long before; caps the extra pass over training data


def calibrate(
    insp: Inspector,
    paths: Sequence[Path],
    cfg: CalibrationConfig | None = None,
    *,
    labeled: Sequence[tuple[Path, int]] | None = None,
    batch_size: int = 16,
    stats_paths: Sequence[Path] | None = None,
    keep_stats: bool = False,
    latents: bool = False,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Compute calibration on normal ``paths``; returns (calibration dict for the model file, stats tensors).

    Normal-map statistics (``map.standardize`` / ``map.scales``) must come from other images than the
    threshold scores: scored against statistics they helped form, images look more normal than unseen ones
    and the thresholds come out too low (all NG on a small set). So they come from ``stats_paths`` (after
    training: the training images, up to ``MAX_STATS_IMAGES``), else from every other image of ``paths``,
    whose remaining half then sets the thresholds. ``keep_stats``: reuse the model's statistics when it has
    them (recalibrating thresholds only, on all of ``paths``). ``insp`` is not changed: apply the result
    with ``insp.with_calibration(cal, stats)`` or write it to the model file (``update_calibration``).
    ``latents``: also fit the normals' latent statistics (``ops.latent``) on the latent means of the images
    that set the thresholds (no extra pass; torch backend) and return them among the stats tensors."""
    cfg = cfg or insp.cfg.calibration
    t0 = time.perf_counter()
    stats: dict[str, torch.Tensor] = {}
    wants = insp.cfg.map.standardize != "off" or bool(insp.cfg.map.scales)
    mcfg = insp.cfg.map
    have = (mcfg.standardize == "off" or "map_mean" in insp.stats) and (
        not mcfg.scales or "scale_mean" in insp.stats
    )
    k = int(insp.cfg.calibration.neighbours)
    need_ref = bool(k) and not (keep_stats and has_reference(insp.stats))
    need_stats = wants and not (keep_stats and have) and insp.cfg.preprocess.resize != "tile"
    if (need_stats or need_ref) and stats_paths is None:
        paths = list(paths)
        if len(paths) >= 4:
            stats_paths, paths = paths[::2], paths[1::2]
        else:
            stats_paths = paths
            log.warning("calibration: fewer than 4 images; normal-map statistics from the same images")
    if wants and keep_stats and have:
        log.info("calibration: keeping the model's normal-map statistics")
    elif wants and insp.cfg.preprocess.resize == "tile":
        log.warning("calibration: map.standardize/map.scales are not used with resize=tile")
    elif wants:
        sp = list(stats_paths)
        if len(sp) > MAX_STATS_IMAGES:
            sp = sp[:: -(-len(sp) // MAX_STATS_IMAGES)]
        stats = map_statistics(insp, sp, batch_size)
    scorer = insp.with_calibration(stats=stats) if stats else insp
    if need_ref and len(stats_paths) < MIN_PER_NEIGHBOUR * k:
        log.warning("calibration: %d reference images are too few for calibration.neighbours = %d (need %d); "
                    "image scores stay raw", len(stats_paths), k, MIN_PER_NEIGHBOUR * k)  # fmt: skip
    elif need_ref:  # reference normals: the same images as the statistics, never those that set thresholds
        try:
            stats = {**stats, **neighbour_reference(scorer, list(stats_paths), k, batch_size)}
        except NonPositiveScores as e:
            log.warning("calibration: %s; image scores stay raw", e)
    if need_ref:  # score with the new reference, or none: never a stale one from the model file
        scorer = insp.with_calibration(stats={**_without_reference(insp.stats), **stats}, replace_stats=True)
    zs: list[np.ndarray] = []
    scores, pix = normal_scores(scorer, paths, batch_size, latents=zs if latents else None)
    if len(zs) >= 3:  # the normals' latent space (ops.latent): Mahalanobis score, 2-D view
        stats = {**stats, **fit_latent_stats(np.stack(zs))}
    thr, info = quantile_upper_bound(scores, cfg.target_fpr, cfg.confidence)
    pthr = pixel_threshold(pix, cfg.pixel_quantile)
    scale = float(np.std(scores)) or max(abs(thr) * 0.1, 1e-6)
    cal: dict[str, Any] = {
        "image_threshold": float(thr),
        "pixel_threshold": float(pthr),
        "source": "normal",
        "target_fpr": cfg.target_fpr,
        "confidence": cfg.confidence,
        "pixel_quantile": cfg.pixel_quantile,
        "n_images": int(len(scores)),
        "neighbours": k if has_reference(scorer.stats) else 0,  # scores relative to k nearest normals
        "score_scale": scale,
        "image_info": info,
        "normal_scores": {
            "mean": float(scores.mean()),
            "std": float(scores.std()),
            "min": float(scores.min()),
            "max": float(scores.max()),
            "quantiles": {f"p{q}": float(np.percentile(scores, q)) for q in (50, 90, 95, 99)},
        },
        "pixel_stats": {
            "n_sampled": int(pix.size),
            "mean": float(pix.mean()),
            "std": float(pix.std()),
            "p99": float(np.percentile(pix, 99)),
            "p999": float(np.percentile(pix, 99.9)),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": 0.0,
    }
    if labeled:  # scored as the calibrated model will score: new statistics, new pixel threshold
        cal["f1_max"] = f1_thresholds(scorer.with_calibration(dict(cal)), labeled, batch_size)
    cal["seconds"] = round(time.perf_counter() - t0, 3)
    return cal, stats


def f1_thresholds(
    insp: Inspector,
    labeled: Sequence[tuple[Path, int]],
    batch_size: int = 16,
    masks: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """F1-maximising image threshold from labelled images (label 1 = anomalous)."""
    scores, labels = [], []
    lab = {str(p): y for p, y in labeled}
    for chunk in _chunks(_decoded(insp, [p for p, _ in labeled]), batch_size):
        for r in insp.predict_arrays(chunk):
            scores.append(r.score)
            labels.append(lab[r.id])
    thr, f1 = f1_max_threshold(np.asarray(scores), np.asarray(labels))
    return {
        "image_threshold": float(thr),
        "f1": float(f1),
        "pixel_threshold": insp.pixel_threshold,
        "n_images": len(scores),
    }
