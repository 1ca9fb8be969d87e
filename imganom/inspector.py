"""``Inspector``: model file in, ``Result`` (score, verdict, map, mask, regions) out.

    insp = Inspector.load("run/model.safetensors")
    r = insp.predict("part.png"); r.score, r.is_anomalous, r.mask, r.regions

A batch is decoded on the CPU, moved to the device once, run there under autocast (model + map kernels +
smoothing + resampling), and only the original-size maps come back for post-processing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from .anomaly_map import gaussian_blur
from .config import Config
from .io import ImageMeta, ImageReadError, normalize_intensity, read_image
from .kernels import compute_anomaly_map
from .model import ConvVAE, kl_divergence
from .modelfile import ModelMeta, load_model
from .postprocess import Region, border_roi, image_score, postprocess
from .preprocess import Geometry, prepare, to_original
from .thresholds import normalize_score
from .train import autocast_dtype, resolve_device

InputLike = str | Path | np.ndarray | Any  # path, array (HW, HWC or CHW) or PIL image


@dataclass
class Result:
    """Everything known about one inspected image. Maps and masks are at the original resolution."""

    id: str
    score: float
    norm_score: float
    is_anomalous: bool
    anomaly_map: np.ndarray  # (H, W) float32, smoothed
    mask: np.ndarray  # (H, W) uint8 0/1
    regions: list[Region]
    thresholds: dict[str, float | None]
    timing: dict[str, float] = field(default_factory=dict)  # milliseconds
    meta: ImageMeta | None = None
    image: np.ndarray | None = None  # the normalised CHW input, for overlays

    @property
    def verdict(self) -> str:
        return "NG" if self.is_anomalous else "OK"

    def to_dict(self, regions: bool = True) -> dict[str, Any]:
        """JSON-safe summary (no arrays)."""
        d = {
            "id": self.id,
            "verdict": self.verdict,
            "score": self.score,
            "norm_score": self.norm_score,
            "n_regions": len(self.regions),
            "max_region_area": max((r.area for r in self.regions), default=0),
            "image_threshold": self.thresholds.get("image"),
            "pixel_threshold": self.thresholds.get("pixel"),
            "size": list(self.anomaly_map.shape),
            "timing_ms": self.timing,
        }
        if regions:
            d["regions"] = [r.to_dict() for r in self.regions]
        return d


def _as_chw(x: np.ndarray, cfg: Config, name: str) -> np.ndarray:
    """A user array (HW, HWC with C<=4, or CHW) -> normalised float32 CHW with the model's channels."""
    a = np.asarray(x)
    if a.ndim == 2:
        a = a[None]
    elif a.ndim == 3 and a.shape[-1] <= 4 and a.shape[0] > 4:
        a = a.transpose(2, 0, 1)
    elif a.ndim != 3:
        raise ImageReadError(name, f"array must be HW, HWC or CHW, got shape {a.shape}")
    if a.size == 0:
        raise ImageReadError(name, "empty image")
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise ImageReadError(name, "contains NaN/Inf pixel values")
    a = normalize_intensity(a, cfg.preprocess.intensity, a.dtype)
    want = cfg.preprocess.channels
    if a.shape[0] != want:
        if a.shape[0] == 1 and want == 3:
            a = np.repeat(a, 3, axis=0)
        elif a.shape[0] in (3, 4) and want == 1:
            a = (0.299 * a[0] + 0.587 * a[1] + 0.114 * a[2])[None]
        elif a.shape[0] == 4 and want == 3:
            a = a[:3]
        else:
            raise ImageReadError(name, f"has {a.shape[0]} channels, model expects {want}")
    return np.ascontiguousarray(a, dtype=np.float32)


class Inspector:
    """A loaded model plus its thresholds; thread-safe (device work is serialised by a lock)."""

    def __init__(
        self,
        model: ConvVAE,
        meta: ModelMeta,
        stats: dict[str, torch.Tensor] | None = None,
        *,
        device: str = "auto",
        precision: str = "auto",
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
        threshold_source: str = "normal",
        roi: np.ndarray | None = None,
    ):
        self.meta, self.cfg = meta, meta.cfg
        self.device = resolve_device(device)
        self.amp = autocast_dtype(precision, self.device)
        self.model = model.to(self.device).eval()
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.stats = {k: v.to(self.device) for k, v in (stats or {}).items()}
        self.roi = roi
        self._lock = threading.Lock()
        cal = meta.calibration or {}
        src = cal.get(threshold_source, {}) if threshold_source != "normal" else cal
        if threshold_source != "normal" and not src:
            raise ValueError(f"model has no {threshold_source!r} thresholds (calibrate with --labeled first)")
        self.image_threshold = image_threshold if image_threshold is not None else src.get("image_threshold")
        self.pixel_threshold = pixel_threshold if pixel_threshold is not None else src.get("pixel_threshold")
        self.score_scale = float(cal.get("score_scale") or 0.0) or None

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", precision: str = "auto", **kw: Any) -> Inspector:
        """Load a model file (or run directory); threshold keywords override calibration."""
        model, meta, stats = load_model(path)
        return cls(model, meta, stats, device=device, precision=precision, **kw)

    @property
    def model_id(self) -> str:
        return self.meta.model_id

    @property
    def calibrated(self) -> bool:
        return self.image_threshold is not None

    # ---- input -------------------------------------------------------------------------------------------
    def load_input(self, x: InputLike, name: str | None = None) -> tuple[np.ndarray, ImageMeta]:
        """Decode a path / array / PIL image into the model's normalised CHW float32."""
        pp = self.cfg.preprocess
        if isinstance(x, (str, Path)):
            return read_image(
                x,
                intensity=pp.intensity,
                channels=pp.channels,
                channel_policy=pp.channel_policy,
                max_pixels=pp.max_pixels,
            )
        name = name or "<array>"
        if hasattr(x, "mode") and hasattr(x, "size") and not isinstance(x, np.ndarray):  # PIL image
            x = np.asarray(x)
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{name}: expected a path, numpy array or PIL image, got {type(x).__name__}")
        chw = _as_chw(x, self.cfg, name)
        if chw.shape[1] * chw.shape[2] > pp.max_pixels:
            raise ImageReadError(name, f"{chw.shape[2]}x{chw.shape[1]} exceeds max_pixels={pp.max_pixels}")
        meta = ImageMeta(
            path=name,
            original_size=tuple(chw.shape[1:]),
            dtype=str(np.asarray(x).dtype),
            channels=chw.shape[0],
            format="array",
        )
        return chw, meta

    # ---- device work -------------------------------------------------------------------------------------
    @torch.no_grad()
    def model_maps(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (N, C, h, w) on any device -> smoothed model-resolution maps (N, h, w) fp32 on the device,
        and the per-view negative ELBO (recon map mean + per-pixel KL)."""
        x = views.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        mcfg, sigma = self.cfg.map, self.cfg.postprocess.sigma
        fused = not mcfg.mc_samples and not (mcfg.standardize and "map_mean" in self.stats)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            mu, logvar = self.model.encode(x)
            recon = self.model.decode(mu)
        # one fused pass (map + smoothing) in the common case; otherwise raw maps, adjusted, then smoothed
        raw = compute_anomaly_map(x, recon, mcfg, sigma if fused else 0.0)
        if mcfg.mc_samples:
            gen = torch.Generator(device=self.device).manual_seed(0)
            for _ in range(mcfg.mc_samples):
                with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                    rec_k = self.model.decode(self.model.sample(mu, logvar, generator=gen))
                raw = raw + compute_anomaly_map(x, rec_k, mcfg, 0.0)
            raw = raw / (mcfg.mc_samples + 1)
        elbo = raw.flatten(1).mean(1) + kl_divergence(mu.float(), logvar.float()) / x[0].numel()
        if mcfg.standardize and "map_mean" in self.stats:
            raw = (raw - self.stats["map_mean"]) / self.stats["map_std"]
        if not fused and sigma > 0:
            raw = gaussian_blur(raw, sigma)
        return raw, elbo

    # ---- prediction ----------------------------------------------------------------------------------------
    def _score(self, amap: np.ndarray, elbo: float, roi: np.ndarray | None) -> float:
        if self.cfg.postprocess.score == "elbo":
            return float(elbo)
        return image_score(amap, self.cfg.postprocess, roi)

    def _roi_for(self, shape: tuple[int, int]) -> np.ndarray | None:
        roi = self.roi
        if roi is not None and roi.shape != shape:
            roi = cv2.resize(roi.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST) > 0
        border = self.cfg.postprocess.border
        if border:
            s = max(shape[0] / self.cfg.preprocess.size[0], shape[1] / self.cfg.preprocess.size[1])
            b = border_roi(shape, max(1, round(border * s)))
            roi = b if roi is None else (roi & b)
        return roi

    def finish(
        self,
        item_id: str,
        chw: np.ndarray,
        meta: ImageMeta | None,
        amap_t: torch.Tensor,
        elbo: float,
        timing: dict[str, float],
        keep_image: bool = False,
    ) -> Result:
        """Original-size map (tensor) -> score, verdict, mask and regions."""
        t0 = time.perf_counter()
        amap = amap_t.cpu().numpy().astype(np.float32, copy=False)
        roi = self._roi_for(amap.shape)
        score = self._score(amap, elbo, roi)
        thr_i, thr_p = self.image_threshold, self.pixel_threshold
        if thr_p is not None:
            mask, regions = postprocess(amap, thr_p, self.cfg.postprocess, roi)
        else:
            mask, regions = np.zeros(amap.shape, np.uint8), []
        if thr_i is not None:
            scale = self.score_scale or max(abs(thr_i) * 0.1, 1e-6)
            norm, bad = float(normalize_score(score, thr_i, scale)), score > thr_i
        else:
            norm, bad = float("nan"), False
        timing = {**timing, "post": (time.perf_counter() - t0) * 1e3}
        timing["total"] = sum(timing.values())
        return Result(
            item_id,
            float(score),
            norm,
            bool(bad),
            amap,
            mask,
            regions,
            {"image": thr_i, "pixel": thr_p},
            timing,
            meta,
            chw if keep_image else None,
        )

    def _run(
        self, batch: list[tuple[str, np.ndarray, ImageMeta | None]], keep_image: bool, decode_ms: list[float]
    ) -> list[Result]:
        t0 = time.perf_counter()
        views, geoms = [], []
        for _, chw, _ in batch:
            v, g = prepare(chw, self.cfg.preprocess)
            views.append(v)
            geoms.append(g)
        counts = [len(v) for v in views]
        x = torch.from_numpy(np.concatenate(views))
        if self.device.type == "cuda":
            x = x.pin_memory()
        with self._lock:
            maps, elbo = self.model_maps(x)
            per_image: list[tuple[torch.Tensor, float]] = []
            start = 0
            for n, g in zip(counts, geoms):
                per_image.append(
                    (to_original(maps[start : start + n], g), float(elbo[start : start + n].mean()))
                )
                start += n
            if self.device.type == "cuda":
                torch.cuda.synchronize()
        infer_ms = (time.perf_counter() - t0) * 1e3 / len(batch)
        return [
            self.finish(i, chw, m, amap, e, {"decode": d, "infer": infer_ms}, keep_image)
            for (i, chw, m), (amap, e), d in zip(batch, per_image, decode_ms)
        ]

    def predict(self, x: InputLike | list, keep_image: bool = False) -> Result | list[Result]:
        """One input -> Result; a list/tuple -> list of Results (one device batch)."""
        if isinstance(x, (list, tuple)):
            return list(self.predict_batch(x, batch_size=max(1, len(x)), keep_image=keep_image))
        return next(iter(self.predict_batch([x], batch_size=1, keep_image=keep_image)))

    def predict_batch(
        self, inputs: Iterable[InputLike], batch_size: int = 16, keep_image: bool = False
    ) -> Iterator[Result]:
        """Stream inputs in device batches; yields one Result per input, in order. Bad inputs raise."""
        buf: list[tuple[str, np.ndarray, ImageMeta | None]] = []
        dms: list[float] = []
        for k, x in enumerate(inputs):
            t0 = time.perf_counter()
            name = str(x) if isinstance(x, (str, Path)) else f"<input {k}>"
            chw, meta = self.load_input(x, name)
            buf.append((name, chw, meta))
            dms.append((time.perf_counter() - t0) * 1e3)
            if len(buf) >= batch_size:
                yield from self._run(buf, keep_image, dms)
                buf, dms = [], []
        if buf:
            yield from self._run(buf, keep_image, dms)

    def predict_arrays(
        self,
        items: list[tuple[str, np.ndarray, ImageMeta | None]],
        keep_image: bool = False,
        decode_ms: list[float] | None = None,
    ) -> list[Result]:
        """Already-decoded CHW arrays (from ``read_image``/a DataLoader) -> Results, one device batch."""
        return self._run(items, keep_image, decode_ms or [0.0] * len(items))


def geometry_of(inspector: Inspector, chw: np.ndarray) -> Geometry:
    """The geometry the inspector would use for this image (for tools that need tile counts)."""
    return prepare(chw, inspector.cfg.preprocess)[1]
