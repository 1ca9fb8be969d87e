"""Request bodies: read with a hard size cap, then the image bytes from a multipart field or a raw body."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import PurePath

from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from imganom.serve.errors import ApiError

# Raw-body Content-Types and the file extension handed to the reader (format sniffing still decides).
RAW_CONTENT_TYPES: dict[str, str] = {
    "image/png": ".png", "image/jpeg": ".jpg", "image/tiff": ".tif", "image/bmp": ".bmp",
    "application/dicom": ".dcm", "application/octet-stream": "",
}  # fmt: skip


async def read_body(request: Request, limit: int, take: Callable[[int], None] | None = None) -> bytes:
    """The whole request body, refusing (413) a declared Content-Length or an actual stream over ``limit``.

    ``take(n)`` is called before ``n`` more bytes are kept (a memory budget; it may raise to refuse).
    """
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
            if take is not None:
                take(len(chunk))
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "client disconnected while sending the body") from None
    return b"".join(chunks)


def media_type(value: str | None) -> str:
    """``image/png; q=1`` -> ``image/png`` (lower case; empty for no header)."""
    return (value or "").split(";", 1)[0].strip().lower()


async def extract_image(request: Request, body: bytes) -> tuple[bytes, str]:
    """(image bytes, name for the reader) from a multipart field ``file`` or a raw image body."""
    ctype = media_type(request.headers.get("content-type"))
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


def boundary_of(content_type: str | None) -> bytes | None:
    """The ``boundary`` parameter of a multipart Content-Type (quotes removed), None if absent."""
    for param in (content_type or "").split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "boundary" and value.strip().strip('"'):
            return value.strip().strip('"').encode("latin-1", "replace")
    return None


async def _from_multipart(request: Request, body: bytes) -> tuple[bytes, str]:
    boundary = boundary_of(request.headers.get("content-type"))
    if boundary is None:
        raise ApiError(400, "bad_multipart", "multipart Content-Type without a boundary parameter")
    if body.rfind(b"--" + boundary + b"--") < 0:  # a part cut short reads as "no such field" otherwise
        raise ApiError(
            400,
            "bad_multipart",
            "multipart body is truncated or malformed: its closing boundary "
            f"'--{boundary.decode('latin-1')}--' is missing",
        )

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
        ctype = media_type(part.content_type)
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
