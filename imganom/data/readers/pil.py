"""PNG, JPEG and BMP through Pillow; 16-bit PNG through OpenCV so all 16 bits survive.

Pixels are returned as stored: no EXIF rotation. Palette, CMYK, YCbCr and other modes are expanded to
RGB(A); the byte budget counts the expanded image.
"""

from __future__ import annotations

from typing import BinaryIO

import numpy as np
from PIL import Image

from imganom.data.readers import base
from imganom.data.readers.base import ImageReadError

_KEPT_MODES = ("L", "LA", "RGB", "RGBA", "I", "F")
_BMP_HEADER_SIZES = (12, 16, 40, 52, 56, 64, 108, 124)
_PNG_CHANNELS = {0: 1, 2: 3, 4: 4, 6: 4}  # IHDR colour type -> channels OpenCV returns at 16 bits


def _target_mode(mode: str, alpha: bool) -> str | None:
    """The mode a Pillow image is converted to before it becomes an array (None: kept as it is)."""
    if mode == "1":
        return "L"
    if mode in _KEPT_MODES or mode.startswith("I;16"):
        return None
    return "RGBA" if alpha else "RGB"  # P, PA, CMYK, YCbCr, LAB, premultiplied alpha ...


def _itemsize(mode: str) -> int:
    return 4 if mode in ("I", "F") else 2 if mode.startswith("I;16") else 1


def _decode_pil(fh: BinaryIO, fmt: str, label: str) -> base.Decoded:
    im = Image.open(fh, formats=[label])  # header only; DecompressionBombError is wrapped by the caller
    alpha = im.mode in ("LA", "La", "RGBA", "RGBa", "PA") or (im.mode == "P" and "transparency" in im.info)
    target = _target_mode(im.mode, alpha)
    out = target or im.mode

    def read() -> np.ndarray:
        im.load()  # force the lazy decode here so truncation errors surface now
        return np.asarray(im.convert(target) if target else im)

    return base.Decoded(
        fmt, (im.size[1], im.size[0]), 1, base.one_slice(read),
        channels=Image.getmodebands(out), itemsize=_itemsize(out), has_alpha=alpha,
    )  # fmt: skip


def _check_chunks(name: str, data: bytes) -> None:
    """Refuse a PNG whose chunk lengths overrun the data (OpenCV spends seconds on a 4 GB claimed length)."""
    pos = 8
    while pos + 8 <= len(data):
        length, kind = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8]
        if length > len(data) - pos - 12:
            raise ImageReadError(
                name, f"corrupt or truncated PNG: chunk {kind!r} at byte {pos} claims {length} bytes, "
                f"{max(0, len(data) - pos - 12)} left")  # fmt: skip
        if kind == b"IEND":
            return
        pos += 12 + length


def _decode_png16(fh: BinaryIO, name: str, head: bytes) -> base.Decoded:
    h, w = int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big")
    colour = head[25]

    def read() -> np.ndarray:
        import cv2

        data = fh.read()
        _check_chunks(name, data)
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if arr is None:
            raise ImageReadError(name, "corrupt or truncated PNG data (OpenCV could not decode it)")
        if arr.ndim == 3 and arr.shape[2] == 3:  # OpenCV returns BGR(A)
            arr = arr[..., [2, 1, 0]]
        elif arr.ndim == 3 and arr.shape[2] == 4:
            arr = arr[..., [2, 1, 0, 3]]
        return arr

    return base.Decoded(
        "png", (h, w), 1, base.one_slice(read),
        channels=_PNG_CHANNELS.get(colour, 4), itemsize=2, has_alpha=colour in (4, 6),
    )  # fmt: skip


@base.register
class PngReader(base.ImageReader):
    fmt, label, suffixes = "png", "PNG", (".png",)

    def sniff(self, head: bytes) -> bool:
        return head.startswith(b"\x89PNG\r\n\x1a\n")

    def open(self, fh: BinaryIO, src: base.Source, head: bytes, limits: base.Limits) -> base.Decoded:
        if len(head) < 26 or head[12:16] != b"IHDR":
            raise ImageReadError(src.name, "corrupt PNG: no IHDR header chunk")
        if head[24] == 16:
            return _decode_png16(fh, src.name, head)
        return _decode_pil(fh, self.fmt, self.label)


@base.register
class JpegReader(base.ImageReader):
    fmt, label, suffixes = "jpeg", "JPEG", (".jpg", ".jpeg")

    def sniff(self, head: bytes) -> bool:
        return head.startswith(b"\xff\xd8\xff")

    def open(self, fh: BinaryIO, src: base.Source, head: bytes, limits: base.Limits) -> base.Decoded:
        return _decode_pil(fh, self.fmt, self.label)


@base.register
class BmpReader(base.ImageReader):
    fmt, label, suffixes = "bmp", "BMP", (".bmp",)

    def sniff(self, head: bytes) -> bool:
        return head[:2] == b"BM" and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES

    def open(self, fh: BinaryIO, src: base.Source, head: bytes, limits: base.Limits) -> base.Decoded:
        return _decode_pil(fh, self.fmt, self.label)
