"""TIFF through tifffile: one 2-D image with up to ``MAX_PLANES`` channels (samples, planes or pages).

The byte budget covers the whole first series (every plane) and is checked before any strip is decoded.
The chain of image directories is walked first: tifffile notices a loop in it only when the loop closes
within 100 directories, else it walks (nearly) forever, so a loop or more than ``MAX_IFDS`` directories is
an ``ImageReadError``.
Without ``imagecodecs``, tifffile's own zlib/deflate/LZMA decoders inflate a strip to whatever size its data
asks for, so a few KB can claim gigabytes inside a tiny image; they are replaced here by decoders that stop
at the strip's expected size. Codecs that need ``imagecodecs`` when it is absent are an ``ImageReadError``.
"""

from __future__ import annotations

import lzma
import struct
import zlib
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy as np
import tifffile

from imganom.data.readers import base
from imganom.data.readers.base import ImageReadError


def _bounded(make: Callable[[], Any]) -> Callable[..., bytes]:
    """A tifffile decoder that returns at most ``out`` bytes (the size tifffile expects for the strip)."""

    def decode(data: bytes, /, *, out: Any = None) -> bytes:
        bound = out if isinstance(out, int) and out > 0 else 0  # 0: no bound
        return make().decompress(bytes(data), bound)

    return decode


def _bound_fallback_codecs() -> None:
    """Install the bounded decoders where tifffile would use its unbounded pure-Python fallbacks."""
    try:
        import imagecodecs  # noqa: F401  - its decoders honour ``out``

        return
    except ImportError:
        pass
    codecs = getattr(tifffile.TIFF.DECOMPRESSORS, "_codecs", None)
    if isinstance(codecs, dict):
        inflate = _bounded(zlib.decompressobj)
        codecs.update({8: inflate, 32946: inflate, 34925: _bounded(lzma.LZMADecompressor)})


_bound_fallback_codecs()


MAX_IFDS = 65_536  # image directories (pages) one TIFF may chain


def _check_ifd_chain(fh: BinaryIO, name: str, size: int) -> None:
    """Walk the directory offsets (headers only) and refuse a chain that loops or is longer than MAX_IFDS."""
    head = fh.read(16)
    order = "<" if head[:2] == b"II" else ">"
    if head[2:4] in (b"+\x00", b"\x00+"):  # BigTIFF: 8-byte offsets and counts, 20-byte entries
        count_fmt, entry, offset_fmt, offset = "Q", 20, "Q", struct.unpack(order + "Q", head[8:16])[0]
    else:
        count_fmt, entry, offset_fmt, offset = "H", 12, "I", struct.unpack(order + "I", head[4:8])[0]
    seen: set[int] = set()
    while 0 < offset < size:  # what points outside the file is tifffile's to report
        if offset in seen:
            raise ImageReadError(name, f"corrupt TIFF: its chain of image directories loops at byte {offset}")
        if len(seen) >= MAX_IFDS:
            raise ImageReadError(name, f"TIFF with more than {MAX_IFDS} image directories")
        seen.add(offset)
        fh.seek(offset)
        raw = fh.read(struct.calcsize(count_fmt))
        if len(raw) < struct.calcsize(count_fmt):
            break
        fh.seek(offset + len(raw) + struct.unpack(order + count_fmt, raw)[0] * entry)
        raw = fh.read(struct.calcsize(offset_fmt))
        if len(raw) < struct.calcsize(offset_fmt):
            break
        offset = struct.unpack(order + offset_fmt, raw)[0]
    fh.seek(0)


def _layout(name: str, series: Any) -> tuple[tuple[int, ...], int | None]:
    """The series shape without unit axes, and which axis holds the channels (None: a 2-D image)."""
    dims = [(n, a) for n, a in zip(series.shape, series.axes, strict=True) if n != 1 or a in "YX"]
    shape, axes = tuple(n for n, _ in dims), "".join(a for _, a in dims)
    if len(shape) == 2:
        return shape, None
    if len(shape) == 3:
        a, _, c = shape
        if "S" in axes:
            return shape, axes.index("S")  # samples per pixel: the layout is explicit
        if c <= 4 or c <= base.MAX_PLANES < a:
            return shape, 2  # H x W x C
        if a <= base.MAX_PLANES:
            return shape, 0  # C x H x W (planar / page stack)
        raise ImageReadError(
            name, f"TIFF of shape {shape} (axes {axes}) is a stack of images; only single 2-D images "
            f"with up to {base.MAX_PLANES} channels/pages are supported")  # fmt: skip
    raise ImageReadError(name, f"unsupported TIFF layout: shape {shape}, axes {axes}")


@base.register
class TiffReader(base.ImageReader):
    fmt, label, suffixes = "tiff", "TIFF", (".tif", ".tiff")

    def sniff(self, head: bytes) -> bool:
        return head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

    def open(self, fh: BinaryIO, src: base.Source, head: bytes, limits: base.Limits) -> base.Decoded:
        _check_ifd_chain(fh, src.name, src.size)
        tif = tifffile.TiffFile(fh)
        if not tif.series:
            raise ImageReadError(src.name, "corrupt TIFF: no readable image pages")
        series = tif.series[0]
        shape, chan = _layout(src.name, series)
        h, w = (n for i, n in enumerate(shape) if i != chan)
        key = series.keyframe
        nchan = 1 if chan is None else shape[chan]
        alpha = nchan in (2, 4) and (
            any(int(e) in (1, 2) for e in key.extrasamples) or (nchan == 4 and key.photometric == 2)
        )

        def read() -> np.ndarray:
            arr = series.asarray().reshape(shape)
            return arr if chan is None else np.moveaxis(arr, chan, -1)

        return base.Decoded(
            "tiff", (h, w), 1, base.one_slice(read),
            channels=nchan, itemsize=np.dtype(series.dtype).itemsize, has_alpha=alpha,
        )  # fmt: skip
