"""``Inspector``: a model file (``.safetensors``, run directory or ``.onnx`` export) in, ``Result`` out.

    insp = load_inspector("run/model.safetensors")        # or "model.onnx": same keywords, same Results
    r = insp.predict("part.png"); r.score, r.is_anomalous, r.mask, r.regions

The Inspector is the facade: decoding, geometry (stretch / letterbox / tiles), resampling to the original
size, ROI, scoring, thresholds, masks and regions. What turns model views into maps is its backend
(``backends.TorchBackend``: VAE + ``AnomalyHead``; ``backends.OnnxBackend`` / ``OpenVinoBackend``: the
traced graph of the same; ``loader`` picks one by name or, with ``backend="auto"``, by speed).
A batch is decoded on the CPU, moved to the device once, run there, and only the original-size maps come
back. On CUDA the batches are pipelined (``pipeline.py``, ``batches.py``): thresholding, morphology and the
image score run on the device and maps/masks come back only for the images that need them
(``maps="all" | "ng" | "none"``); connected components and region statistics stay on the host (OpenCV).

An Inspector does not change after loading: ``with_calibration`` / ``with_options`` return new ones that
share the backend (and its lock). The map settings (``cfg.map``, ``postprocess.sigma``) and the normal-map
statistics are built into the backend at load; thresholds, ROI and post-processing are read per batch.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from imganom.data.preprocess import prepare, to_original
from imganom.data.readers import ImageMeta
from imganom.formats.modelfile import ModelMeta
from imganom.inference import batches
from imganom.inference.backends import GraphBackend, TorchBackend
from imganom.inference.inputs import InputLike, load_input
from imganom.inference.loader import auto_backend, open_backend
from imganom.inference.pipeline import AdaptiveBatch
from imganom.inference.result import Result, verdict
from imganom.models.vae import ConvVAE
from imganom.ops.head import HeadOutput
from imganom.ops.postprocess import Region, border_roi, image_score, load_roi, postprocess
from imganom.utils.device import precision_label

MAPS = ("all", "ng", "none")
Backend = TorchBackend | GraphBackend


class Inspector:
    """A backend plus thresholds and ROI; thread-safe (device work is serialised by the backend's lock).

    ``model``: a ``ConvVAE`` (with ``stats``, ``device``, ``precision``, ``compile``, ``compile_mode`` as
    for ``TorchBackend``) or a ready backend. ``maps``: which Results carry the anomaly map, mask and
    regions: ``"all"`` (default), ``"ng"`` (only NG images; OK images come back with score and verdict,
    ``anomaly_map``/``mask`` None and no regions) or ``"none"``. ``device_postprocess`` (True on CUDA):
    threshold, morphology and score in torch on the device rather than in numpy/OpenCV after the copy
    back; same masks, same scores. Thresholds come from the calibration (``threshold_source``: "normal"
    or e.g. "f1_max"); ``image_threshold`` / ``pixel_threshold`` override them.
    """

    def __init__(
        self,
        model: ConvVAE | Backend,
        meta: ModelMeta,
        stats: Mapping[str, torch.Tensor] | None = None,
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
        uncertainty: int | None = None,
        review_below: float | None = None,
    ):
        if maps not in MAPS:
            raise ValueError(f"maps must be 'all', 'ng' or 'none', got {maps!r}")
        if isinstance(model, (TorchBackend, GraphBackend)):
            if stats is not None:
                raise ValueError("stats belong to the backend: pass them to TorchBackend")
            self.backend: Backend = model
        else:
            self.backend = TorchBackend(model, meta.cfg, stats, device=device, precision=precision,
                                        compile=compile, compile_mode=compile_mode)  # fmt: skip
        self.meta, self.cfg = meta, self.backend.cfg
        self.maps, self.roi, self.threshold_source = maps, roi, threshold_source
        self.device_postprocess = self.backend.device.type == "cuda"
        self.adaptive = AdaptiveBatch()
        self._roi_cache: dict = {}
        cal = meta.calibration or {}
        src = cal.get(threshold_source, {}) if threshold_source != "normal" else cal
        if threshold_source != "normal" and not src:
            raise ValueError(f"model has no {threshold_source!r} thresholds (calibrate with --labeled first)")
        self.image_threshold = image_threshold if image_threshold is not None else src.get("image_threshold")
        self.pixel_threshold = pixel_threshold if pixel_threshold is not None else src.get("pixel_threshold")
        self.score_scale = float(cal.get("score_scale") or 0.0) or None
        ucfg = self.cfg.uncertainty  # Monte-Carlo samples per view and the review cut (ops.uncertainty)
        self.uncertainty = int(uncertainty if uncertainty is not None else ucfg.samples)
        self.review_below = review_below if review_below is not None else ucfg.review_below
        if self.uncertainty < 1:
            raise ValueError(f"uncertainty samples must be >= 1, got {self.uncertainty}")
        if self.review_below is not None and not 0 < self.review_below < 1:
            raise ValueError(f"review_below must be in (0, 1), got {self.review_below}")

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str = "auto",
        precision: str = "auto",
        *,
        backend: str | None = None,
        roi: np.ndarray | str | Path | None = None,
        threads: int | None = None,
        compile: bool = False,
        compile_mode: str | None = None,
        **kw: Any,
    ) -> Inspector:
        """Load a ``.safetensors`` model file, a run directory or an ``.onnx`` export.

        ``backend``: ``"torch"``, ``"onnxruntime"``, ``"openvino"`` (graph backends: an ``.onnx`` file, or a
        model file traced on load and cached) or ``"auto"`` (the fastest here, measured once and cached;
        ``inference.loader``); None = torch for model files, onnxruntime for ``.onnx``. ``threads``: the
        backend's intra-op threads. ``precision`` applies to torch and openvino (onnxruntime: fp32).
        ``roi``: a bool (H, W) array or a mask image file (nonzero = inspect). Other keywords as for
        ``Inspector``; threshold keywords override the calibration."""
        if backend == "auto":
            if compile:
                raise ValueError("compile applies to the torch backend: pass backend='torch'")
            be, meta = auto_backend(path, device=device, precision=precision, threads=threads)
        else:
            be, meta = open_backend(path, backend, device=device, precision=precision, threads=threads,
                                    compile=compile, compile_mode=compile_mode)  # fmt: skip
        if isinstance(roi, (str, Path)):
            roi = load_roi(roi, tuple(be.cfg.preprocess.size))
        return cls(be, meta, roi=roi, **kw)

    def _derive(self, backend: Backend, meta: ModelMeta, **kw: Any) -> Inspector:
        """A new Inspector on ``backend``/``meta`` with this one's settings unless given in ``kw``."""
        kw = {"roi": self.roi, "maps": self.maps, "threshold_source": self.threshold_source,
              "uncertainty": self.uncertainty, "review_below": self.review_below, **kw}  # fmt: skip
        new = type(self)(backend, meta, **kw)
        new.device_postprocess, new.adaptive = self.device_postprocess, self.adaptive
        return new

    def with_calibration(
        self,
        calibration: dict[str, Any] | None = None,
        stats: Mapping[str, torch.Tensor] | None = None,
        replace_stats: bool = False,
    ) -> Inspector:
        """A new Inspector with this calibration (its thresholds, as at load) and/or these normal-map
        statistics (added to the model's, or instead of them with ``replace_stats``); this one is
        unchanged."""
        meta = self.meta if calibration is None else dataclasses.replace(self.meta, calibration=calibration)
        backend = self.backend if stats is None else self.backend.with_stats(stats, replace=replace_stats)
        if calibration is None:
            return self._derive(backend, meta, image_threshold=self.image_threshold,
                                pixel_threshold=self.pixel_threshold)  # fmt: skip
        return self._derive(backend, meta, threshold_source="normal")

    def with_options(self, **kw: Any) -> Inspector:
        """A new Inspector with other ``roi``, ``maps``, ``image_threshold``, ``pixel_threshold``,
        ``uncertainty`` (Monte-Carlo samples) or ``review_below``."""
        known = {"roi", "maps", "image_threshold", "pixel_threshold", "uncertainty", "review_below"}
        unknown = set(kw) - known
        if unknown:
            raise TypeError(f"with_options: unknown option(s) {sorted(unknown)}")
        kw = {"image_threshold": self.image_threshold, "pixel_threshold": self.pixel_threshold, **kw}
        return self._derive(self.backend, self.meta, **kw)

    # ---- what the backend holds --------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def amp(self) -> torch.dtype | None:
        return self.backend.amp

    @property
    def model(self) -> ConvVAE | None:
        return self.backend.model

    @property
    def stats(self) -> dict[str, torch.Tensor]:
        return self.backend.stats

    @property
    def standardize_mode(self) -> str:
        return self.backend.standardize_mode

    @property
    def scale_sigmas(self) -> list[float]:
        return self.backend.scale_sigmas

    @property
    def backend_info(self) -> dict[str, Any]:
        """Which backend runs the model (``name``: torch | onnxruntime | openvino), its threads and precision,
        and, after ``backend="auto"``, what was measured (``auto``)."""
        be = self.backend
        threads = getattr(be, "threads", None) or (torch.get_num_threads() if be.kind == "torch" else None)
        info = {"name": be.kind, "device": str(be.device), "precision": precision_label(be.amp),
                "threads": threads}  # fmt: skip
        weights = getattr(be, "weights", None)
        if weights:  # an INT8 OpenVINO IR: quantised VAE layers, fp32 head
            info["weights"] = weights
        return {**info, "auto": be.selection} if be.selection else info

    @property
    def model_id(self) -> str:
        return self.meta.model_id

    @property
    def calibrated(self) -> bool:
        return self.image_threshold is not None

    def load_input(self, x: InputLike, name: str | None = None) -> tuple[np.ndarray, ImageMeta]:
        """Decode a path / array / PIL image into the model's normalised CHW float32."""
        return load_input(x, self.cfg, name)

    # ---- device work -------------------------------------------------------------------------------------
    def model_maps_scored(self, views: torch.Tensor) -> HeadOutput:
        """Views (N, C, h, w) -> (maps (N, h, w), ELBO (N,), score maps or None, side outputs) from the
        backend, with ``uncertainty`` Monte-Carlo samples where the backend can draw them (torch)."""
        return self.backend.maps(views, samples=self.uncertainty)

    def model_maps(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Smoothed model-resolution maps (N, h, w) fp32 on the device, and the per-view negative ELBO."""
        out = self.model_maps_scored(views)
        return out.maps, out.elbo

    def raw_maps(self, views: torch.Tensor) -> torch.Tensor:
        """Unsmoothed, unstandardised single-scale maps (N, h, w): what normal-map statistics measure."""
        with self.backend.lock:
            return self.backend.raw_maps(views)

    @torch.no_grad()
    def reconstruct(self, chw: np.ndarray) -> np.ndarray:
        """The posterior-mean reconstruction (C, H, W) in [0, 1] of a normalised CHW input, at its original
        size (what the model thinks a normal part looks like here). Torch backend only."""
        if self.backend.model is None:
            raise RuntimeError(f"reconstructions need the torch backend (this one is {self.backend.kind})")
        views, geom = prepare(chw, self.cfg.preprocess)
        with self.backend.lock:
            _, _, rec = self.backend.model.reconstruct(torch.from_numpy(views).to(self.device))
        rec = rec.float()
        return np.stack([to_original(rec[:, c], geom).cpu().numpy() for c in range(rec.shape[1])])

    # ---- ROI, scores, results ----------------------------------------------------------------------------
    def roi_for(self, shape: tuple[int, int]) -> np.ndarray | None:
        """The bool ROI (True = inspect) for a map of ``shape``: the ROI resized, less the border."""
        roi = self.roi
        if roi is not None and roi.shape != shape:
            roi = cv2.resize(roi.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST) > 0
        border = self.cfg.postprocess.border
        if border:
            s = max(shape[0] / self.cfg.preprocess.size[0], shape[1] / self.cfg.preprocess.size[1])
            b = border_roi(shape, max(1, round(border * s)))
            roi = b if roi is None else (roi & b)
        return roi


    def roi_tensors(self, shape: tuple[int, int]) -> tuple[np.ndarray | None, torch.Tensor | None, int]:
        """``roi_for(shape)`` as (numpy, on the device, pixel count); cached per shape and ROI."""
        key = (id(self.roi), self.cfg.postprocess.border)
        hit = self._roi_cache.get(shape)
        if hit is None or hit[0] != key or hit[1] is not self.roi:
            roi = self.roi_for(shape)
            roi_t = None if roi is None else torch.from_numpy(np.ascontiguousarray(roi)).to(self.device)
            n = int(roi.sum()) if roi is not None else shape[0] * shape[1]
            hit = self._roi_cache[shape] = (key, self.roi, roi, roi_t, n)
        return hit[2], hit[3], hit[4]

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
        reference: float = 1.0,
    ) -> Result:
        """Original-size map (tensor) -> score (unless given; divided by the neighbours' ``reference``),
        verdict, mask and regions, on the host."""
        t0 = time.perf_counter()
        amap = amap_t.cpu().numpy().astype(np.float32, copy=False)
        roi = self.roi_for(amap.shape)
        if score is None:
            pp = self.cfg.postprocess
            score = float(elbo) if pp.score == "elbo" else image_score(amap, pp, roi)
        score = score / reference
        if self.pixel_threshold is not None:
            mask, regions = postprocess(amap, self.pixel_threshold, self.cfg.postprocess, roi)
        else:
            mask, regions = np.zeros(amap.shape, np.uint8), []
        timing = {**timing, "post": (time.perf_counter() - t0) * 1e3}
        image = chw if keep_image else None
        return self.make_result(item_id, float(score), amap, mask, regions, timing, meta, image)

    def make_result(
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
        norm, bad = verdict(score, self.image_threshold, self.score_scale)
        timing = {**timing, "total": sum(timing.values())}
        thresholds = {"image": self.image_threshold, "pixel": self.pixel_threshold}
        return Result(
            item_id, score, norm, bad, amap, mask, regions, thresholds, timing, meta, image, size=size
        )

    # ---- prediction ----------------------------------------------------------------------------------------
    def predict_stream(
        self,
        stream: Iterable[tuple[Any, list[batches.Item], list[float] | None]],
        keep_image: bool = False,
        errors: str = "raise",
    ) -> Iterator[tuple[Any, list[Result] | Exception]]:
        """``(tag, items, decode_ms)`` device batches in, ``(tag, results)`` out, in order.

        One batch is in flight while the host finishes the previous one: on CUDA (``pipeline.pipelined``)
        with the next batch's host views copied ahead on a side stream (``pipeline.Prefetcher``), on the CPU
        with the model on a thread (``pipeline.overlapped``).
        ``errors``: ``"raise"``, or ``"return"`` to get a RuntimeError/ValueError of a batch in place of its
        results (e.g. to retry it image by image) while the stream goes on.
        """
        return batches.stream(self, stream, keep_image, errors)

    def predict(self, x: InputLike | list, keep_image: bool = False) -> Result | list[Result]:
        """One input -> Result; a list/tuple -> list of Results (one device batch)."""
        if isinstance(x, (list, tuple)):
            return list(self.predict_batch(x, batch_size=max(1, len(x)), keep_image=keep_image))
        return next(iter(self.predict_batch([x], batch_size=1, keep_image=keep_image)))

    def predict_batch(
        self, inputs: Iterable[InputLike], batch_size: int = 16, keep_image: bool = False
    ) -> Iterator[Result]:
        """Stream inputs in device batches; yields one Result per input, in order. Bad inputs raise."""

        def stream() -> Iterator[tuple[None, list, list[float]]]:
            buf: list[batches.Item] = []
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

        for _, results in self.predict_stream(stream(), keep_image):
            yield from results  # type: ignore[misc]

    def predict_arrays(
        self, items: list[batches.Item], keep_image: bool = False, decode_ms: list[float] | None = None
    ) -> list[Result]:
        """Already-decoded CHW arrays (from ``read_image``/a DataLoader) -> Results, one device batch."""
        stream = [(None, items, decode_ms or [0.0] * len(items))]
        _, results = next(iter(self.predict_stream(stream, keep_image)))
        return results  # type: ignore[return-value]  # errors="raise": never an exception


def load_inspector(path: str | Path, **kw: Any) -> Inspector:
    """``Inspector.load``: a ``.safetensors`` file, a run directory or an ``.onnx`` export, with the same
    keywords (device, precision, image_threshold, pixel_threshold, threshold_source, roi, maps, ...)."""
    return Inspector.load(path, **kw)
