"""Client errors: ``ApiError``, the ``{"error": {code, message}}`` body, statuses for reader errors."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from imganom.data.readers import ImageReadError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error the client caused (or a limit it hit); rendered as ``{"error": {code, message}}``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The JSON error body every non-2xx response carries."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def busy(message: str) -> ApiError:
    """503 with ``Retry-After: 1``: the client should simply try again."""
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


def add_error_handlers(app: FastAPI) -> None:
    """Render ApiError, validation errors, 404/405 and unexpected exceptions as the JSON error body."""

    @app.exception_handler(ApiError)
    async def _api_error(_r: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.code, e.message, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_r: Request, e: RequestValidationError) -> JSONResponse:
        msg = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        return error_response(422, "invalid_request", msg or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_r: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, f"http_{e.status_code}")
        return error_response(e.status_code, code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_r: Request, e: Exception) -> JSONResponse:
        log.error("internal error", exc_info=e)
        return error_response(500, "internal", f"internal server error: {type(e).__name__}")
