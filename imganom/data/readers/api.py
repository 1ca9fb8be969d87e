"""The read pipeline: detect the format (signature first, extension second), parse the header, check it
against the budgets, decode one 2-D item, normalise, convert channels."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, cast

import numpy as np

from imganom.config import IntensityConfig, PreprocessConfig
from imganom.data.readers.base import (
    MAX_BYTES,
    MAX_PIXELS,
    READERS,
    Decoded,
    ImageMeta,
    ImageReader,
    ImageReadError,
    Limits,
    Source,
    check_header,
    file_source,
    wrapped,
)
from imganom.data.readers.intensity import normalize_intensity, window

if TYPE_CHECKING:
    from typing_extensions import Unpack

_HEAD_BYTES = 512
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601
_SLICE_RE = re.compile(r"^(.*)#slice=(\d+)$", re.DOTALL)


class ReadOptions(TypedDict, total=False):
    """Keywords of ``read_image``, ``read_image_bytes`` and ``iter_items``; every one is optional.

    ``intensity`` (default ``IntensityConfig()``: mode 'dtype'); ``channels`` (default None: as stored;
    otherwise ``channel_policy`` 'convert' replicates gray to 3, reduces RGB to gray by BT.601 luminance and
    drops alpha, 'strict' refuses any mismatch); ``max_pixels`` bounds H*W (default ``MAX_PIXELS``) and
    ``max_bytes`` H*W*channels*bytes per sample of the decoded item (default ``MAX_BYTES``), both checked from
    the header before pixel data is decoded (None: no bound); ``slice_index`` picks a slice of a volume.
    """

    intensity: IntensityConfig | None
    channels: int | None
    channel_policy: str
    max_pixels: int | None
    max_bytes: int | None
    slice_index: int | None


@dataclass(frozen=True)
class _Options:
    intensity: IntensityConfig
    channels: int | None
    channel_policy: str
    limits: Limits
    slice_index: int | None


def _options(kw: dict[str, Any]) -> _Options:
    unknown = set(kw) - set(ReadOptions.__annotations__)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    policy = kw.get("channel_policy", "convert")
    if policy not in ("convert", "strict"):
        raise ValueError(f"channel_policy must be 'convert' or 'strict', got {policy!r}")
    limits = Limits(kw.get("max_pixels", MAX_PIXELS), kw.get("max_bytes", MAX_BYTES))
    intensity = kw.get("intensity") or IntensityConfig()
    return _Options(intensity, kw.get("channels"), policy, limits, kw.get("slice_index"))


def read_image(path: str | Path, **options: Unpack[ReadOptions]) -> tuple[np.ndarray, ImageMeta]:
    """Read one image (or one slice of a volume) as float32 CHW in [0, 1], C-contiguous (``ReadOptions``).

    Volumes need ``slice_index``. Every failure is an ``ImageReadError`` naming the file and the reason.
    """
    return _read(file_source(path), _options(options))


def read_options(pp: PreprocessConfig) -> ReadOptions:
    """The ``read_image``/``read_image_bytes`` keywords a model's preprocessing asks for (one place)."""
    keys = ("intensity", "channels", "channel_policy", "max_pixels", "max_bytes")  # same names in both
    return cast(ReadOptions, {k: getattr(pp, k) for k in keys})


def read_image_bytes(
    data: bytes, name: str = "<upload>", **options: Unpack[ReadOptions]
) -> tuple[np.ndarray, ImageMeta]:
    """``read_image`` for in-memory data (uploads); ``name`` gives the extension and the error label."""
    opts = _options(options)
    if not data:
        raise ImageReadError(name, "empty data (0 bytes)")
    return _read(Source(name, len(data), data=bytes(data)), opts)


def count_slices(path: str | Path) -> int:
    """Number of 2-D items in a file: 1 for images, the depth of a 3-D NIfTI, the frames of a DICOM.

    Headers claiming more than ``MAX_SLICES`` items, or more pixel data than the file holds, raise
    ``ImageReadError`` (callers then list the file as one item, which fails with that message).
    """
    with _decoded(file_source(path), Limits(None, None)) as dec:
        return dec.n_slices


def iter_items(
    path: str | Path, **options: Unpack[ReadOptions]
) -> Iterator[tuple[str, np.ndarray, ImageMeta]]:
    """Yield ``(id_suffix, chw, meta)`` per 2-D item: suffix ``""`` for images, ``"#slice=0007"`` per slice.

    The file stays open while iterating; errors surface as ``ImageReadError`` on the first ``next()``.
    """
    opts = _options(options)
    src = file_source(path)
    with _decoded(src, opts.limits) as dec:
        one = opts.slice_index is not None
        for k in [_resolve_slice(src.name, dec, opts.slice_index)] if one else range(dec.n_slices):
            arr, meta = _read_slice(src.name, dec, k, opts)
            yield (f"#slice={k:04d}" if dec.n_slices > 1 else ""), arr, meta


@contextmanager
def open_decoded(path: str | Path, **options: Unpack[ReadOptions]) -> Iterator[Decoded]:
    """The parsed, budget-checked header of a file (``Decoded``: ``read(k)`` gives raw H x W x C pixels), for
    readers that assemble volumes from several files (``data.volumes``)."""
    with _decoded(file_source(path), _options(options).limits) as dec:
        yield dec


def read_decoded(
    name: str, dec: Decoded, k: int, **options: Unpack[ReadOptions]
) -> tuple[np.ndarray, ImageMeta]:
    """Item ``k`` of ``dec`` through the read pipeline (budgets, normalisation, channel conversion), exactly
    as ``read_image`` treats a slice; ``dec`` may be built in memory (a slice of an assembled volume)."""
    opts = _options(options)
    check_header(name, dec, opts.limits)
    return _read_slice(name, dec, k, opts)


def split_item_id(item: str) -> tuple[str, int | None]:
    """``"a/b.nii.gz#slice=0003"`` -> ``("a/b.nii.gz", 3)``; ids without a suffix -> ``(item, None)``."""
    m = _SLICE_RE.match(item)
    return (m.group(1), int(m.group(2))) if m else (item, None)


# ------------------------------------------------------------------------------------------ read pipeline


def _read(src: Source, opts: _Options) -> tuple[np.ndarray, ImageMeta]:
    with _decoded(src, opts.limits) as dec:
        return _read_slice(src.name, dec, _resolve_slice(src.name, dec, opts.slice_index), opts)


@contextmanager
def _decoded(src: Source, limits: Limits) -> Iterator[Decoded]:
    """Open the source, detect the format, parse the header and enforce the budgets."""
    try:
        fh = src.open()
    except OSError as e:
        raise ImageReadError(src.name, f"cannot open file: {e.strerror or e}") from None
    with fh:
        with wrapped(src.name, "cannot read image"):
            head = fh.read(_HEAD_BYTES)
            fh.seek(0)
            reader = _detect(src.name, head)
        with wrapped(src.name, f"cannot decode {reader.label} image"):
            dec = reader.open(fh, src, head, limits)
        check_header(src.name, dec, limits)
        yield dec


def _resolve_slice(name: str, dec: Decoded, slice_index: int | None) -> int:
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


def _read_slice(name: str, dec: Decoded, k: int, opts: _Options) -> tuple[np.ndarray, ImageMeta]:
    cfg, channels, channel_policy = opts.intensity, opts.channels, opts.channel_policy
    if cfg.mode == "dtype" and dec.window_error:
        raise ImageReadError(name, dec.window_error)
    _channel_plan(name, dec.channels, dec.has_alpha, channels, channel_policy)  # refuse before decoding
    with wrapped(name, f"cannot decode {READERS[dec.fmt].label} image"):
        raw, stored = dec.read(k)
        h, w, c = raw.shape
        if h == 0 or w == 0:
            raise ImageReadError(name, f"zero-size image ({h}x{w})")
        if raw.dtype.kind == "f" and not np.isfinite(raw).all():
            raise ImageReadError(name, "contains NaN/Inf pixel values")
        keep, op = _channel_plan(name, c, dec.has_alpha, channels, channel_policy)
        raw = raw[..., :keep].transpose(2, 0, 1)  # a CHW view: the float32 copy below is made in CHW order
        if cfg.mode == "dtype" and dec.dtype_window is not None:
            x = window(raw, *dec.dtype_window)
        else:
            x = normalize_intensity(raw, cfg, raw.dtype)
        if dec.invert:
            np.subtract(1.0, x, out=x)
        if op == "repeat":
            x = np.repeat(x, 3, axis=0)
        elif op == "luma":  # in place: one temporary plane at a time
            y = x[0] * _LUMA[0]
            y += x[1] * _LUMA[1]
            y += x[2] * _LUMA[2]
            x = y[None]
        chw = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(chw).all():  # a last guard: no NaN ever reaches a model
            raise ImageReadError(name, "intensity normalisation produced NaN/Inf values")
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


# ------------------------------------------------------------------------------------------ format detection


def _extension(name: str) -> str:
    low = name.lower()
    return ".nii.gz" if low.endswith(".nii.gz") else Path(low).suffix


def _detect(name: str, head: bytes) -> ImageReader:
    """The reader whose signature matches, else the one the extension names (if it parses unsigned data)."""
    for reader in READERS.values():
        if reader.sniff(head):
            return reader
    ext = _extension(name)
    by_ext = next((r for r in READERS.values() if ext in r.suffixes), None)
    if by_ext is not None and by_ext.parse_without_signature:
        return by_ext
    if by_ext is not None:
        raise ImageReadError(name, f"not a {by_ext.label} image (content does not match extension '{ext}')")
    if ext:
        supported = ", ".join(s for r in READERS.values() for s in r.suffixes)
        raise ImageReadError(name, f"unsupported file type '{ext}' (supported: {supported})")
    raise ImageReadError(name, "unrecognised image data (no known file signature and no extension)")
