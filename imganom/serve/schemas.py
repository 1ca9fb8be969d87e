"""The service's JSON shapes (pydantic): responses, errors and the OpenAPI description of the upload."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from imganom.serve.uploads import RAW_CONTENT_TYPES


class RegionOut(BaseModel):
    id: int
    bbox: list[int] = Field(description="x0, y0, x1, y1 in original pixels (x1/y1 exclusive)")
    area: int
    area_pct: float
    centroid: list[float]
    peak: float
    mean: float
    confidence: float | None = Field(
        None, description="fraction of Monte-Carlo samples in which the region exceeds the pixel threshold"
    )


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
    verdict: Literal["OK", "NG", "review"] = Field(
        description="'review' (opt-in: uncertainty.review_below) when confidence is low near the threshold"
    )
    is_anomalous: bool = Field(description="the thresholded call (score > threshold), also under 'review'")
    confidence: float | None = Field(
        None, description="confidence in the verdict in [0, 1] (Monte-Carlo uncertainty; None when off)"
    )
    explanation: dict | None = Field(
        None, description="ELBO = recon_term + kl_term, score rule, top regions' share of the anomaly mass"
    )
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
    backend: dict[str, Any] | None = Field(
        None, description="torch | onnxruntime | openvino, threads, precision; what --backend auto measured"
    )


def error_doc(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries: these statuses carry an ``ErrorResponse``."""
    return {c: {"model": ErrorResponse} for c in codes}


INSPECT_BODY_DOC = {
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
