"""HTTP inspection service: ``create_app(inspector, settings)`` is the FastAPI app of ``imganom serve``.

A request's body is read with a hard size cap, decoded in a thread pool, and its CHW array joins a bounded
asyncio queue. One batcher task takes up to ``max_batch`` items (waiting at most ``max_wait_ms`` for more)
and runs ``Inspector.predict_arrays`` on a single device thread, so concurrent requests share device
batches. Mask / overlay encoding and per-request threshold overrides run back in the thread pool; the shared
inspector is never modified.

Status codes: 400 unreadable / corrupt / empty image or bad multipart; 413 body over ``max_body_mb`` or image
over ``max_pixels`` (a decompression-bomb guard, checked from the header before decoding); 415 unsupported
Content-Type; 422 bad query parameter, wrong channel count, or a volume (3-D) upload; 503 queue full or too
many requests in flight (with ``Retry-After: 1``); 504 request not done within ``timeout_s``. Every error
body is ``{"error": {"code": ..., "message": ...}}``.

Memory is bounded by admission control: at most ``max_queue + max_batch`` inspection requests are in the
handler at once, each holding at most ``max_body_mb`` of body plus its decoded image
(``max_pixels * channels * 4`` bytes).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import PurePath
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from imganom.data.readers import ImageMeta, ImageReadError, read_image_bytes, read_options, to_uint8_preview
from imganom.inference.inspector import Inspector, Result
from imganom.ops.postprocess import postprocess
from imganom.ops.thresholds import normalize_score
from imganom.reporting.writers import encode_png, render_overlay

log = logging.getLogger(__name__)

# Raw-body Content-Types and the file extension handed to the reader (format sniffing still decides).
RAW_CONTENT_TYPES: dict[str, str] = {
    "image/png": ".png", "image/jpeg": ".jpg", "image/tiff": ".tif", "image/bmp": ".bmp",
    "application/dicom": ".dcm", "application/octet-stream": "",
}  # fmt: skip
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


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

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "decode_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_body_mb", "timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


# ------------------------------------------------------------------------------------------- API schema


class RegionOut(BaseModel):
    id: int
    bbox: list[int] = Field(description="x0, y0, x1, y1 in original pixels (x1/y1 exclusive)")
    area: int
    area_pct: float
    centroid: list[float]
    peak: float
    mean: float


class Thresholds(BaseModel):
    image: float
    pixel: float


class ModelRef(BaseModel):
    id: str
    name: str
    version: str = Field(description="imganom version that wrote the model file")


class ImageInfo(BaseModel):
    width: int
    height: int
    channels: int = Field(description="channels as stored in the upload (before conversion)")
    format: str


class InspectResponse(BaseModel):
    id: str = Field(description="request id (X-Request-ID header if the client sent a valid one)")
    score: float
    norm_score: float = Field(description="score mapped to [0, 1] with the image threshold at 0.5")
    verdict: Literal["OK", "NG"]
    is_anomalous: bool
    n_regions: int
    regions: list[RegionOut] | None = Field(None, description="omitted when regions=false")
    thresholds: Thresholds
    model: ModelRef
    latency_ms: float
    image: ImageInfo
    mask_png_b64: str | None = Field(None, description="binary mask (0/255) PNG at the original size")
    overlay_png_b64: str | None = Field(None, description="RGB overlay PNG at the original size")


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class Status(BaseModel):
    status: str
    detail: str | None = None


class ModelInfo(BaseModel):
    id: str
    name: str
    input: dict[str, Any] = Field(description="size [h, w], channels, resize, intensity mode, max_pixels")
    config: dict[str, Any]
    thresholds: Thresholds
    calibration: dict[str, Any] | None
    training: dict[str, Any]
    versions: dict[str, str]
    format_version: int
    device: str
    precision: str


def _error_doc(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorResponse} for c in codes}


_INSPECT_BODY_DOC = {
    "requestBody": {
        "required": True,
        "description": "One image: a multipart upload in field `file`, or the raw bytes with an image "
        "Content-Type.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            },
            **{ct: {"schema": {"type": "string", "format": "binary"}} for ct in RAW_CONTENT_TYPES},
        },
    }
}


# ------------------------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error the client caused (or a limit it hit); rendered as ``{"error": {code, message}}``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def _error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _busy(message: str) -> ApiError:
    return ApiError(503, "overloaded", message, {"Retry-After": "1"})


def classify_read_error(e: ImageReadError) -> ApiError:
    """Map a reader error to a status: pixel budget -> 413, channels / volumes -> 422, the rest -> 400."""
    r = e.reason
    if r.startswith("too many pixels") or "DecompressionBombError" in r:
        return ApiError(413, "image_too_large", str(e))
    if "channels, model expects" in r:
        return ApiError(422, "unsupported_channels", str(e))
    if r.startswith("is a volume with"):
        return ApiError(
            422, "unsupported_volume", f"{e.path}: 3-D volumes are not accepted, upload one slice"
        )
    return ApiError(400, "bad_image", str(e))


# ------------------------------------------------------------------------------------------- metrics


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
                break
        self.sum += v
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cum = [], 0
        for b, c in zip(self.buckets, self.counts):
            cum += c
            out.append(f'{name}_bucket{{le="{b:g}"}} {cum}')
        out += [
            f'{name}_bucket{{le="+Inf"}} {self.count}',
            f"{name}_sum {self.sum:.6f}",
            f"{name}_count {self.count}",
        ]
        return out


class Metrics:
    """Prometheus counters/histograms, updated only from the event loop thread (no locking needed)."""

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        self.verdicts = {"OK": 0, "NG": 0}
        self.latency = _Histogram(LATENCY_BUCKETS)
        self.batch_size = _Histogram(BATCH_BUCKETS)

    def render(self, queue_depth: int, inflight: int, ready: bool) -> str:
        def head(name: str, kind: str, text: str) -> list[str]:
            return [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]

        lines = head("imganom_requests_total", "counter", "Inspection requests by HTTP status.")
        lines += [f'imganom_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
        lines += head("imganom_verdicts_total", "counter", "Inspected images by verdict.")
        lines += [f'imganom_verdicts_total{{verdict="{v}"}} {n}' for v, n in self.verdicts.items()]
        lines += head("imganom_request_latency_seconds", "histogram", "Inspection request latency.")
        lines += self.latency.lines("imganom_request_latency_seconds")
        lines += head("imganom_batch_size", "histogram", "Images per device batch.")
        lines += self.batch_size.lines("imganom_batch_size")
        lines += head("imganom_queue_depth", "gauge", "Decoded images waiting for the device.")
        lines.append(f"imganom_queue_depth {queue_depth}")
        lines += head("imganom_inflight_requests", "gauge", "Inspection requests being handled.")
        lines.append(f"imganom_inflight_requests {inflight}")
        lines += head("imganom_ready", "gauge", "1 when the model is loaded and warmed up.")
        lines.append(f"imganom_ready {int(ready)}")
        return "\n".join(lines) + "\n"


class _RequestMetrics:
    """ASGI middleware: counts ``/v1/inspect`` responses by status and observes their latency."""

    def __init__(self, app: Any, metrics: Metrics, path: str = "/v1/inspect"):
        self.app, self.metrics, self.path = app, metrics, path

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            key = str(status[0])
            self.metrics.requests[key] = self.metrics.requests.get(key, 0) + 1
            self.metrics.latency.observe(time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------- batching


@dataclass
class _Job:
    item: tuple[str, np.ndarray, ImageMeta]
    future: asyncio.Future


class MicroBatcher:
    """Bounded queue + one task that groups queued items into device batches run on a single thread.

    ``submit`` raises ``asyncio.QueueFull`` when the queue is full. ``close`` lets everything already queued
    finish before the task exits. A job whose future was cancelled (request timed out) is skipped.
    """

    def __init__(
        self,
        run: Callable[[list], list],
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: Callable[[int], None] = lambda n: None,
    ):
        self._run, self.max_batch, self.max_wait_s, self._on_batch = run, max_batch, max_wait_s, on_batch
        self.queue: asyncio.Queue[_Job | None] = asyncio.Queue(max_queue)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="imganom-device")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="imganom-batcher")

    def submit(self, item: tuple[str, np.ndarray, ImageMeta]) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(_Job(item, fut))
        return fut

    async def close(self, timeout: float) -> None:
        """Drain the queue (new submissions must already have stopped), then stop the task and thread."""
        if self._task is not None and not self._task.done():
            await self.queue.put(None)
            try:
                await asyncio.wait_for(self._task, timeout)
            except asyncio.TimeoutError:
                log.error("batcher did not drain within %.1fs; cancelling", timeout)
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = await self.queue.get()
            if job is None:
                return
            batch, stop = [job], False
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    nxt = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        nxt = await asyncio.wait_for(self.queue.get(), remaining)
                    except asyncio.TimeoutError:
                        break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            try:
                await self._process(batch)
            except Exception as e:  # never let one batch end the loop (every later request would time out)
                log.exception("batch failed")
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(e)
            if stop:
                return

    async def _process(self, batch: list[_Job]) -> None:
        live = [j for j in batch if not j.future.done()]
        if not live:
            return
        self._on_batch(len(live))
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self.executor, self._run, [j.item for j in live])
            outcomes: list[Any] = list(results)
        except Exception:
            # one bad item must not fail its neighbours: retry them one at a time
            outcomes = []
            for j in live:
                try:
                    outcomes.append((await loop.run_in_executor(self.executor, self._run, [j.item]))[0])
                except Exception as e:
                    outcomes.append(e)
        for j, out in zip(live, outcomes):
            if j.future.done():
                continue
            if isinstance(out, Exception):
                j.future.set_exception(out)
            else:
                j.future.set_result(out)


# ------------------------------------------------------------------------------------------- helpers


def rethreshold(
    insp: Inspector, r: Result, image_threshold: float | None = None, pixel_threshold: float | None = None
) -> Result:
    """A copy of ``r`` judged with other thresholds (same score and map); ``insp`` is only read."""
    thr_i = r.thresholds["image"] if image_threshold is None else image_threshold
    thr_p = r.thresholds["pixel"] if pixel_threshold is None else pixel_threshold
    mask, regions, norm, bad = r.mask, r.regions, r.norm_score, r.is_anomalous
    if pixel_threshold is not None:
        roi = insp._roi_for(r.anomaly_map.shape)  # same ROI/border the inspector used for this map
        mask, regions = postprocess(r.anomaly_map, pixel_threshold, insp.cfg.postprocess, roi)
    if image_threshold is not None:
        scale = insp.score_scale or max(abs(image_threshold) * 0.1, 1e-6)  # as in Inspector.finish
        norm, bad = float(normalize_score(r.score, image_threshold, scale)), r.score > image_threshold
    return replace(
        r,
        norm_score=norm,
        is_anomalous=bool(bad),
        mask=mask,
        regions=regions,
        thresholds={"image": thr_i, "pixel": thr_p},
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The whole request body, refusing (413) a declared Content-Length or an actual stream over ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "bad_request", f"invalid Content-Length header {declared!r}")
        if int(declared) > limit:
            raise ApiError(
                413,
                "body_too_large",
                f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes (--max-body-mb)",
            )
    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise ApiError(
                    413, "body_too_large", f"request body exceeds the limit of {limit} bytes (--max-body-mb)"
                )
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "client disconnected while sending the body") from None
    return b"".join(chunks)


def _media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


async def extract_image(request: Request, body: bytes) -> tuple[bytes, str]:
    """(image bytes, name for the reader) from a multipart field ``file`` or a raw image body."""
    ctype = _media_type(request.headers.get("content-type"))
    if ctype == "multipart/form-data":
        return await _from_multipart(request, body)
    if ctype and ctype not in RAW_CONTENT_TYPES:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"unsupported Content-Type {ctype!r}: send multipart/form-data with field 'file', or the "
            f"raw image with one of {', '.join(RAW_CONTENT_TYPES)}",
        )
    if not body:
        raise ApiError(400, "empty_body", "request body is empty: expected image bytes")
    return body, "upload" + RAW_CONTENT_TYPES.get(ctype or "application/octet-stream", "")


async def _from_multipart(request: Request, body: bytes) -> tuple[bytes, str]:
    async def once() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(request.headers, once(), max_files=4, max_fields=16).parse()
    except MultiPartException as e:
        raise ApiError(400, "bad_multipart", f"malformed multipart body: {e.message}") from None
    try:
        part = form.get("file")
        if part is None:
            raise ApiError(
                400, "missing_file", "multipart body has no field 'file' (expected the image there)"
            )
        if isinstance(part, str):
            raise ApiError(
                400, "missing_file", "multipart field 'file' must be a file upload, got a text field"
            )
        ctype = _media_type(part.content_type)
        if ctype and ctype not in RAW_CONTENT_TYPES and not ctype.startswith("image/"):
            raise ApiError(
                415,
                "unsupported_media_type",
                f"unsupported Content-Type {ctype!r} for multipart field 'file': expected an image",
            )
        data = await part.read()
        if not data:
            raise ApiError(400, "empty_body", "multipart field 'file' is empty: expected image bytes")
        name = PurePath(part.filename or "").name[-200:] or "upload" + RAW_CONTENT_TYPES.get(ctype, "")
        return data, name
    finally:
        await form.close()


def _b64_png(img: np.ndarray) -> str:
    return base64.b64encode(encode_png(img)).decode("ascii")


# ------------------------------------------------------------------------------------------- the app


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
            raise _busy("server is not running (starting or shutting down)")
        if self.inflight >= s.max_queue + s.max_batch:
            raise _busy(f"too many requests in flight ({self.inflight}); retry later")
        self.inflight += 1
        try:
            body = await within(read_body(request, s.max_body_bytes))
            data, name = await extract_image(request, body)
            del body
            chw, meta = await within(loop.run_in_executor(self.pool, self._decode, data, name))
            del data
            req_id = request.headers.get("x-request-id", "")
            req_id = req_id if _REQUEST_ID.match(req_id) else uuid.uuid4().hex
            try:
                fut = self.batcher.submit((req_id, chw, meta))
            except asyncio.QueueFull:
                raise _busy(f"inspection queue is full ({s.max_queue} waiting); retry later") from None
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
                **{**read_options(pp), "max_pixels": self.max_pixels},
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
        mask_b64 = _b64_png(r.mask.astype(np.uint8) * 255) if opts["mask"] else None
        overlay_b64 = None
        if opts["overlay"] and r.image is not None:
            vmax = 2.0 * thr_i if thr_i > 0 else max(r.score, 1e-6)  # as in ``imganom inspect``
            overlay_b64 = _b64_png(
                render_overlay(
                    to_uint8_preview(r.image),
                    r.anomaly_map,
                    r.mask,
                    threshold=thr_p,
                    vmax=vmax,
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
            },
            config=meta.config,
            thresholds=Thresholds(image=insp.image_threshold, pixel=insp.pixel_threshold),
            calibration=meta.calibration,
            training=meta.training,
            versions={k: str(v) for k, v in meta.versions.items()},
            format_version=meta.format_version,
            device=str(insp.device),
            precision={"torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(str(insp.amp), "fp32"),
        )


def create_app(insp: Inspector, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``insp``; the batcher and thread pools live for the app's lifespan."""
    svc = Service(insp, settings or ServeSettings())

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await svc.start()
        try:
            yield
        finally:
            await svc.stop()

    from imganom.utils.version import __version__

    app = FastAPI(
        title="imganom",
        version=__version__,
        lifespan=lifespan,
        description="Visual anomaly inspection: one image in, score, verdict, regions and mask out.",
    )
    app.state.service = svc

    @app.exception_handler(ApiError)
    async def _api_error(_r: Request, e: ApiError) -> JSONResponse:
        return _error_response(e.status, e.code, e.message, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_r: Request, e: RequestValidationError) -> JSONResponse:
        msg = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        return _error_response(422, "invalid_request", msg or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_r: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, f"http_{e.status_code}")
        return _error_response(e.status_code, code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_r: Request, e: Exception) -> JSONResponse:
        log.error("internal error", exc_info=e)
        return _error_response(500, "internal", f"internal server error: {type(e).__name__}")

    @app.post(
        "/v1/inspect",
        response_model=InspectResponse,
        response_model_exclude_none=True,
        responses=_error_doc(400, 413, 415, 422, 500, 503, 504),
        openapi_extra=_INSPECT_BODY_DOC,
        summary="Inspect one image",
    )
    async def inspect(
        request: Request,
        response: Response,
        mask: bool = Query(False, description="include the binary mask as a base64 PNG"),
        overlay: bool = Query(False, description="include the heatmap overlay as a base64 PNG"),
        regions: bool = Query(True, description="include the list of anomalous regions"),
        image_threshold: float | None = Query(
            None, description="override the image threshold (this request)"
        ),
        pixel_threshold: float | None = Query(
            None, description="override the pixel threshold (this request)"
        ),
    ) -> InspectResponse:
        for key, v in (("image_threshold", image_threshold), ("pixel_threshold", pixel_threshold)):
            if v is not None and not math.isfinite(v):
                raise ApiError(422, "invalid_request", f"{key} must be a finite number, got {v}")
        opts = {
            "mask": mask,
            "overlay": overlay,
            "regions": regions,
            "image_threshold": image_threshold,
            "pixel_threshold": pixel_threshold,
        }
        resp = await svc.inspect(request, opts)
        response.headers["X-Request-ID"] = resp.id
        return resp

    @app.get("/healthz", response_model=Status, summary="Liveness: 200 while the process serves")
    async def healthz() -> Status:
        return Status(status="ok")

    @app.get(
        "/readyz",
        response_model=Status,
        responses={503: {"model": Status}},
        summary="Readiness: 200 once the model is loaded and warmed up",
    )
    async def readyz() -> Any:
        if svc.ready:
            return Status(status="ready")
        return JSONResponse(Status(status="not_ready", detail=svc.not_ready_reason).model_dump(), 503)

    @app.get(
        "/v1/model", response_model=ModelInfo, summary="The served model: config, thresholds, calibration"
    )
    async def model_info() -> ModelInfo:
        return svc.model_info()

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics (text format 0.0.4)")
    async def metrics() -> PlainTextResponse:
        depth = svc.batcher.queue.qsize() if svc.batcher is not None else 0
        text = svc.metrics.render(depth, svc.inflight, svc.ready)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_middleware(_RequestMetrics, metrics=svc.metrics)
    return app
