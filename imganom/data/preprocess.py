"""Geometry between an original image and the model's input: stretch, letterbox or tiles, and back.

Inference-side and dependency-light (numpy, cv2, torch). Tiling is a small overlap-and-blend of our own
rather than MONAI's sliding window so that inspection runs without the training extras.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from imganom.config import PreprocessConfig


@dataclass(frozen=True)
class Geometry:
    """How a model-sized view relates to the original (H, W) image."""

    original: tuple[int, int]
    mode: str  # 'stretch' | 'letterbox' | 'tile'
    inner: tuple[int, int, int, int] = (0, 0, 0, 0)  # letterbox: y0, x0, h, w of the image inside the canvas
    tiles: tuple[tuple[int, int], ...] = ()  # tile: top-left (y, x) of each tile in the (padded) original
    padded: tuple[int, int] = (0, 0)  # tile: image size after padding up to a whole tile


def _resize_chw(chw: np.ndarray, h: int, w: int) -> np.ndarray:
    """Area-resample when shrinking, linear when enlarging; channels handled in chunks of <= 4 for cv2."""
    if chw.shape[1:] == (h, w):
        return chw
    interp = cv2.INTER_AREA if h * w < chw.shape[1] * chw.shape[2] else cv2.INTER_LINEAR
    out = [cv2.resize(np.ascontiguousarray(c), (w, h), interpolation=interp) for c in chw]
    return np.stack(out).astype(np.float32, copy=False)


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets covering [0, length) with tiles of ``tile`` and at least ``overlap`` fraction overlap."""
    if length <= tile:
        return [0]
    stride = max(1, int(tile * (1.0 - overlap)))
    n = int(np.ceil((length - tile) / stride)) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def prepare(chw: np.ndarray, cfg: PreprocessConfig) -> tuple[np.ndarray, Geometry]:
    """Original float32 CHW in [0,1] -> model views (N, C, h, w) and the geometry to map results back."""
    h, w = cfg.size
    H, W = chw.shape[1:]
    mode = cfg.resize
    if mode == "tile" and (H < h or W < w):
        mode = "stretch"  # smaller than one tile: nothing to tile
    if mode == "stretch":
        return _resize_chw(chw, h, w)[None], Geometry((H, W), "stretch")
    if mode == "letterbox":
        s = min(h / H, w / W)
        ih, iw = max(1, round(H * s)), max(1, round(W * s))
        y0, x0 = (h - ih) // 2, (w - iw) // 2
        inner = _resize_chw(chw, ih, iw)
        # replicate edges into the padding so the border does not look like a defect
        canvas = np.pad(inner, ((0, 0), (y0, h - ih - y0), (x0, w - iw - x0)), mode="edge")
        return canvas[None], Geometry((H, W), "letterbox", inner=(y0, x0, ih, iw))
    ys, xs = tile_starts(H, h, cfg.tile_overlap), tile_starts(W, w, cfg.tile_overlap)
    starts = tuple((y, x) for y in ys for x in xs)
    views = np.stack([chw[:, y : y + h, x : x + w] for y, x in starts])
    return views, Geometry((H, W), "tile", tiles=starts, padded=(H, W))


def _blend_window(h: int, w: int, device) -> torch.Tensor:
    """Weights that fall off towards tile borders so overlapping tiles blend without seams."""
    wy = torch.hann_window(h + 2, periodic=False, device=device)[1:-1]
    wx = torch.hann_window(w + 2, periodic=False, device=device)[1:-1]
    return (wy[:, None] * wx[None, :]).clamp_min(1e-3)


def to_original(maps: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """Model-resolution maps (N, h, w) for one image -> (H, W) float32 map at original resolution."""
    H, W = geom.original
    maps = maps.float()
    if geom.mode == "tile":
        h, w = maps.shape[-2:]
        acc = torch.zeros(H, W, device=maps.device)
        norm = torch.zeros(H, W, device=maps.device)
        win = _blend_window(h, w, maps.device)
        for m, (y, x) in zip(maps, geom.tiles):
            acc[y : y + h, x : x + w] += m * win
            norm[y : y + h, x : x + w] += win
        return acc / norm
    m = maps[0]
    if geom.mode == "letterbox":
        y0, x0, ih, iw = geom.inner
        m = m[y0 : y0 + ih, x0 : x0 + iw]
    if tuple(m.shape) == (H, W):
        return m
    return F.interpolate(m[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]
