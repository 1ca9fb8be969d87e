"""The state behind the routes: one inspector, the micro-batcher, the CPU pool, limits and metrics.

A request's body is read with a hard size cap and a deadline, decoded in the CPU pool, and its CHW array joins
the batcher's queue; the batcher runs ``Inspector.predict_arrays`` on a single device thread, so concurrent
requests share device batches. Mask / overlay encoding and per-request threshold overrides run back in the CPU
pool; the shared inspector is never modified.

Memory: the bodies being read and the decoded images of all requests in the handler together hold at most
``max_inflight_mb`` (``MemoryBudget``: beyond it a request gets 503 at once); an image is refused from its
header when decoded it would exceed ``max_image_mb`` (H x W x channels x bytes per sample), so one decode
holds at most a few times that, and at most ``decode_threads`` decode at once. Slow clients cost no slot:
their body counts against the budget only as it arrives, and ``read_timeout_s`` ends them (408).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
from fastapi import Request

from imganom.data.readers import ImageMeta, ImageReadError, read_image_bytes, read_options, to_uint8_preview
from imganom.inference.inspector import Inspector
from imganom.inference.result import Result, verdict
from imganom.ops.postprocess import postprocess
from imganom.reporting.writers import encode_png, heatmap_vmax, render_overlay
from imganom.serve.batcher import MicroBatcher
from imganom.serve.errors import ApiError, busy, classify_read_error
from imganom.serve.metrics import Metrics
from imganom.serve.schemas import ImageInfo, InspectResponse, ModelInfo, ModelRef, RegionOut, Thresholds
from imganom.serve.uploads import extract_image, read_body
from imganom.utils.device import precision_label

log = logging.getLogger(__name__)
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclass(frozen=True)
class ServeSettings:
    """Service limits; see ``imganom serve --help`` for the meaning of each."""

    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 256
    max_body_mb: float = 50.0
    max_pixels: int | None = None  # None: the model's preprocess.max_pixels
    timeout_s: float = 30.0
    decode_threads: int = max(1, min(4, os.cpu_count() or 1))
    read_timeout_s: float = 10.0  # headers, then the body, must arrive within this (408 otherwise)
    max_image_mb: float = 64.0  # decoded image budget (and never more than the model's preprocess.max_bytes)
    max_inflight_mb: float = 1024.0  # bodies + decoded images held by requests in the handler (503 beyond)
    token: str | None = field(default=None, repr=False)  # bearer token; None: no authentication
    docs: bool = False  # serve /docs, /redoc and /openapi.json

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "decode_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_body_mb", "timeout_s", "read_timeout_s", "max_image_mb", "max_inflight_mb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.token is not None and not self.token.strip():
            raise ValueError("the token must not be empty")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


class MemoryBudget:
    """Bytes held by the requests in the handler (bodies as they arrive, decoded images); one event loop."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    @contextmanager
    def held(self) -> Iterator[Callable[[int], None]]:
        """One request's share: ``take(n)`` reserves ``n`` more bytes or refuses the request (503, retry
        later); all of it is given back when the block ends."""
        taken = [0]

        def take(n: int) -> None:
            if self.used + n > self.limit:
                raise busy(
                    f"requests in flight hold {self.used} bytes; {n} more would exceed --max-inflight-mb"
                )
            self.used += n
            taken[0] += n

        try:
            yield take
        finally:
            self.used -= taken[0]


_ABSOLUTE = re.compile(r"^(/|~|\\\\|[A-Za-z]:[\\/])")


def without_paths(x: Any) -> Any:
    """``x`` with every absolute path string (posix, ``~``, Windows drive or UNC) cut to its last part, so
    /v1/model does not tell clients where the model was trained (``/data/parts/train`` -> ``train``)."""
    if isinstance(x, str) and _ABSOLUTE.match(x):
        return (PureWindowsPath(x) if "\\" in x else PurePosixPath(x)).name or "<path>"
    if isinstance(x, dict):
        return {k: without_paths(v) for k, v in x.items()}
    if isinstance(x, list):
        return [without_paths(v) for v in x]
    return x


def rethreshold(
    insp: Inspector, r: Result, image_threshold: float | None = None, pixel_threshold: float | None = None
) -> Result:
    """A copy of ``r`` judged with other thresholds (same score and map); ``insp`` is only read."""
    thr_i = r.thresholds["image"] if image_threshold is None else image_threshold
    thr_p = r.thresholds["pixel"] if pixel_threshold is None else pixel_threshold
    mask, regions, norm, bad = r.mask, r.regions, r.norm_score, r.is_anomalous
    if pixel_threshold is not None:
        roi = insp.roi_for(r.anomaly_map.shape)  # same ROI/border the inspector used for this map
        mask, regions = postprocess(r.anomaly_map, pixel_threshold, insp.cfg.postprocess, roi)
    if image_threshold is not None:
        norm, bad = verdict(r.score, image_threshold, insp.score_scale)  # as the Inspector judges
    return replace(
        r,
        norm_score=norm,
        is_anomalous=bool(bad),
        mask=mask,
        regions=regions,
        thresholds={"image": thr_i, "pixel": thr_p},
    )


def b64_png(img: np.ndarray) -> str:
    """Base64 text of an image's PNG encoding (for JSON)."""
    return base64.b64encode(encode_png(img)).decode("ascii")


class Service:
    """State shared by the routes: the inspector, the batcher, the pools and the metrics."""

    def __init__(self, insp: Inspector, settings: ServeSettings):
        if insp.image_threshold is None or insp.pixel_threshold is None:
            raise ValueError(
                "model is not calibrated (no image/pixel thresholds): run imganom calibrate first"
            )
        self.insp, self.settings = insp, settings
        pp = insp.cfg.preprocess
        self.max_pixels = settings.max_pixels or pp.max_pixels
        self.max_bytes = min(pp.max_bytes, int(settings.max_image_mb * 2**20))
        self.budget = MemoryBudget(int(settings.max_inflight_mb * 2**20))
        self.metrics = Metrics()
        meta = insp.meta
        self.model_ref = ModelRef(
            id=meta.model_id, name=insp.cfg.name, version=meta.versions.get("imganom", "")
        )
        self.ready, self.stopping, self.not_ready_reason, self.inflight = False, False, "warming up", 0
        self.batcher: MicroBatcher | None = None
        self.pool: ThreadPoolExecutor | None = None

    # -- lifecycle
    async def start(self) -> None:
        s = self.settings
        self.pool = ThreadPoolExecutor(s.decode_threads, thread_name_prefix="imganom-cpu")
        self.batcher = MicroBatcher(
            lambda items: self.insp.predict_arrays(items, keep_image=True),
            s.max_batch,
            s.max_wait_ms / 1e3,
            s.max_queue,
            self.metrics.batch_size.observe,
        )
        self.batcher.start()
        self._warm = asyncio.get_running_loop().create_task(self._warm_up())

    async def _warm_up(self) -> None:
        c, (h, w) = self.insp.cfg.preprocess.channels, self.insp.cfg.preprocess.size
        blank = np.zeros((c, h, w), np.float32)
        meta = ImageMeta("<warm-up>", (h, w), "float32", c, "array")
        try:
            await asyncio.get_running_loop().run_in_executor(
                self.batcher.executor, self.insp.predict_arrays, [("<warm-up>", blank, meta)]
            )
        except Exception as e:  # the server stays up (healthz) but never becomes ready
            log.exception("warm-up inference failed")
            self.not_ready_reason = f"warm-up inference failed: {type(e).__name__}: {e}"
            return
        self.ready = True
        log.info("model %s warmed up on %s", self.insp.model_id, self.insp.device)

    async def stop(self) -> None:
        self.ready, self.stopping, self.not_ready_reason = False, True, "shutting down"
        self._warm.cancel()
        if self.batcher is not None:
            await self.batcher.close(self.settings.timeout_s)
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)

    # -- one request
    async def inspect(self, request: Request, opts: dict[str, Any]) -> InspectResponse:
        s, loop = self.settings, asyncio.get_running_loop()
        t0 = time.perf_counter()
        deadline = t0 + s.timeout_s

        async def within(aw: Any) -> Any:
            try:
                return await asyncio.wait_for(aw, max(deadline - time.perf_counter(), 1e-3))
            except asyncio.TimeoutError:
                raise ApiError(
                    504, "timeout", f"request not completed within {s.timeout_s:g}s (--timeout-s)"
                ) from None

        if self.batcher is None or self.pool is None or self.stopping:
            raise busy("server is not running (starting or shutting down)")
        with self.budget.held() as take:
            try:
                body = await asyncio.wait_for(read_body(request, s.max_body_bytes, take), s.read_timeout_s)
            except asyncio.TimeoutError:
                msg = f"request body not received within {s.read_timeout_s:g}s (--read-timeout-s)"
                raise ApiError(408, "request_timeout", msg, {"Connection": "close"}) from None
            data, name = await extract_image(request, body)
            del body
            if self.inflight >= s.max_queue + s.max_batch:
                raise busy(f"too many requests in flight ({self.inflight}); retry later")
            self.inflight += 1
            try:
                chw, meta = await within(loop.run_in_executor(self.pool, self._decode, data, name))
                del data
                take(chw.nbytes)
                req_id = request.headers.get("x-request-id", "")
                req_id = req_id if REQUEST_ID.match(req_id) else uuid.uuid4().hex
                try:
                    fut = self.batcher.submit((req_id, chw, meta))
                except asyncio.QueueFull:
                    raise busy(f"inspection queue is full ({s.max_queue} waiting); retry later") from None
                try:
                    result = await within(fut)
                except (ImageReadError, ValueError) as e:
                    raise ApiError(422, "cannot_inspect", f"{name}: cannot inspect image: {e}") from None
                resp = await within(loop.run_in_executor(self.pool, self._respond, result, meta, opts, t0))
            finally:
                self.inflight -= 1
        self.metrics.verdicts[resp.verdict] += 1
        return resp

    def _decode(self, data: bytes, name: str) -> tuple[np.ndarray, ImageMeta]:
        pp = self.insp.cfg.preprocess
        try:
            return read_image_bytes(
                data,
                name,
                **{**read_options(pp), "max_pixels": self.max_pixels, "max_bytes": self.max_bytes},
            )
        except ImageReadError as e:
            raise classify_read_error(e) from None
        except Exception as e:  # the reader promises ImageReadError; never let a decoder bug become a 500
            log.exception("unexpected decoder error for %s", name)
            raise ApiError(
                400, "bad_image", f"{name}: cannot decode image: {type(e).__name__}: {e}"
            ) from None

    def _respond(self, r: Result, meta: ImageMeta, opts: dict[str, Any], t0: float) -> InspectResponse:
        r = rethreshold(self.insp, r, opts["image_threshold"], opts["pixel_threshold"])
        thr_i, thr_p = float(r.thresholds["image"]), float(r.thresholds["pixel"])
        mask_b64 = b64_png(r.mask.astype(np.uint8) * 255) if opts["mask"] else None
        overlay_b64 = None
        if opts["overlay"] and r.image is not None:
            overlay_b64 = b64_png(
                render_overlay(
                    to_uint8_preview(r.image),
                    r.anomaly_map,
                    r.mask,
                    threshold=thr_p,
                    vmax=heatmap_vmax(thr_i, r.score),  # as in ``imganom inspect``
                    score=r.norm_score,
                    verdict=r.verdict,
                )
            )
        h, w = meta.original_size
        return InspectResponse(
            id=r.id,
            score=r.score,
            norm_score=r.norm_score,
            verdict=r.verdict,
            is_anomalous=r.is_anomalous,
            confidence=r.confidence,
            explanation=r.explanation,
            n_regions=len(r.regions),
            regions=[RegionOut(**g.to_dict()) for g in r.regions] if opts["regions"] else None,
            thresholds=Thresholds(image=thr_i, pixel=thr_p),
            model=self.model_ref,
            latency_ms=round((time.perf_counter() - t0) * 1e3, 3),
            image=ImageInfo(width=w, height=h, channels=meta.channels, format=meta.format),
            mask_png_b64=mask_b64,
            overlay_png_b64=overlay_b64,
        )

    def model_info(self) -> ModelInfo:
        insp, meta, pp = self.insp, self.insp.meta, self.insp.cfg.preprocess
        return ModelInfo(
            id=meta.model_id,
            name=insp.cfg.name,
            input={
                "size": list(pp.size),
                "channels": pp.channels,
                "resize": pp.resize,
                "intensity": pp.intensity.mode,
                "max_pixels": self.max_pixels,
                "max_bytes": self.max_bytes,
            },
            config=without_paths(meta.config),
            thresholds=Thresholds(image=insp.image_threshold, pixel=insp.pixel_threshold),
            calibration=without_paths(meta.calibration),
            training=without_paths(meta.training),
            versions={k: str(v) for k, v in meta.versions.items()},
            format_version=meta.format_version,
            device=str(insp.device),
            precision=precision_label(insp.amp),
            backend=insp.backend_info,
        )
