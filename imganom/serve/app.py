"""HTTP inspection service: ``create_app(inspector, settings)`` is the FastAPI app of ``imganom serve``.

How a request flows is in ``service``; the pieces: ``uploads`` (body and image bytes), ``batcher``
(micro-batching), ``errors`` (error bodies and statuses), ``metrics`` (Prometheus), ``schemas`` (JSON).

Status codes: 400 unreadable / corrupt / empty image or bad (or truncated) multipart; 401 missing or wrong
bearer token (when the server has one; /healthz and /readyz stay open); 408 headers or body not received
within ``read_timeout_s``; 413 body over ``max_body_mb`` or image over ``max_pixels`` / ``max_image_mb``
(decompression-bomb guards, checked from the header before decoding); 415 unsupported Content-Type; 422 bad
query parameter, wrong channel count, or a volume (3-D) upload; 503 queue full, too many requests in flight
or the memory budget ``max_inflight_mb`` used up (with ``Retry-After: 1``); 504 request not done within
``timeout_s``. Every error body is ``{"error": {"code": ..., "message": ...}}``.

Memory is bounded as ``service`` describes: requests in the handler hold at most ``max_inflight_mb`` of
bodies and decoded images together, plus what the ``decode_threads`` decodes in progress hold (each refused
from its header beyond ``max_image_mb``). /docs, /redoc and /openapi.json exist only with ``docs``.
"""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from imganom.inference.inspector import Inspector
from imganom.serve.errors import ApiError, add_error_handlers, error_response
from imganom.serve.metrics import Metrics
from imganom.serve.schemas import INSPECT_BODY_DOC, InspectResponse, ModelInfo, Status, error_doc
from imganom.serve.service import ServeSettings, Service

__all__ = ["ServeSettings", "create_app"]


class RequestMetrics:
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
            self.metrics.count_request(status[0], time.perf_counter() - t0)


class BearerAuth:
    """ASGI middleware: every path but ``open_paths`` needs ``Authorization: Bearer <token>`` (else 401)."""

    def __init__(self, app: Any, token: str, open_paths: tuple[str, ...] = ("/healthz", "/readyz")):
        self.app, self.token, self.open_paths = app, token.encode(), open_paths

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.token):
            return await self.app(scope, receive, send)
        message = "missing or wrong bearer token: send 'Authorization: Bearer <token>'"
        headers = {"WWW-Authenticate": 'Bearer realm="imganom"'}
        await error_response(401, "unauthorized", message, headers)(scope, receive, send)


def create_app(insp: Inspector, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``insp``; the batcher and thread pools live for the app's lifespan."""
    settings = settings or ServeSettings()
    svc = Service(insp, settings)

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
        docs_url="/docs" if settings.docs else None,
        redoc_url="/redoc" if settings.docs else None,
        openapi_url="/openapi.json" if settings.docs else None,
    )
    app.state.service = svc
    add_error_handlers(app)

    @app.post(
        "/v1/inspect",
        response_model=InspectResponse,
        response_model_exclude_none=True,
        responses=error_doc(400, 401, 408, 413, 415, 422, 500, 503, 504),
        openapi_extra=INSPECT_BODY_DOC,
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
        "/v1/model",
        response_model=ModelInfo,
        responses=error_doc(401),
        summary="The served model: config, thresholds, calibration (no file paths)",
    )
    async def model_info() -> ModelInfo:
        return svc.model_info()

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics (text format 0.0.4)")
    async def metrics() -> PlainTextResponse:
        depth = svc.batcher.queue.qsize() if svc.batcher is not None else 0
        text = svc.metrics.render(depth, svc.inflight, svc.ready)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    if settings.token is not None:
        app.add_middleware(BearerAuth, token=settings.token)
    app.add_middleware(RequestMetrics, metrics=svc.metrics)  # outermost: refused requests count too
    return app
