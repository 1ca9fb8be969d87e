"""``Inspector``: model file in, ``Result`` (score, verdict, map, mask, regions) out.

    insp = Inspector.load("run/model.safetensors")
    r = insp.predict("part.png"); r.score, r.is_anomalous, r.mask, r.regions

A batch is decoded on the CPU, moved to the device once, run there under autocast (model + map kernels +
smoothing + resampling), and only the original-size maps come back for post-processing.

On CUDA the batches are pipelined (``gpu.py``): pinned host batches are copied one batch ahead on a side
stream, the device work of the next batch is queued before the host finishes the current one, thresholding,
morphology and the image score run on the device, and maps/masks come back only for the images that need
them (``maps="all" | "ng" | "none"``). Connected components and region statistics stay on the host (OpenCV).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from imganom.config import Config
from imganom.data.preprocess import Geometry, prepare, to_original
from imganom.data.readers import ImageMeta, ImageReadError, normalize_intensity, read_image, read_options
from imganom.formats.modelfile import ModelMeta, load_model
from imganom.inference.pipeline import (
    AdaptiveBatch,
    CompiledVAE,
    HostCopy,
    Prefetcher,
    host_map,
    keep_output_layer_fp32,
    pipelined,
    run_adaptive,
)
from imganom.models.vae import ConvVAE, kl_divergence
from imganom.ops.device_post import binarize_t, image_scores_t
from imganom.ops.maps import gaussian_blur, multiscale_map
from imganom.ops.postprocess import Region, border_roi, find_regions, image_score, postprocess
from imganom.ops.thresholds import normalize_score
from imganom.ops.triton_maps import compute_anomaly_map
from imganom.utils.device import autocast_dtype, resolve_device

InputLike = str | Path | np.ndarray | Any  # path, array (HW, HWC or CHW) or PIL image


@dataclass
class Result:
    """Everything known about one inspected image. Maps and masks are at the original resolution."""

    id: str
    score: float
    norm_score: float
    is_anomalous: bool
    anomaly_map: np.ndarray | None  # (H, W) float32, smoothed; None when not requested (Inspector.maps)
    mask: np.ndarray | None  # (H, W) uint8 0/1; None together with anomaly_map
    regions: list[Region]
    thresholds: dict[str, float | None]
    timing: dict[str, float] = field(default_factory=dict)  # milliseconds
    meta: ImageMeta | None = None
    image: np.ndarray | None = None  # the normalised CHW input, for overlays
    size: tuple[int, int] | None = None  # (H, W) of the original; needed when anomaly_map is None

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
            "size": list(self.anomaly_map.shape if self.anomaly_map is not None else self.size or ()),
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
    if a.shape[0] != want and cfg.preprocess.channel_policy == "strict":
        raise ImageReadError(name, f"has {a.shape[0]} channels, model expects {want} (channel_policy=strict)")
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


@dataclass
class _Batch:
    """One device batch on its way through ``Inspector.predict_stream``."""

    tag: Any
    items: list[tuple[str, np.ndarray, ImageMeta | None]]
    decode_ms: list[float]
    t0: float = field(default_factory=time.perf_counter)
    geoms: list[Geometry] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # first view of each image, then the total
    blocks: list[torch.Tensor] = field(default_factory=list)  # device maps / masks / stats blocks
    refs: list[tuple[int, int | None, int, int]] = field(default_factory=list)  # per image: blocks + row
    stats: HostCopy | None = None  # stats blocks on their way back: score, finite, elbo, mask nonempty
    stat_pos: dict[int, int] = field(default_factory=dict)  # block index -> position in ``stats``
    host: HostCopy | None = None  # all blocks on their way back (maps="all")
    error: Exception | None = None


class Inspector:
    """A loaded model plus its thresholds; thread-safe (device work is serialised by a lock).

    ``maps``: which Results carry the anomaly map, mask and regions: ``"all"`` (default), ``"ng"`` (only NG
    images; OK images come back with score and verdict, ``anomaly_map``/``mask`` None and no regions: nothing
    else leaves the device for them) or ``"none"``. ``compile``: ``torch.compile`` the VAE (``compile_mode``,
    default ``"reduce-overhead"`` = CUDA graphs on CUDA, batches padded to one fixed size).
    ``device_postprocess`` (True on CUDA): threshold, morphology and score in torch on the device rather than
    in numpy/OpenCV after the copy back; same masks, same scores.
    """

    # class-level defaults: subclasses that skip __init__ (export.OnnxInspector) get the plain path
    maps: str = "all"
    device_postprocess: bool = False
    _adaptive: AdaptiveBatch | None = None
    _compiled: CompiledVAE | None = None

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
        maps: str = "all",
        compile: bool = False,
        compile_mode: str | None = None,
    ):
        if maps not in ("all", "ng", "none"):
            raise ValueError(f"maps must be 'all', 'ng' or 'none', got {maps!r}")
        self.meta, self.cfg = meta, meta.cfg
        self.device = resolve_device(device)
        self.amp = autocast_dtype(precision, self.device)
        self.model = model.to(self.device).eval()
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        keep_output_layer_fp32(self.model)  # bf16/fp16 autocast: reconstruction in fp32 (no-op without)
        self.maps = maps
        self.device_postprocess = self.device.type == "cuda"
        self._adaptive = AdaptiveBatch()
        if compile:
            mode = compile_mode or ("reduce-overhead" if self.device.type == "cuda" else None)
            self._compiled = CompiledVAE(self.model, mode)
        self.stats = {k: v.to(self.device) for k, v in (stats or {}).items()}
        self.roi = roi
        self._lock = threading.Lock()
        self._set_thresholds(meta, image_threshold, pixel_threshold, threshold_source)

    def _set_thresholds(
        self, meta: ModelMeta, image: float | None, pixel: float | None, source: str
    ) -> None:
        """Calibrated thresholds from the model file (``source``: 'normal' or e.g. 'f1_max'), overridable."""
        cal = meta.calibration or {}
        src = cal.get(source, {}) if source != "normal" else cal
        if source != "normal" and not src:
            raise ValueError(f"model has no {source!r} thresholds (calibrate with --labeled first)")
        self.image_threshold = image if image is not None else src.get("image_threshold")
        self.pixel_threshold = pixel if pixel is not None else src.get("pixel_threshold")
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
            return read_image(x, **read_options(pp))
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
    @property
    def standardize_mode(self) -> str:
        """``cfg.map.standardize`` where the model has the normal-map statistics, else "off"."""
        return self.cfg.map.standardize if "map_mean" in self.stats else "off"

    @property
    def scale_sigmas(self) -> list[float]:
        """Smoothing scales of the multi-scale map ([] = single scale, also while uncalibrated)."""
        if not self.cfg.map.scales or "scale_mean" not in self.stats:
            return []
        return [float(self.cfg.postprocess.sigma), *self.cfg.map.scales]

    def model_maps(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (N, C, h, w) on any device -> smoothed model-resolution maps (N, h, w) fp32 on the device,
        and the per-view negative ELBO (recon map mean + per-pixel KL)."""
        maps, elbo, _ = self.model_maps_scored(views)
        return maps, elbo

    @torch.no_grad()
    def model_maps_scored(
        self, views: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``model_maps`` plus, with ``map.standardize == "score"``, the standardised smoothed maps the image
        score is taken from (None otherwise)."""
        x = views.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        mcfg, sigma = self.cfg.map, self.cfg.postprocess.sigma
        zmode = self.standardize_mode
        scales = self.scale_sigmas
        fused = not mcfg.mc_samples and zmode == "off" and not scales
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            if self._compiled is not None:
                mu, logvar, recon = self._compiled(x)
            else:
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
        smaps = None
        if zmode == "score":
            smaps = gaussian_blur((raw - self.stats["map_mean"]) / self.stats["map_std"], sigma)
        elif zmode == "map":
            raw = (raw - self.stats["map_mean"]) / self.stats["map_std"]
        if scales:
            raw = multiscale_map(raw, scales, self.stats["scale_mean"], self.stats["scale_std"])
        elif not fused and sigma > 0:
            raw = gaussian_blur(raw, sigma)
        return raw, elbo, smaps

    # ---- prediction ----------------------------------------------------------------------------------------
    def _score(self, amap: np.ndarray, elbo: float, roi: np.ndarray | None) -> float:
        if self.cfg.postprocess.score == "elbo":
            return float(elbo)
        return image_score(amap, self.cfg.postprocess, roi)

    def _verdict(self, score: float) -> tuple[float, bool]:
        """(normalised score, NG?) at the image threshold; (nan, False) when uncalibrated."""
        thr = self.image_threshold
        if thr is None:
            return float("nan"), False
        scale = self.score_scale or max(abs(thr) * 0.1, 1e-6)
        return float(normalize_score(score, thr, scale)), bool(score > thr)

    def _scores_t(self, maps: torch.Tensor, smaps: torch.Tensor | None, elbo: torch.Tensor) -> torch.Tensor:
        """Image scores (N,) float64 on the device, from the score maps where there are any."""
        pp = self.cfg.postprocess
        if pp.score == "elbo":
            return elbo
        m = maps if smaps is None else smaps
        _, roi_t, n_roi = self._roi_device(tuple(m.shape[-2:]))
        return image_scores_t(m, pp, roi_t, n_roi)

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
        score: float | None = None,
    ) -> Result:
        """Original-size map (tensor) -> score (unless given), verdict, mask and regions."""
        t0 = time.perf_counter()
        amap = amap_t.cpu().numpy().astype(np.float32, copy=False)
        roi = self._roi_for(amap.shape)
        if score is None:
            score = self._score(amap, elbo, roi)
        thr_p = self.pixel_threshold
        if thr_p is not None:
            mask, regions = postprocess(amap, thr_p, self.cfg.postprocess, roi)
        else:
            mask, regions = np.zeros(amap.shape, np.uint8), []
        timing = {**timing, "post": (time.perf_counter() - t0) * 1e3}
        image = chw if keep_image else None
        return self._result(item_id, float(score), amap, mask, regions, timing, meta, image)

    def _result(
        self,
        item_id: str,
        score: float,
        amap: np.ndarray | None,
        mask: np.ndarray | None,
        regions: list[Region],
        timing: dict[str, float],
        meta: ImageMeta | None,
        image: np.ndarray | None,
        size: tuple[int, int] | None = None,
    ) -> Result:
        """A Result with the verdict at the current thresholds and the total time filled in."""
        norm, bad = self._verdict(score)
        timing = {**timing, "total": sum(timing.values())}
        thresholds = {"image": self.image_threshold, "pixel": self.pixel_threshold}
        return Result(
            item_id, score, norm, bad, amap, mask, regions, thresholds, timing, meta, image, size=size
        )

    # ---- pipelined device batches --------------------------------------------------------------------------
    def _roi_device(self, shape: tuple[int, int]) -> tuple[np.ndarray | None, torch.Tensor | None, int]:
        """ROI for maps of this shape: (numpy, on the device, pixel count); cached per shape and ROI."""
        cache = self.__dict__.setdefault("_roi_cache", {})
        key = (id(self.roi), self.cfg.postprocess.border)
        hit = cache.get(shape)
        if hit is None or hit[0] != key or hit[1] is not self.roi:
            roi = self._roi_for(shape)
            roi_t = None if roi is None else torch.from_numpy(np.ascontiguousarray(roi)).to(self.device)
            n = int(roi.sum()) if roi is not None else shape[0] * shape[1]
            hit = cache[shape] = (key, self.roi, roi, roi_t, n)
        return hit[2], hit[3], hit[4]

    def _host_batch(self, batch: _Batch) -> torch.Tensor | None:
        """Model views of the whole batch in one host tensor (pinned on CUDA, for the async copy)."""
        views = []
        for _, chw, _ in batch.items:
            v, g = prepare(chw, self.cfg.preprocess)
            views.append(v)
            batch.geoms.append(g)
        batch.offsets = np.cumsum([0] + [len(v) for v in views]).tolist()
        if not views:
            return None
        if self.device.type != "cuda":
            return torch.from_numpy(np.concatenate(views))
        x = torch.empty((batch.offsets[-1], *views[0].shape[1:]), dtype=torch.float32, pin_memory=True)
        np.concatenate(views, out=x.numpy())
        return x

    def _chunk_groups(
        self, batch: _Batch, x: torch.Tensor, idx: list[int]
    ) -> list[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Device maps for images ``idx`` at original size, grouped by shape:
        [(positions, maps, elbo, score maps or None)]."""
        s, e = batch.offsets[idx[0]], batch.offsets[idx[-1] + 1]
        maps, elbo, smaps = self.model_maps_scored(x[s:e])
        geoms = [batch.geoms[i] for i in idx]
        g0 = geoms[0]
        if all(g.mode == "stretch" and g.original == g0.original for g in geoms):  # one view each: batched
            h, w = g0.original

            def up(m: torch.Tensor) -> torch.Tensor:
                m = m.float()
                if tuple(m.shape[-2:]) == (h, w):
                    return m
                return F.interpolate(m[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]

            return [(list(range(len(idx))), up(maps), elbo.double(), None if smaps is None else up(smaps))]
        by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
        amaps, elbos, smaps_o = [], [], []
        for p, i in enumerate(idx):
            a, b = batch.offsets[i] - s, batch.offsets[i + 1] - s
            amaps.append(to_original(maps[a:b], batch.geoms[i]))
            elbos.append(elbo[a:b].mean())
            if smaps is not None:
                smaps_o.append(to_original(smaps[a:b], batch.geoms[i]))
            by_shape[tuple(amaps[-1].shape)].append(p)
        return [
            (
                ps,
                torch.stack([amaps[p] for p in ps]),
                torch.stack([elbos[p] for p in ps]).double(),
                torch.stack([smaps_o[p] for p in ps]) if smaps is not None else None,
            )
            for ps in by_shape.values()
        ]

    def _device_chunk(self, batch: _Batch, x: torch.Tensor, idx: list[int]) -> list[tuple]:
        """Images ``idx`` on the device -> per image (maps block, masks block or None, stats block, row)."""
        pp, thr_p = self.cfg.postprocess, self.pixel_threshold
        post = self.device_postprocess or self.maps != "all"
        out: list[tuple] = [None] * len(idx)
        for ps, maps, elbo, smaps in self._chunk_groups(batch, x, idx):
            masks = None
            if post:
                _, roi_t, _ = self._roi_device(tuple(maps.shape[-2:]))
                score = self._scores_t(maps, smaps, elbo)
                finite = torch.isfinite(maps).flatten(1).all(1).double()
                if thr_p is not None:
                    masks = binarize_t(maps, thr_p, pp, roi_t)
                    nonempty = masks.flatten(1).amax(1).double()
                else:
                    nonempty = torch.zeros_like(elbo)
            else:  # host post-processing; only a score from standardised maps is taken here
                nan = torch.full_like(elbo, float("nan"))
                score = nan if smaps is None else self._scores_t(maps, smaps, elbo)
                finite, nonempty = torch.ones_like(elbo), torch.zeros_like(elbo)
            stats = torch.stack([score, finite, elbo, nonempty], 1)
            for row, p in enumerate(ps):
                out[p] = (maps, masks, stats, row)
        return out

    @torch.no_grad()
    def _launch(self, batch: _Batch, x: torch.Tensor | None) -> _Batch:
        """Queue one batch's device work (adaptive chunks on OOM) and start copying back what is needed."""
        n = len(batch.items)
        if n == 0 or x is None:
            return batch
        with self._lock:
            per = run_adaptive(
                lambda idx: self._device_chunk(batch, x, idx), list(range(n)), n, self._adaptive
            )
        blocks: dict[int, torch.Tensor] = {}  # maps, masks and stats blocks, each copied back once
        for maps, masks, stats, _ in per:
            for t in (maps, masks, stats):
                if t is not None:
                    blocks.setdefault(id(t), t)
        pos = {k: j for j, k in enumerate(blocks)}
        batch.refs = [(pos[id(m)], None if k is None else pos[id(k)], pos[id(s)], r) for m, k, s, r in per]
        batch.blocks = list(blocks.values())
        stat_ids = sorted({r[2] for r in batch.refs})
        batch.stats = HostCopy([batch.blocks[j] for j in stat_ids])
        batch.stat_pos = {j: p for p, j in enumerate(stat_ids)}
        if self.maps == "all":  # every image needs its map and mask: copy the blocks as they are
            batch.host = HostCopy(batch.blocks)
        return batch

    def _collect(self, batch: _Batch, keep_image: bool) -> list[Result]:
        """Wait for one batch's copies, then score/verdict, masks and regions on the host."""
        n = len(batch.items)
        if n == 0:
            return []
        stat_blocks = batch.stats.wait()
        st = np.stack([stat_blocks[batch.stat_pos[s]][r] for _, _, s, r in batch.refs])  # (n, 4)
        infer_ms = (time.perf_counter() - batch.t0) * 1e3 / n
        timings = [{"decode": d, "infer": infer_ms} for d in batch.decode_ms]
        if not (self.device_postprocess or self.maps != "all"):  # host post-processing, as on the CPU
            host = batch.host.wait()
            given = self.standardize_mode == "score"  # score already taken from the standardised maps
            return [
                self.finish(
                    i, chw, m, torch.from_numpy(host[b][r]), float(st[j, 2]), timings[j], keep_image,
                    score=float(st[j, 0]) if given else None,
                )  # fmt: skip
                for j, ((i, chw, m), (b, _, _, r)) in enumerate(zip(batch.items, batch.refs))
            ]
        pp, thr_i, thr_p = self.cfg.postprocess, self.image_threshold, self.pixel_threshold
        if (pp.score != "elbo" or thr_p is not None) and not st[:, 1].all():
            raise ValueError("anomaly map contains NaN or inf values")
        scores = st[:, 0]
        bad = scores > thr_i if thr_i is not None else np.zeros(n, bool)
        need = np.ones(n, bool) if self.maps == "all" else bad if self.maps == "ng" else np.zeros(n, bool)
        if self.maps == "all":
            host = batch.host.wait()
            got = {
                j: (host[b][r], None if k is None else host[k][r])
                for j, (b, k, _, r) in enumerate(batch.refs)
            }
        else:  # only the images that need them, row by row
            js = np.flatnonzero(need).tolist()
            rows = []
            for j in js:
                b, k, _, r = batch.refs[j]
                rows += [batch.blocks[b][r]] + ([] if k is None else [batch.blocks[k][r]])
            flat = iter(HostCopy(rows).wait())
            got = {j: (next(flat), None if batch.refs[j][1] is None else next(flat)) for j in js}
        rois = {a.shape: self._roi_device(a.shape)[0] for a, _ in got.values()}

        def regions_of(j: int) -> tuple[np.ndarray, list[Region]]:  # connected components (OpenCV)
            amap, mask = got[j]
            if mask is None:
                return np.zeros(amap.shape, np.uint8), []
            if not st[j, 3]:  # empty on the device: nothing to label
                return mask, []
            return find_regions(mask, amap, pp.min_area, rois[amap.shape])

        t0 = time.perf_counter()
        post = dict(zip(got, host_map(regions_of, list(got))))
        post_ms = (time.perf_counter() - t0) * 1e3 / n
        results = []
        for j, (item_id, chw, meta) in enumerate(batch.items):
            score = float(scores[j])
            amap = mask = None
            regions: list[Region] = []
            if j in post:
                amap = got[j][0]
                mask, regions = post[j]
            timing = {**timings[j], "post": post_ms}
            image = chw if keep_image else None
            size = batch.geoms[j].original
            results.append(self._result(item_id, score, amap, mask, regions, timing, meta, image, size))
        return results

    def predict_stream(
        self,
        batches: Iterable[tuple[Any, list[tuple[str, np.ndarray, ImageMeta | None]], list[float] | None]],
        keep_image: bool = False,
        errors: str = "raise",
    ) -> Iterator[tuple[Any, list[Result] | Exception]]:
        """``(tag, items, decode_ms)`` device batches in, ``(tag, results)`` out, in order.

        On CUDA one batch is in flight while the host finishes the previous one (``gpu.pipelined``), and
        the next batch's host views are copied ahead on a side stream (``gpu.Prefetcher``). ``errors``:
        ``"raise"``, or ``"return"`` to get a RuntimeError/ValueError of a batch in place of its results
        (e.g. to retry it image by image) while the stream goes on.
        """
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        catch: tuple[type[Exception], ...] = (RuntimeError, ValueError) if errors == "return" else ()

        def host() -> Iterator[tuple[_Batch, torch.Tensor | None]]:
            for tag, items, dms in batches:
                items = list(items)
                b = _Batch(tag, items, list(dms) if dms is not None else [0.0] * len(items))
                try:
                    x = self._host_batch(b)
                except catch as e:
                    b.error, x = e, None
                yield b, x

        def launch(bx: tuple[_Batch, torch.Tensor | None]) -> _Batch:
            b, x = bx
            if b.error is None:
                try:
                    self._launch(b, x)
                except catch as e:
                    b.error = e
            return b

        def collect(b: _Batch) -> tuple[Any, list[Result] | Exception]:
            if b.error is not None:
                return b.tag, b.error
            try:
                return b.tag, self._collect(b, keep_image)
            except catch as e:
                return b.tag, e

        depth = 1 if self.device.type == "cuda" else 0
        return pipelined(Prefetcher(host(), self.device), launch, collect, depth)

    def _run(
        self, batch: list[tuple[str, np.ndarray, ImageMeta | None]], keep_image: bool, decode_ms: list[float]
    ) -> list[Result]:
        _, results = next(iter(self.predict_stream([(None, batch, decode_ms)], keep_image)))
        return results  # type: ignore[return-value]  # errors="raise": never an exception

    def predict(self, x: InputLike | list, keep_image: bool = False) -> Result | list[Result]:
        """One input -> Result; a list/tuple -> list of Results (one device batch)."""
        if isinstance(x, (list, tuple)):
            return list(self.predict_batch(x, batch_size=max(1, len(x)), keep_image=keep_image))
        return next(iter(self.predict_batch([x], batch_size=1, keep_image=keep_image)))

    def predict_batch(
        self, inputs: Iterable[InputLike], batch_size: int = 16, keep_image: bool = False
    ) -> Iterator[Result]:
        """Stream inputs in device batches; yields one Result per input, in order. Bad inputs raise."""

        def batches() -> Iterator[tuple[None, list, list[float]]]:
            buf: list[tuple[str, np.ndarray, ImageMeta | None]] = []
            dms: list[float] = []
            for k, x in enumerate(inputs):
                t0 = time.perf_counter()
                name = str(x) if isinstance(x, (str, Path)) else f"<input {k}>"
                chw, meta = self.load_input(x, name)
                buf.append((name, chw, meta))
                dms.append((time.perf_counter() - t0) * 1e3)
                if len(buf) >= batch_size:
                    yield None, buf, dms
                    buf, dms = [], []
            if buf:
                yield None, buf, dms

        for _, results in self.predict_stream(batches(), keep_image):
            yield from results  # type: ignore[misc]

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
