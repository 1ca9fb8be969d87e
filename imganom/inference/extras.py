"""Per-image side outputs of the torch backend, from the device to the ``Result``: the latent mean, the
ELBO split into its reconstruction and KL terms, and (with ``uncertainty.samples`` >= 2) the Monte-Carlo
uncertainty (score spread, uncertainty map, region confidences; ``ops.uncertainty``).

``image_extras`` reduces a chunk's per-view side outputs (``backends.extras_of``) to one host dict per image
(tiles averaged, maps resampled to the original size as the anomaly map is); ``attach`` fills a Result from
it. The map, the score and the verdict are never changed here: only ``verdict`` may read ``review`` (opt-in).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from imganom.inference.backends import extras_of
from imganom.inference.result import Result
from imganom.ops.head import HeadOutput, image_scores
from imganom.ops.uncertainty import mass_shares, region_confidence, region_pixels, score_spread

if TYPE_CHECKING:
    from imganom.inference.inspector import Inspector

TOP_REGIONS = 5  # regions listed in an explanation, by share of the anomaly mass


def image_extras(
    insp: Inspector,
    ho: HeadOutput,
    spans: list[tuple[int, int]],
    resample: Callable[[torch.Tensor, int], torch.Tensor],
) -> list[dict[str, np.ndarray]]:
    """One host dict per image (views ``spans[p]`` of ``ho``): ``latent`` (D,), ``elbo``, ``kl_term``
    and, when sampled, ``sample_scores`` (K,), ``recon_std`` (H, W) and ``sample_exceed`` (K, H, W) bool
    (sample map > pixel threshold). ``resample(maps (V, h, w), p)`` -> image p's (H, W) map, as the
    anomaly map is resampled."""
    ext = extras_of(ho)
    if not ext:
        return [{} for _ in spans]
    out = []
    for p, (a, b) in enumerate(spans):
        d = {"latent": ext["latent"][a:b].mean(0), "kl_term": ext["kl_term"][a:b].mean(),
             "elbo": ho.elbo[a:b].double().mean()}  # fmt: skip
        if ho.reference is not None:  # scores relative to the nearest normals (ops.neighbours)
            d["reference"] = ho.reference[a:b].double().mean()
        if "sample_maps" in ext:
            k = ext["sample_maps"].shape[0]
            sm = torch.stack([resample(ext["sample_maps"][j, a:b], p) for j in range(k)])
            ssm = None
            if "sample_score_maps" in ext:
                ssm = torch.stack([resample(ext["sample_score_maps"][j, a:b], p) for j in range(k)])
            _, roi_t, n_roi = insp.roi_tensors(tuple(sm.shape[-2:]))
            selbo = ext["sample_elbo"][:, a:b].double().mean(1)
            d["sample_scores"] = image_scores(HeadOutput(sm, selbo, ssm), insp.cfg.postprocess, roi_t, n_roi)
            if "reference" in d:
                d["sample_scores"] = d["sample_scores"] / d["reference"]
            d["recon_std"] = resample(ext["recon_std"][a:b], p)
            if insp.pixel_threshold is not None:
                d["sample_exceed"] = sm > insp.pixel_threshold
        out.append({key: v.detach().cpu().numpy() for key, v in d.items()})
    return out


def explanation(insp: Inspector, r: Result, ex: dict[str, np.ndarray], pixels: list[np.ndarray]) -> dict:
    """Why this image: the ELBO = ``recon_term`` (mean of the unsmoothed pixel map) + ``kl_term`` (KL
    divergence / (C*H*W)), the score rule, and the top regions by share of the anomaly mass
    (``ops.uncertainty``)."""
    elbo, kl = float(ex["elbo"]), float(ex["kl_term"])
    d: dict = {"score_rule": insp.cfg.postprocess.score, "elbo": elbo, "recon_term": elbo - kl, "kl_term": kl}
    if "reference" in ex:  # score = raw score / the nearest normals' mean raw score
        ref = float(ex["reference"])
        d.update(raw_score=r.score * ref, neighbours=insp.cfg.calibration.neighbours, neighbours_mean=ref)
    thr_p = r.thresholds.get("pixel")
    if r.anomaly_map is not None and thr_p is not None:
        total, shares = mass_shares(r.anomaly_map, thr_p, pixels, insp.roi_for(r.anomaly_map.shape))
        top = sorted(zip(r.regions, shares), key=lambda t: -t[1])[:TOP_REGIONS]
        d["anomaly_mass"] = total
        d["regions"] = [{"id": g.id, "share": s, "area": g.area, "peak": g.peak} for g, s in top]
    return d


def attach(insp: Inspector, r: Result, ex: dict[str, np.ndarray] | None) -> Result:
    """Fill ``r``'s latent, explanation and uncertainty from ``image_extras``' dict (in place; returns it)."""
    if not ex:
        return r
    pixels = region_pixels(r.mask, r.regions) if r.regions and r.mask is not None else []
    r.latent = ex["latent"].astype(np.float32)
    r.explanation = explanation(insp, r, ex, pixels)
    if "sample_scores" in ex:
        r.score_spread = score_spread(ex["sample_scores"])
        r.review_below = insp.review_below
        if r.anomaly_map is not None:
            r.uncertainty_map = ex["recon_std"].astype(np.float32)
        if "sample_exceed" in ex and pixels:
            conf = region_confidence(ex["sample_exceed"], pixels)
            r.regions = [dataclasses.replace(g, confidence=c) for g, c in zip(r.regions, conf)]
    return r
