"""Image I/O: any supported file becomes a float32 CHW array in [0, 1] plus an ``ImageMeta``.

Formats are detected by magic bytes first and by extension second: PNG/JPEG/BMP (Pillow; 16-bit PNG via
OpenCV so all 16 bits survive), TIFF (tifffile), DICOM (pydicom) and NIfTI (nibabel, ``.nii``/``.nii.gz``).
3-D NIfTI volumes and multi-frame DICOM are read as 2-D slices (``slice_index`` / ``iter_items``).
Every failure is an ``ImageReadError`` naming the file and the reason; library exceptions never escape.

Pixels are returned as stored: no EXIF rotation, no NIfTI reorientation (array axes 0, 1 = H, W; the
affine is ignored). Not supported: compressed DICOM other than RLE unless pydicom has a decoder plugin
(pylibjpeg, GDCM), DICOM VOI LUT sequences and per-frame functional-group rescale, TIFF codecs that need
``imagecodecs`` when it is absent, TIFF stacks of more than 16 pages, NIfTI RGB datatypes and 4-D series
with more than 16 volumes.
"""

from __future__ import annotations

import gzip
import io
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import tifffile
from PIL import Image

from imganom.config import IntensityConfig, PreprocessConfig

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom", ".nii", ".nii.gz",
)
_EXT_FORMAT = {
    ".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".bmp": "bmp", ".tif": "tiff", ".tiff": "tiff",
    ".dcm": "dicom", ".dicom": "dicom", ".nii": "nifti", ".nii.gz": "nifti",
}
_LABEL = {"png": "PNG", "jpeg": "JPEG", "bmp": "BMP", "tiff": "TIFF", "dicom": "DICOM", "nifti": "NIfTI"}
_HEAD_BYTES = 512
_MAX_PLANES = 16  # a TIFF page stack / NIfTI 4th axis up to this length is read as channels
_PERCENTILE_SAMPLE = 1 << 24  # percentiles of larger images use an evenly strided sample of this size
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601
_SLICE_RE = re.compile(r"^(.*)#slice=(\d+)$", re.DOTALL)


class ImageReadError(ValueError):
    """An image could not be read; ``str(e)`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self):  # keep it picklable across worker processes
        return type(self), (self.path, self.reason)


@dataclass
class ImageMeta:
    """What was read: source, stored geometry and dtype, before any normalisation or channel conversion."""

    path: str  # source path, or the name given for bytes input
    original_size: tuple[int, int]  # (H, W) as stored
    dtype: str  # stored dtype, e.g. 'uint8', 'uint16', 'float32', 'int16'
    channels: int  # channels as decoded (palette/CMYK expanded, alpha included)
    format: str  # 'png', 'jpeg', 'bmp', 'tiff', 'dicom', 'nifti'
    slice: int | None = None  # slice index within a 3-D volume / multi-frame file


@dataclass
class _Source:
    name: str
    path: Path | None = None
    data: bytes | None = None

    def open(self) -> BinaryIO:
        return open(self.path, "rb") if self.path is not None else io.BytesIO(self.data)


@dataclass
class _Decoded:
    """A parsed header; ``read(k)`` decodes slice ``k`` into (H x W x C raw pixels, stored dtype name)."""

    fmt: str
    size: tuple[int, int]
    n_slices: int
    read: Callable[[int], tuple[np.ndarray, str]]
    has_alpha: bool = False
    invert: bool = False  # DICOM MONOCHROME1
    dtype_window: tuple[float, float] | None = None  # DICOM VOI window / BitsStored range, mode 'dtype' only


# ----------------------------------------------------------------------------------------------- public API


def read_image(
    path: str | Path,
    *,
    intensity: IntensityConfig | None = None,
    channels: int | None = None,
    channel_policy: str = "convert",
    max_pixels: int = 200_000_000,
    slice_index: int | None = None,
) -> tuple[np.ndarray, ImageMeta]:
    """Read one image (or one slice of a volume) as float32 CHW in [0, 1], C-contiguous.

    ``channels=None`` keeps the stored channels; otherwise ``channel_policy='convert'`` replicates gray to 3,
    reduces RGB to gray by BT.601 luminance and drops alpha, and ``'strict'`` refuses any mismatch.
    Volumes need ``slice_index``; ``max_pixels`` bounds H*W and is checked before pixel data is decoded.
    """
    return _read(_file_source(path), intensity, channels, channel_policy, max_pixels, slice_index)


def read_options(pp: PreprocessConfig) -> dict[str, Any]:
    """The ``read_image``/``read_image_bytes`` keywords a model's preprocessing asks for (one place)."""
    return dict(
        intensity=pp.intensity,
        channels=pp.channels,
        channel_policy=pp.channel_policy,
        max_pixels=pp.max_pixels,
    )


def read_image_bytes(
    data: bytes,
    name: str = "<upload>",
    *,
    intensity: IntensityConfig | None = None,
    channels: int | None = None,
    channel_policy: str = "convert",
    max_pixels: int = 200_000_000,
    slice_index: int | None = None,
) -> tuple[np.ndarray, ImageMeta]:
    """``read_image`` for in-memory data (uploads); ``name`` gives the extension and the error label."""
    if not data:
        raise ImageReadError(name, "empty data (0 bytes)")
    src = _Source(name, data=bytes(data))
    return _read(src, intensity, channels, channel_policy, max_pixels, slice_index)


def count_slices(path: str | Path) -> int:
    """Number of 2-D items in a file: 1 for images, the depth of a 3-D NIfTI, the frames of a DICOM."""
    with _decoded(_file_source(path), None) as dec:
        return dec.n_slices


def iter_items(
    path: str | Path,
    *,
    intensity: IntensityConfig | None = None,
    channels: int | None = None,
    channel_policy: str = "convert",
    max_pixels: int = 200_000_000,
    slice_index: int | None = None,
) -> Iterator[tuple[str, np.ndarray, ImageMeta]]:
    """Yield ``(id_suffix, chw, meta)`` per 2-D item: suffix ``""`` for images, ``"#slice=0007"`` per slice.

    The file stays open while iterating; errors surface as ``ImageReadError`` on the first ``next()``.
    """
    _check_policy(channel_policy)
    src = _file_source(path)
    with _decoded(src, max_pixels) as dec:
        ks = range(dec.n_slices) if slice_index is None else [_resolve_slice(src.name, dec, slice_index)]
        for k in ks:
            arr, meta = _read_slice(src.name, dec, k, intensity, channels, channel_policy)
            yield (f"#slice={k:04d}" if dec.n_slices > 1 else ""), arr, meta


def split_item_id(item: str) -> tuple[str, int | None]:
    """``"a/b.nii.gz#slice=0003"`` -> ``("a/b.nii.gz", 3)``; ids without a suffix -> ``(item, None)``."""
    m = _SLICE_RE.match(item)
    return (m.group(1), int(m.group(2))) if m else (item, None)


def normalize_intensity(arr: np.ndarray, cfg: IntensityConfig, dtype: np.dtype) -> np.ndarray:
    """Map raw pixel values to float32 in [0, 1] according to ``cfg.mode``.

    'dtype': unsigned ints / dtype max, floats kept if already in [0, 1] else min-max, signed ints min-max.
    'percentile': window [p_low, p_high] computed per image over all channels together (keeps the colour
    balance). 'fixed': window [low, high] in raw units. Flat images give zeros. ``dtype`` selects the 'dtype'
    rule (pass the stored dtype); NaN/Inf values raise ``ValueError``.
    """
    dt = np.dtype(dtype)
    if arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    if arr.dtype.kind not in "uif":
        raise ValueError(f"unsupported pixel dtype {arr.dtype}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError("contains NaN/Inf pixel values")
    if cfg.mode == "fixed":
        return _window(arr, cfg.low, cfg.high)
    if cfg.mode == "percentile":
        flat = arr.reshape(-1)
        if flat.size > _PERCENTILE_SAMPLE:
            flat = flat[:: -(-flat.size // _PERCENTILE_SAMPLE)]
        lo, hi = np.percentile(flat, [cfg.low, cfg.high])
        return _window(arr, float(lo), float(hi))
    if dt.kind == "b":
        return arr.astype(np.float32)
    if dt.kind == "u":
        return _window(arr, 0.0, float(np.iinfo(dt).max))
    lo, hi = float(arr.min()), float(arr.max())
    if dt.kind == "f" and lo >= 0.0 and hi <= 1.0:
        return arr.astype(np.float32)
    return _window(arr, lo, hi)


def to_uint8_preview(chw: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB for overlays: 1-2 channels show the first as gray, 3+ channels show the first three."""
    a = np.asarray(chw, dtype=np.float32)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[0] == 0:
        raise ValueError(f"expected a CHW or HW array, got shape {a.shape}")
    a = a[:3] if a.shape[0] >= 3 else np.repeat(a[:1], 3, axis=0)
    a = np.clip(np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    return np.ascontiguousarray((a * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 0))


# ------------------------------------------------------------------------------------------ read pipeline


def _read(src: _Source, intensity, channels, channel_policy, max_pixels, slice_index):
    _check_policy(channel_policy)
    with _decoded(src, max_pixels) as dec:
        k = _resolve_slice(src.name, dec, slice_index)
        return _read_slice(src.name, dec, k, intensity, channels, channel_policy)


def _check_policy(channel_policy: str) -> None:
    if channel_policy not in ("convert", "strict"):
        raise ValueError(f"channel_policy must be 'convert' or 'strict', got {channel_policy!r}")


@contextmanager
def _wrapped(name: str, prefix: str) -> Iterator[None]:
    """Turn any library exception into an ImageReadError that keeps the original message."""
    try:
        yield
    except ImageReadError:
        raise
    except Exception as e:
        raise ImageReadError(name, f"{prefix}: {type(e).__name__}: {e}") from e


def _file_source(path: str | Path) -> _Source:
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except OSError as e:
        raise ImageReadError(path, f"cannot access file: {e}") from None
    if p.is_dir():
        raise ImageReadError(path, "is a directory, expected an image file")
    if not p.is_file():
        raise ImageReadError(path, "not a regular file")
    if st.st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    return _Source(str(path), path=p)


@contextmanager
def _decoded(src: _Source, max_pixels: int | None) -> Iterator[_Decoded]:
    """Open the source, detect the format, parse the header and enforce the pixel budget."""
    with _wrapped(src.name, "cannot open file"):
        fh = src.open()
    with fh:
        with _wrapped(src.name, "cannot read image"):
            head = fh.read(_HEAD_BYTES)
            fh.seek(0)
            fmt = _detect(src.name, head)
        with _wrapped(src.name, f"cannot decode {_LABEL[fmt]} image"):
            dec = _decode(fh, src.name, head, fmt)
        h, w = dec.size
        if h <= 0 or w <= 0:
            raise ImageReadError(src.name, f"zero-size image ({h}x{w})")
        if max_pixels is not None and h * w > max_pixels:
            raise ImageReadError(
                src.name,
                f"too many pixels: {h}x{w} = {h * w} > max_pixels={max_pixels} (decompression-bomb guard)",
            )
        yield dec


def _resolve_slice(name: str, dec: _Decoded, slice_index: int | None) -> int:
    n = dec.n_slices
    if slice_index is None:
        if n > 1:
            raise ImageReadError(
                name, f"is a volume with {n} slices; pass slice_index (0..{n - 1}) or use iter_items()"
            )
        return 0
    if not 0 <= slice_index < n:
        raise ImageReadError(name, f"slice_index {slice_index} out of range (file has {n} slice(s))")
    return slice_index


def _read_slice(name, dec: _Decoded, k, intensity, channels, channel_policy) -> tuple[np.ndarray, ImageMeta]:
    with _wrapped(name, f"cannot decode {_LABEL[dec.fmt]} image"):
        raw, stored = dec.read(k)
        h, w, c = raw.shape
        if h == 0 or w == 0:
            raise ImageReadError(name, f"zero-size image ({h}x{w})")
        if raw.dtype.kind == "f" and not np.isfinite(raw).all():
            raise ImageReadError(name, "contains NaN/Inf pixel values")
        keep, op = _channel_plan(name, c, dec.has_alpha, channels, channel_policy)
        raw = raw[..., :keep]
        cfg = intensity or IntensityConfig()
        if cfg.mode == "dtype" and dec.dtype_window is not None:
            x = _window(raw, *dec.dtype_window)
        else:
            x = normalize_intensity(raw, cfg, raw.dtype)
        if dec.invert:
            x = 1.0 - x
        if op == "repeat":
            x = np.repeat(x, 3, axis=2)
        elif op == "luma":
            x = (x[..., 0] * _LUMA[0] + x[..., 1] * _LUMA[1] + x[..., 2] * _LUMA[2])[..., None]
        chw = np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)
    return chw, ImageMeta(name, (h, w), stored, c, dec.fmt, k if dec.n_slices > 1 else None)


def _channel_plan(name: str, c: int, has_alpha: bool, want: int | None, policy: str) -> tuple[int, str]:
    """How many raw channels to keep (alpha dropped) and the post-normalisation op: '', 'repeat' or 'luma'."""
    if want is None or c == want:
        return c, ""
    if policy == "convert":
        keep = c - 1 if has_alpha and c in (2, 4) else c
        if keep == want:
            return keep, ""
        if keep == 1 and want == 3:
            return keep, "repeat"
        if keep == 3 and want == 1:
            return keep, "luma"
    raise ImageReadError(name, f"has {c} channels, model expects {want} (channel_policy={policy!r})")


def _window(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """(x - lo) / (hi - lo) clipped to [0, 1] as float32; a degenerate window thresholds at lo (flat -> 0)."""
    x = arr.astype(np.float32)
    if hi > lo:
        x -= np.float32(lo)
        x /= np.float32(hi - lo)
        np.clip(x, 0.0, 1.0, out=x)
        return x
    return (x > lo).astype(np.float32)


# ------------------------------------------------------------------------------------------ format detection


def _extension(name: str) -> str:
    low = name.lower()
    return ".nii.gz" if low.endswith(".nii.gz") else Path(low).suffix


def _sniff(head: bytes) -> str | None:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:2] == b"BM" and int.from_bytes(head[14:18], "little") in (12, 16, 40, 52, 56, 64, 108, 124):
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[128:132] == b"DICM":
        return "dicom"
    if head[:2] == b"\x1f\x8b":
        return "nifti"  # gzip: .nii.gz is the only compressed container we read
    if head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] == b"n+2\x00":
        return "nifti"
    return None


def _detect(name: str, head: bytes) -> str:
    sniffed = _sniff(head)
    if sniffed:
        return sniffed
    ext = _extension(name)
    by_ext = _EXT_FORMAT.get(ext)
    if by_ext == "dicom":
        return "dicom"  # DICOM without the 128-byte preamble: let pydicom try
    if by_ext:
        raise ImageReadError(name, f"not a {_LABEL[by_ext]} image (content does not match extension '{ext}')")
    if ext:
        supported = ", ".join(IMAGE_EXTENSIONS)
        raise ImageReadError(name, f"unsupported file type '{ext}' (supported: {supported})")
    raise ImageReadError(name, "unrecognised image data (no known file signature and no extension)")


def _decode(fh: BinaryIO, name: str, head: bytes, fmt: str) -> _Decoded:
    if fmt == "png" and head[12:16] == b"IHDR" and head[24] == 16:
        return _decode_png16(fh, name, head)
    if fmt in ("png", "jpeg", "bmp"):
        return _decode_pil(fh, fmt)
    if fmt == "tiff":
        return _decode_tiff(fh, name)
    if fmt == "dicom":
        return _decode_dicom(fh, name, force=head[128:132] != b"DICM")
    return _decode_nifti(fh, name, gz=head[:2] == b"\x1f\x8b")


# ------------------------------------------------------------------------------------------ format decoders


def _one_slice(read: Callable[[], np.ndarray]) -> Callable[[int], tuple[np.ndarray, str]]:
    def get(_k: int) -> tuple[np.ndarray, str]:
        arr = read()
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        return (arr[..., None] if arr.ndim == 2 else arr), arr.dtype.name

    return get


def _decode_pil(fh: BinaryIO, fmt: str) -> _Decoded:
    im = Image.open(fh, formats=[_LABEL[fmt]])  # header only; DecompressionBombError is wrapped by the caller
    alpha = im.mode in ("LA", "La", "RGBA", "RGBa", "PA") or (im.mode == "P" and "transparency" in im.info)

    def read() -> np.ndarray:
        im.load()  # force the lazy decode here so truncation errors surface now
        x = im
        if x.mode in ("P", "PA"):
            x = x.convert("RGBA" if alpha else "RGB")
        elif x.mode == "1":
            x = x.convert("L")
        elif x.mode not in ("L", "LA", "RGB", "RGBA", "I", "F") and not x.mode.startswith("I;16"):
            x = x.convert("RGBA" if alpha else "RGB")  # CMYK, YCbCr, LAB, premultiplied alpha ...
        return np.asarray(x)

    return _Decoded(fmt, (im.size[1], im.size[0]), 1, _one_slice(read), has_alpha=alpha)


def _decode_png16(fh: BinaryIO, name: str, head: bytes) -> _Decoded:
    h, w = int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big")

    def read() -> np.ndarray:
        import cv2

        arr = cv2.imdecode(np.frombuffer(fh.read(), np.uint8), cv2.IMREAD_UNCHANGED)
        if arr is None:
            raise ImageReadError(name, "corrupt or truncated PNG data (OpenCV could not decode it)")
        if arr.ndim == 3 and arr.shape[2] == 3:  # OpenCV returns BGR(A)
            arr = arr[..., [2, 1, 0]]
        elif arr.ndim == 3 and arr.shape[2] == 4:
            arr = arr[..., [2, 1, 0, 3]]
        return arr

    return _Decoded("png", (h, w), 1, _one_slice(read), has_alpha=head[25] in (4, 6))


def _decode_tiff(fh: BinaryIO, name: str) -> _Decoded:
    tif = tifffile.TiffFile(fh)
    if not tif.series:
        raise ImageReadError(name, "corrupt TIFF: no readable image pages")
    series = tif.series[0]
    dims = [(n, a) for n, a in zip(series.shape, series.axes, strict=True) if n != 1 or a in "YX"]
    shape, axes = tuple(n for n, _ in dims), "".join(a for _, a in dims)
    if len(shape) == 2:
        chan = None
    elif len(shape) == 3:
        a, _, c = shape
        if "S" in axes:
            chan = axes.index("S")  # samples per pixel: the layout is explicit
        elif c <= 4 or c <= _MAX_PLANES < a:
            chan = 2  # H x W x C
        elif a <= _MAX_PLANES:
            chan = 0  # C x H x W (planar / page stack)
        else:
            raise ImageReadError(
                name, f"TIFF of shape {shape} (axes {axes}) is a stack of images; only single 2-D images "
                f"with up to {_MAX_PLANES} channels/pages are supported")
    else:
        raise ImageReadError(name, f"unsupported TIFF layout: shape {shape}, axes {axes}")
    hw = [n for i, n in enumerate(shape) if i != chan]
    key = series.keyframe
    nchan = 1 if chan is None else shape[chan]
    alpha = nchan in (2, 4) and (
        any(int(e) in (1, 2) for e in key.extrasamples) or (nchan == 4 and key.photometric == 2)
    )

    def read() -> np.ndarray:
        arr = series.asarray().reshape(shape)
        return arr if chan is None else np.moveaxis(arr, chan, -1)

    return _Decoded("tiff", (hw[0], hw[1]), 1, _one_slice(read), has_alpha=alpha)


def _first(v) -> float:
    return float(v[0] if isinstance(v, Sequence) and not isinstance(v, str) else v)


def _decode_dicom(fh: BinaryIO, name: str, force: bool) -> _Decoded:
    import pydicom

    try:
        ds = pydicom.dcmread(fh, force=force)
    except Exception as e:
        what = "not a DICOM file" if force else "corrupt DICOM file"
        raise ImageReadError(name, f"{what}: {type(e).__name__}: {e}") from e
    if not any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        hint = " (or it is not DICOM at all)" if force else " (or the file is truncated)"
        raise ImageReadError(name, f"DICOM file has no pixel data{hint}")
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    window = None
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)  # DICOM PS3.3 C.11.2.1.2 linear VOI function
        window = (c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2)
    elif "PixelData" in ds and not int(ds.get("PixelRepresentation", 0)) and (slope, intercept) == (1, 0):
        window = (0.0, float(2 ** int(ds.get("BitsStored", ds.get("BitsAllocated", 16))) - 1))  # e.g. 12-bit
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    cache: list[np.ndarray] = []

    def read(k: int) -> tuple[np.ndarray, str]:
        if not cache:
            try:
                cache.append(ds.pixel_array)
            except Exception as e:
                hint = ""
                if getattr(ts, "is_compressed", False):
                    hint = "; only uncompressed and RLE DICOM decode without a plugin (pylibjpeg, GDCM)"
                raise ImageReadError(
                    name, f"cannot decode DICOM pixel data (transfer syntax {getattr(ts, 'name', ts)}): "
                    f"{type(e).__name__}: {e}{hint}") from e
        px = cache[0][k] if frames > 1 else cache[0]
        stored = px.dtype.name
        px = px.reshape(rows, cols, spp)
        if (slope, intercept) != (1.0, 0.0):
            px = px.astype(np.float64) * slope + intercept
        return px, stored

    mono1 = str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1"
    return _Decoded("dicom", (rows, cols), frames, read, invert=mono1, dtype_window=window)


def _decode_nifti(fh: BinaryIO, name: str, gz: bool) -> _Decoded:
    import nibabel as nib

    stream: BinaryIO = gzip.GzipFile(fileobj=fh) if gz else fh  # type: ignore[assignment]
    size = stream.read(4)
    stream.seek(0)
    if 348 in (int.from_bytes(size, "little"), int.from_bytes(size, "big")):
        img = nib.Nifti1Image.from_stream(stream)
    elif 540 in (int.from_bytes(size, "little"), int.from_bytes(size, "big")):
        img = nib.Nifti2Image.from_stream(stream)
    else:
        where = " inside the gzip data" if gz else ""
        raise ImageReadError(name, f"not a NIfTI image (no NIfTI-1/2 header{where})")
    dtype = img.header.get_data_dtype()
    if dtype.fields:
        raise ImageReadError(name, f"NIfTI datatype {dtype} (RGB/structured) is not supported")
    shape = tuple(int(n) for n in img.shape)
    all_ = slice(None)
    tail: tuple | None  # index after (x, y, slice k); None for 2-D images
    if len(shape) == 5 and shape[3] == 1:
        tail, n, c = (0, all_), shape[2], shape[4]
    elif len(shape) == 4:
        tail, n, c = (all_,), shape[2], shape[3]
    elif len(shape) == 3:
        tail, n, c = (), shape[2], 1
    elif len(shape) == 2:
        tail, n, c = None, 1, 1
    else:
        raise ImageReadError(name, f"unsupported NIfTI shape {shape} (expected 2-D, 3-D or 4-D)")
    if c > _MAX_PLANES:
        raise ImageReadError(name, f"NIfTI shape {shape}: last axis of {c} volumes is not a channel axis "
                             f"(at most {_MAX_PLANES}); 4-D series are not supported")

    def read(k: int) -> tuple[np.ndarray, str]:
        arr = np.asanyarray(img.dataobj[(all_, all_) if tail is None else (all_, all_, k, *tail)])
        arr = arr.reshape(shape[0], shape[1], c)
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        return arr, dtype.name

    return _Decoded("nifti", (shape[0], shape[1]), n, read)
