"""Per-image output files: masks, heatmaps, overlays, previews and raw maps (the results table is in
``reporting.results``).

Everything is written atomically (temp file in the target folder, then ``os.replace``) so a killed
``imganom inspect`` never leaves half-written images behind.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from imganom.data.readers import IMAGE_EXTENSIONS
from imganom.utils.files import atomic_write_bytes

_CMAPS = {
    "inferno": cv2.COLORMAP_INFERNO,
    "jet": cv2.COLORMAP_JET,
    "turbo": cv2.COLORMAP_TURBO,
    "viridis": cv2.COLORMAP_VIRIDIS,
    "magma": cv2.COLORMAP_MAGMA,
    "hot": cv2.COLORMAP_HOT,
}
# OpenCV text drawing is not thread-safe here (opencv 5.0): two writer threads in cv2.getTextSize crashed the
# process (SIGSEGV, seen in tests/unit/workflows/test_inspect.py), so text is drawn under a lock.
_TEXT_LOCK = threading.Lock()
_UNSAFE = re.compile('[\x00-\x1f\x7f<>:"|?*\\\\#\ud800-\udfff]')
_SLICE = re.compile(r"#slice=(\d+)$")
_COPY = re.compile(r"~(\d+)$")
_EXTS = sorted(IMAGE_EXTENSIONS, key=len, reverse=True)
_MAX_PART = 180  # bytes of one sanitised name component (file systems allow 255)


def _clean_part(part: str) -> str:
    """One path component made safe: unsafe characters -> '_', '', '.', '..' -> '_', '__', long -> cut."""
    if part in ("", ".", ".."):
        return "_" * max(1, len(part))
    part = _UNSAFE.sub("_", part)
    if len(part.encode("utf-8", "replace")) > _MAX_PART:
        part = part.encode("utf-8", "replace")[:_MAX_PART].decode("utf-8", "ignore")
    return part


def output_stem(item_id: str) -> str:
    """Relative posix path (no extension) of an item's outputs; distinct ids never share one.

    Folders and the file name are kept and the image extension's dots become '_', so ``x/a.png`` and
    ``x/a.tif`` differ: ``sub/a.png -> sub/a_png``, ``a.b.png -> a.b_png``, ``a_b.png -> a_b_png``; the
    watcher's ``~N`` and a volume's ``#slice=NNNN`` follow (``b.nii.gz#slice=0003 -> b_nii_gz_slice0003``).
    This is one-to-one. Where it cannot be (a character unsafe in file names or URLs such as ``<>:"|?*\\#``,
    a control character, an empty/``.``/``..``/absolute component, a name without an image extension or
    longer than 180 bytes), the unsafe parts become '_' and ``~h`` + 8 hex digits of the id's SHA-256 are
    appended (``x<.png -> x__png~h2d8249b7``), so such names neither collide nor escape the output folder.
    """
    *folders, name = item_id.split("/")
    m = _SLICE.search(name)
    sliced, name = (m.group(1), name[: m.start()]) if m else (None, name)
    m = _COPY.search(name)
    copy, name = (m.group(1), name[: m.start()]) if m else (None, name)
    n = next((len(e) for e in _EXTS if name.lower().endswith(e) and len(name) > len(e)), 0)
    base, ext = name[: len(name) - n], name[len(name) - n :]
    parts = [*folders, base]
    stem = "/".join(_clean_part(p) for p in parts) + ext.replace(".", "_")
    stem += (f"~{copy}" if copy else "") + (f"_slice{sliced}" if sliced else "")
    if not ext or any(_clean_part(p) != p for p in parts):
        digest = hashlib.sha256(item_id.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        stem += f"~h{digest}"
    return stem


def _to_bgr(img: np.ndarray) -> np.ndarray:
    """HxW stays, HxWx1 is squeezed, HxWx3 RGB becomes BGR for OpenCV."""
    if img.ndim == 3 and img.shape[2] == 1:
        return img[:, :, 0]
    if img.ndim == 3 and img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    if img.ndim == 2:
        return img
    raise ValueError(f"expected an HxW or HxWx3 image, got shape {img.shape}")


def encode_png(img: np.ndarray) -> bytes:
    """PNG bytes of a uint8 HxW / HxWx3 RGB image or a uint16 HxW image."""
    if img.dtype == np.uint16 and img.ndim != 2:
        raise ValueError("uint16 PNGs must be single-channel HxW")
    if img.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"encode_png needs uint8 or uint16, got {img.dtype}")
    ok, buf = cv2.imencode(".png", _to_bgr(np.ascontiguousarray(img)))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def encode_jpeg(img: np.ndarray, quality: int = 85) -> bytes:
    """JPEG bytes of a uint8 HxW / HxWx3 RGB image."""
    if img.dtype != np.uint8:
        raise ValueError(f"encode_jpeg needs uint8, got {img.dtype}")
    q = int(min(max(quality, 1), 100))
    ok, buf = cv2.imencode(".jpg", _to_bgr(np.ascontiguousarray(img)), [cv2.IMWRITE_JPEG_QUALITY, q])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def _levels(amap: np.ndarray, vmin: float, vmax: float, cmap: str) -> np.ndarray:
    """The colour index (uint8) of every pixel of a float map: [vmin, vmax] -> 0..255, NaN -> 0."""
    if cmap not in _CMAPS:
        raise ValueError(f"unknown colormap {cmap!r}; choose from {sorted(_CMAPS)}")
    span = max(float(vmax) - float(vmin), 1e-12)
    norm = np.nan_to_num((np.asarray(amap, dtype=np.float32) - vmin) / span, nan=0.0, posinf=1.0, neginf=0.0)
    return np.rint(np.clip(norm, 0.0, 1.0) * 255.0).astype(np.uint8)


def colormap_palette(cmap: str = "inferno") -> np.ndarray:
    """(256, 3) uint8 RGB: the colour of each level of ``cmap``."""
    return cv2.cvtColor(cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], _CMAPS[cmap]),
                        cv2.COLOR_BGR2RGB)[:, 0]  # fmt: skip


def colorize(amap: np.ndarray, vmin: float, vmax: float, cmap: str = "inferno") -> np.ndarray:
    """HxWx3 uint8 RGB rendering of a float map, clipped to [vmin, vmax] (NaN shows as vmin)."""
    return cv2.cvtColor(cv2.applyColorMap(_levels(amap, vmin, vmax, cmap), _CMAPS[cmap]), cv2.COLOR_BGR2RGB)


def heatmap_png(amap: np.ndarray, vmin: float, vmax: float, cmap: str = "inferno") -> bytes:
    """``colorize`` as an indexed-colour PNG: the same RGB pixels once decoded, a third of the bytes to
    compress (about 3x faster to write, and smaller)."""
    from PIL import Image

    levels = _levels(amap, vmin, vmax, cmap)
    im = Image.fromarray(levels, "L")
    im.putpalette(colormap_palette(cmap).tobytes(), "RGB")  # mode P: the levels index the palette
    buf = io.BytesIO()
    im.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def _as_rgb(img: np.ndarray) -> np.ndarray:
    if img.dtype != np.uint8:
        raise ValueError(f"preview must be uint8, got {img.dtype}")
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.ndim == 3 and img.shape[2] == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2RGB)
    if img.ndim == 3 and img.shape[2] == 3:
        return img
    raise ValueError(f"preview must be HxW or HxWx3, got shape {img.shape}")


def _fit(arr: np.ndarray, shape: tuple[int, int], *, binary: bool = False) -> np.ndarray:
    """Resize a map/mask to (H, W); binary masks keep every region visible when shrinking (area > 0)."""
    if arr.shape[:2] == shape:
        return arr.astype(bool) if binary else arr.astype(np.float32, copy=False)
    resized = cv2.resize(arr.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
    return resized > 0 if binary else resized


def _score_text(score: float | None) -> str:
    return "n/a" if score is None or not math.isfinite(score) else f"{score:.3g}"


def render_overlay(
    preview: np.ndarray,
    amap: np.ndarray,
    mask: np.ndarray,
    *,
    threshold: float,
    vmax: float,
    score: float,
    verdict: str,
    alpha: float = 0.45,
) -> np.ndarray:
    """Original image with the anomaly map blended in, region outlines and a "NG 0.87" label (RGB uint8).

    The map is only blended where it exceeds half the pixel threshold (ramping to full ``alpha`` at the
    threshold) so OK images stay readable. ``amap``/``mask`` are resized to the preview if needed, so
    the overlay can be rendered directly at thumbnail size. Line widths and text scale with the image.
    """
    base = _as_rgb(preview)
    h, w = base.shape[:2]
    amap = _fit(np.asarray(amap), (h, w))
    mask = _fit(np.asarray(mask), (h, w), binary=True)

    lo = 0.5 * float(threshold)
    ramp = max(float(threshold) - lo, 1e-12)
    out = base.copy()
    hot = np.nan_to_num(amap) > lo
    rows, cols = np.flatnonzero(hot.any(1)), np.flatnonzero(hot.any(0))
    if rows.size and cols.size:  # blend inside the box around the hot pixels only (weight 0 elsewhere)
        box = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        a = amap[box]
        with np.errstate(over="ignore"):  # +-inf pixels: clipped to 0 or 1 below
            weight = alpha * np.clip((np.nan_to_num(a) - lo) / ramp, 0.0, 1.0)[..., None]
        colour = colorize(a, lo, max(float(vmax), lo + 1e-6)).astype(np.float32)
        out[box] = np.rint(base[box] * (1.0 - weight) + colour * weight).astype(np.uint8)

    ng = verdict == "NG"
    short = min(h, w)
    thick = max(1, round(short / 250))
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if contours:
        cv2.drawContours(out, contours, -1, (0, 0, 0), thick + 2, cv2.LINE_AA)  # dark halo for contrast
        cv2.drawContours(out, contours, -1, (255, 40, 40) if ng else (60, 230, 90), thick, cv2.LINE_AA)

    # Label in the top-left corner, about 7% of the short side tall but never wider than the image.
    label = f"{verdict or 'ERR'} {_score_text(score)}"
    font = cv2.FONT_HERSHEY_SIMPLEX
    with _TEXT_LOCK:
        (tw1, th1), _ = cv2.getTextSize(label, font, 1.0, 2)
        scale = min(max(8.0, 0.07 * short) / th1, 0.85 * w / tw1)
        tthick = max(1, round(scale * 1.8))
        (tw, th), base_line = cv2.getTextSize(label, font, scale, tthick)
        pad = max(2, round(th * 0.3))
        colour_box = (200, 30, 30) if ng else (25, 125, 55) if verdict == "OK" else (90, 90, 90)
        x2, y2 = min(w - 1, tw + 2 * pad), min(h - 1, th + base_line + 2 * pad)
        cv2.rectangle(out, (0, 0), (x2, y2), colour_box, thickness=-1)
        cv2.putText(out, label, (pad, pad + th), font, scale, (255, 255, 255), tthick, cv2.LINE_AA)
    return out


def heatmap_vmax(image_threshold: float | None, score: float) -> float:
    """Top of a result's heatmap colour scale: twice the image threshold (so the threshold sits mid-scale
    and images of one model compare at a glance), or the image's own score while uncalibrated."""
    if image_threshold is not None and image_threshold > 0:
        return 2.0 * float(image_threshold)
    return max(float(score), 1e-6)


def _downscale(img: np.ndarray, max_side: int) -> np.ndarray:
    h, w = img.shape[:2]
    if max_side <= 0 or max(h, w) <= max_side:
        return img
    f = max_side / max(h, w)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


OVERLAYS = ("all", "ng", "none")


@dataclass
class OutputOptions:
    """Which per-image files ``write_item_outputs`` produces.

    ``raw_maps``: None, ``'npy'`` (float16 array) or ``'png16'`` (uint16 PNG, pixel = map / vmax * 65535,
    saturating at vmax; decode with ``png / 65535 * vmax``, so the caller must record vmax).
    ``max_preview_side`` bounds previews and overlays (report thumbnails); masks and heatmaps keep the
    original size. ``overlays``: ``"ng"`` (default: every image but the OK ones, whose overlay shows no
    region; rendering and compressing it was a quarter of the CPU time of writing outputs), ``"all"`` or
    ``"none"`` (True / False mean "all" / "none").
    """

    masks: bool = True
    heatmaps: bool = True
    overlays: str | bool = "ng"
    previews: bool = True
    raw_maps: str | None = None
    max_preview_side: int = 512
    explain: bool = False  # reconstruction + residual PNGs for the images that get an overlay

    def __post_init__(self) -> None:
        if self.raw_maps not in (None, "npy", "png16"):
            raise ValueError(f"raw_maps must be None, 'npy' or 'png16', got {self.raw_maps!r}")
        if isinstance(self.overlays, bool):
            self.overlays = "all" if self.overlays else "none"
        if self.overlays not in OVERLAYS:
            raise ValueError(f"overlays must be one of {', '.join(OVERLAYS)}, got {self.overlays!r}")

    def overlay_for(self, verdict: str | None) -> bool:
        """Whether an image with this verdict gets an overlay."""
        return self.overlays == "all" or (self.overlays == "ng" and verdict != "OK")


def write_item_outputs(
    out_dir: Path,
    item_id: str,
    preview: np.ndarray,
    amap: np.ndarray,
    mask: np.ndarray,
    *,
    threshold: float,
    vmax: float,
    score: float,
    verdict: str,
    options: OutputOptions,
) -> dict[str, str]:
    """Write the enabled outputs of one item atomically; returns ``{kind: relative posix path}``.

    Layout: ``masks/<stem>.png`` (0/255), ``heatmaps/<stem>.png`` (map coloured over [0, vmax]),
    ``overlays/<stem>.png``, ``previews/<stem>.jpg`` and ``raw/<stem>.npy|.png``, with
    ``stem = output_stem(item_id)``.
    """
    out_dir = Path(out_dir)
    stem = output_stem(item_id)
    amap = np.asarray(amap, dtype=np.float32)
    written: dict[str, str] = {}

    def put(kind: str, rel: str, data: bytes) -> None:
        atomic_write_bytes(out_dir / rel, data)
        written[kind] = rel

    if options.masks:
        put("mask", f"masks/{stem}.png", encode_png(np.where(np.asarray(mask) > 0, 255, 0).astype(np.uint8)))
    if options.heatmaps:
        put("heatmap", f"heatmaps/{stem}.png", heatmap_png(amap, 0.0, vmax))
    overlay = options.overlay_for(verdict)
    if overlay or options.previews:
        small = _downscale(_as_rgb(preview), options.max_preview_side)
        if overlay:
            ov = render_overlay(
                small, amap, mask, threshold=threshold, vmax=vmax, score=score, verdict=verdict
            )
            put("overlay", f"overlays/{stem}.png", encode_png(ov))
        if options.previews:
            put("preview", f"previews/{stem}.jpg", encode_jpeg(small))
    if options.raw_maps == "npy":
        buf = io.BytesIO()
        np.save(buf, amap.astype(np.float16))
        put("raw_map", f"raw/{stem}.npy", buf.getvalue())
    elif options.raw_maps == "png16":
        scaled = np.clip(np.nan_to_num(amap) / max(float(vmax), 1e-12), 0.0, 1.0) * 65535.0
        put("raw_map", f"raw/{stem}.png", encode_png(np.rint(scaled).astype(np.uint16)))
    return written


def write_trust_outputs(
    out_dir: Path,
    item_id: str,
    uncertainty_map: np.ndarray | None = None,
    preview: np.ndarray | None = None,
    recon: np.ndarray | None = None,
) -> dict[str, str]:
    """The uncertainty map (``uncertainty/<stem>.png``: the reconstruction's per-pixel spread coloured over
    [0, its max]) and, given the input ``preview`` and its reconstruction ``recon`` (uint8 previews of one
    size), ``explain/<stem>_recon.png`` and ``explain/<stem>_residual.png`` (|input - recon|, channel mean,
    coloured over [0, its 99.9th percentile]). Returns ``{kind: relative posix path}``."""
    out_dir, stem, written = Path(out_dir), output_stem(item_id), {}

    def put(kind: str, rel: str, data: bytes) -> None:
        atomic_write_bytes(out_dir / rel, data)
        written[kind] = rel

    if uncertainty_map is not None:
        u = np.asarray(uncertainty_map, np.float32)
        put("uncertainty", f"uncertainty/{stem}.png", heatmap_png(u, 0.0, max(float(u.max()), 1e-6)))
    if preview is not None and recon is not None:
        rec = _as_rgb(recon)
        put("reconstruction", f"explain/{stem}_recon.png", encode_png(rec))
        res = np.abs(_as_rgb(preview).astype(np.float32) - rec.astype(np.float32)).mean(-1) / 255.0
        put("residual", f"explain/{stem}_residual.png",
            heatmap_png(res, 0.0, max(float(np.percentile(res, 99.9)), 1e-3)))  # fmt: skip
    return written
