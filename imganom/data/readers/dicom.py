"""DICOM through pydicom (>= 3): one frame is decoded at a time, so the byte budget is per frame.

Large elements stay on disk until needed (``defer_size``). A header must not claim more frames than
``MAX_SLICES`` nor more native pixel bytes than its Pixel Data element holds. Deflated transfer syntax is
inflated by pydicom all at once, so it is first measured by streaming and refused beyond the byte budget.
VOI window: used in intensity mode 'dtype'; a window that is not finite or has a width below 1 is then an
error naming it (modes 'percentile' and 'fixed' ignore the window). A non-finite rescale is always an error.
Not supported: compressed transfer syntaxes other than RLE unless pydicom has a decoder plugin (pylibjpeg,
GDCM), VOI LUT sequences and per-frame functional-group rescale.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any, BinaryIO

import numpy as np

from imganom.data.readers import base
from imganom.data.readers.base import ImageReadError

_PIXEL_TAGS = {"PixelData": 0, "FloatPixelData": 4, "DoubleFloatPixelData": 8}  # tag -> itemsize (0: bits)
_DEFER = 4096  # elements larger than this are read from the file only when used
_HEADER_ALLOWANCE = 16 << 20  # deflated data may exceed the pixel budget by this much (the other elements)
_UNDEFINED = 0xFFFFFFFF


def _first(v: Any) -> float:
    return float(v[0] if isinstance(v, Sequence) and not isinstance(v, str) else v)


def _check_deflated(fh: BinaryIO, name: str, force: bool, limit: int) -> bool:
    """True for Deflated Explicit VR Little Endian, after checking it inflates to at most ``limit`` bytes."""
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    try:
        read_preamble(fh, force)
        deflated = _read_file_meta_info(fh).get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
    except Exception:  # noqa: BLE001 - dcmread reports what is wrong with the file
        deflated = False
    if deflated:
        inflate, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
        while total <= limit and (chunk := fh.read(1 << 20)):
            total += len(inflate.decompress(chunk, limit + 1 - total))
            while inflate.unconsumed_tail and total <= limit:
                total += len(inflate.decompress(inflate.unconsumed_tail, limit + 1 - total))
        if total > limit:
            raise ImageReadError(name, f"deflated DICOM data inflates to more than {limit} bytes "
                                 f"(max_bytes + {_HEADER_ALLOWANCE >> 20} MiB for the other elements)")
    fh.seek(0)
    return deflated


def _value_length(ds: Any, keyword: str) -> int | None:
    """Bytes in an element's value, from its header when the value was deferred (None when unknown)."""
    elem = ds.get_item(keyword)
    n = getattr(elem, "length", None)
    if n is not None and n != _UNDEFINED:
        return int(n)
    value = elem.value
    return len(value) if isinstance(value, (bytes, bytearray)) else None


@base.register
class DicomReader(base.ImageReader):
    fmt, label, suffixes = "dicom", "DICOM", (".dcm", ".dicom")
    parse_without_signature = True  # DICOM without the 128-byte preamble: let pydicom try

    def sniff(self, head: bytes) -> bool:
        return head[128:132] == b"DICM"

    def open(self, fh: BinaryIO, src: base.Source, head: bytes, limits: base.Limits) -> base.Decoded:
        import pydicom
        from pydicom.pixels import pixel_array

        name, force = src.name, head[128:132] != b"DICM"
        deflated = _check_deflated(fh, name, force, (limits.max_bytes or base.MAX_BYTES) + _HEADER_ALLOWANCE)
        try:
            ds = pydicom.dcmread(fh, force=force, defer_size=_DEFER)
        except Exception as e:
            what = "not a DICOM file" if force else "corrupt DICOM file"
            raise ImageReadError(name, f"{what}: {type(e).__name__}: {e}") from e
        tag = next((t for t in _PIXEL_TAGS if t in ds), None)
        if tag is None:
            hint = " (or it is not DICOM at all)" if force else " (or the file is truncated)"
            raise ImageReadError(name, f"DICOM file has no pixel data{hint}")
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = _PIXEL_TAGS[tag] * 8 or int(ds.get("BitsAllocated", 16) or 16)
        itemsize = 1 if bits <= 8 else 2 if bits <= 16 else 4 if bits <= 32 else 8  # per decoded sample
        base.check_slices(name, frames, "frames")
        if min(frames, spp, bits) < 1:
            raise ImageReadError(name, f"invalid DICOM header: {frames} frames, {spp} samples, {bits} bits")
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        held = _value_length(ds, tag)
        if getattr(ts, "is_encapsulated", False):  # each compressed frame takes at least an 8-byte item
            room = src.size if held is None else held
            base.check_claim(name, f"{frames} compressed frames", frames * 8, room)
        elif held is not None:
            need = -(-frames * rows * cols * spp * bits // 8)
            base.check_claim(name, f"{frames} frame(s) of {rows}x{cols}x{spp} at {bits} bits", need, held)
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        rescaled = (slope, intercept) != (1.0, 0.0)
        if not (math.isfinite(slope) and math.isfinite(intercept)):
            raise ImageReadError(name, f"DICOM rescale is not finite (RescaleSlope={slope}, "
                                 f"RescaleIntercept={intercept})")  # fmt: skip
        window, window_error = None, None
        if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
            c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)  # PS3.3 C.11.2.1.2 linear VOI function
            if math.isfinite(c) and math.isfinite(w) and w >= 1:
                window = (c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2)
            else:
                window_error = (
                    f"DICOM VOI window cannot be used (WindowCenter={c}, WindowWidth={w}: needs finite "
                    "values and a width >= 1); fix the header or use intensity mode 'percentile' or 'fixed'"
                )
        elif tag == "PixelData" and not int(ds.get("PixelRepresentation", 0)) and not rescaled:
            window = (0.0, float(2 ** int(ds.get("BitsStored", bits)) - 1))  # e.g. 12-bit
        index = (lambda k: k) if frames > 1 else (lambda k: None)

        def read(k: int) -> tuple[np.ndarray, str]:
            fh.seek(0)
            try:  # from the file, only frame k is read and decoded (the dataset holds all frames inflated)
                px = pixel_array(ds if deflated else fh, index=index(k))
            except Exception as e:
                hint = ""
                if getattr(ts, "is_compressed", False):
                    hint = "; only uncompressed and RLE DICOM decode without a plugin (pylibjpeg, GDCM)"
                raise ImageReadError(
                    name, f"cannot decode DICOM pixel data (transfer syntax {getattr(ts, 'name', ts)}): "
                    f"{type(e).__name__}: {e}{hint}") from e  # fmt: skip
            stored = px.dtype.name
            px = px.reshape(rows, cols, spp)
            if rescaled:
                px = px.astype(np.float32)  # exact for stored values up to 2**24
                px *= np.float32(slope)
                px += np.float32(intercept)
            return px, stored

        mono1 = str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1"
        return base.Decoded(
            "dicom", (rows, cols), frames, read, channels=spp, itemsize=itemsize,
            invert=mono1, dtype_window=window, window_error=window_error,
        )  # fmt: skip
