"""What every format reader shares: the error type, what was read, where the bytes come from, the parsed
header with the facts the budgets need, and the one registry of formats (one ``ImageReader`` per format,
declaring its suffixes and signature, in the manner of MONAI's ``ImageReader`` classes).

Budgets, all checked from the header before any pixel data is decoded (``Limits``, ``check_header``):
``max_pixels`` bounds H x W, ``max_bytes`` bounds H x W x channels x bytes per sample of one decoded 2-D
item, ``MAX_SLICES`` bounds the items one file may expand into, ``MIN_SIDE`` refuses images too small for an
anomaly map, and a header must not claim more pixel data than the file can hold (``check_claim``).
"""

from __future__ import annotations

import errno
import io
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, ClassVar

import numpy as np

from imganom.config import PreprocessConfig
from imganom.data.names import printable

MAX_PIXELS: int = PreprocessConfig.model_fields["max_pixels"].default
MAX_BYTES: int = PreprocessConfig.model_fields["max_bytes"].default
MAX_SLICES = 10_000  # 2-D items one file may expand into (NIfTI depth, DICOM frames)
MAX_PLANES = 16  # a TIFF page stack / NIfTI 4th axis up to this length is read as channels
MIN_SIDE = 2  # each side of an image, in pixels: a 1-pixel line or dot has no meaningful anomaly map
DEFLATE_MAX_RATIO = 1032  # deflate (zlib, gzip) never expands data by more than this factor


class ImageReadError(ValueError):
    """An image could not be read; ``str(e)`` is ``"<path>: <reason>"`` (printable: see ``names``)."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(printable(f"{path}: {reason}"))

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


@dataclass(frozen=True)
class Limits:
    """Decoder budgets; ``None`` switches one off (``count_slices`` reads headers without pixel budgets)."""

    max_pixels: int | None = MAX_PIXELS
    max_bytes: int | None = MAX_BYTES


@dataclass
class Source:
    """A file (``path``) or an in-memory buffer (``data``); ``size`` is its length in bytes."""

    name: str
    size: int
    path: Path | None = None
    data: bytes | None = None

    def open(self) -> BinaryIO:
        return open(self.path, "rb") if self.path is not None else io.BytesIO(self.data)


@dataclass
class Decoded:
    """A parsed header; ``read(k)`` decodes slice ``k`` into (H x W x C raw pixels, stored dtype name).

    ``channels`` and ``itemsize`` describe what ``read`` returns, as far as the header tells; the byte budget
    is ``H * W * channels * itemsize``.
    """

    fmt: str
    size: tuple[int, int]
    n_slices: int
    read: Callable[[int], tuple[np.ndarray, str]]
    channels: int = 1
    itemsize: int = 1
    has_alpha: bool = False
    invert: bool = False  # DICOM MONOCHROME1
    dtype_window: tuple[float, float] | None = None  # DICOM VOI window / BitsStored range, mode 'dtype' only
    window_error: str | None = None  # a VOI window that cannot be used: an error in mode 'dtype' only

    @property
    def item_bytes(self) -> int:
        h, w = self.size
        return h * w * self.channels * self.itemsize


class ImageReader:
    """One format: how to recognise it and how to parse its header into a ``Decoded`` (pixels stay lazy)."""

    fmt: ClassVar[str]  # 'png', ...
    label: ClassVar[str]  # 'PNG', ... (in messages)
    suffixes: ClassVar[tuple[str, ...]]  # lower case, with the dot
    parse_without_signature: ClassVar[bool] = False  # let the parser try when only the extension matches

    def sniff(self, head: bytes) -> bool:
        """True when the first bytes carry this format's signature."""
        raise NotImplementedError

    def open(self, fh: BinaryIO, src: Source, head: bytes, limits: Limits) -> Decoded:
        """Parse the header (no pixel data yet); raise ``ImageReadError`` for anything unreadable."""
        raise NotImplementedError


READERS: dict[str, ImageReader] = {}  # format -> reader, in detection order


def register(cls: type[ImageReader]) -> type[ImageReader]:
    """Class decorator: add one instance of a reader to ``READERS``."""
    READERS[cls.fmt] = cls()
    return cls


# ------------------------------------------------------------------------------------------------ helpers


@contextmanager
def wrapped(name: str, prefix: str) -> Iterator[None]:
    """Turn any library exception into an ImageReadError that keeps the original message."""
    try:
        yield
    except ImageReadError:
        raise
    except MemoryError:
        raise ImageReadError(name, f"{prefix}: out of memory while decoding") from None
    except Exception as e:
        raise ImageReadError(name, f"{prefix}: {type(e).__name__}: {e}") from e


def one_slice(read: Callable[[], np.ndarray]) -> Callable[[int], tuple[np.ndarray, str]]:
    """``read`` of a single 2-D image as a ``Decoded.read`` (native byte order, H x W x C)."""

    def get(_k: int) -> tuple[np.ndarray, str]:
        arr = read()
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        return (arr[..., None] if arr.ndim == 2 else arr), arr.dtype.name

    return get


def check_slices(name: str, n: int, what: str = "slices") -> None:
    """Refuse a header claiming more 2-D items than ``MAX_SLICES``."""
    if n > MAX_SLICES:
        raise ImageReadError(name, f"header claims {n} {what}, more than the limit of {MAX_SLICES} per file")


def check_claim(name: str, what: str, claimed: int, available: int, hint: str = "") -> None:
    """Refuse a header whose ``what`` needs ``claimed`` bytes when the data can hold only ``available``."""
    if claimed > available:
        raise ImageReadError(
            name, f"header claims {what} = {claimed} bytes but the file can hold at most {available}{hint}"
        )


def check_header(name: str, dec: Decoded, limits: Limits) -> None:
    """The checks every header passes before pixel data is decoded: size, slices, pixel and byte budgets."""
    h, w = dec.size
    if h <= 0 or w <= 0:
        raise ImageReadError(name, f"zero-size image ({h}x{w})")
    if dec.n_slices < 1 or dec.channels < 1:
        raise ImageReadError(name, f"empty image: {dec.n_slices} slices of {dec.channels} channels")
    if limits.max_pixels is not None and h * w > limits.max_pixels:
        raise ImageReadError(
            name,
            f"too many pixels: {h}x{w} = {h * w} > max_pixels={limits.max_pixels} (decompression-bomb guard)",
        )
    if min(h, w) < MIN_SIDE:
        raise ImageReadError(name, f"image too small: {h}x{w} (each side must be at least {MIN_SIDE} px)")
    check_slices(name, dec.n_slices)
    if limits.max_bytes is not None and dec.item_bytes > limits.max_bytes:
        raise ImageReadError(
            name,
            f"too many pixels: {h}x{w} x {dec.channels} channel(s) x {dec.itemsize} byte(s) = "
            f"{dec.item_bytes} bytes > max_bytes={limits.max_bytes} (decompression-bomb guard)",
        )


def file_source(path: str | Path) -> Source:
    """A ``Source`` for a path; what is not a readable regular file raises with its cause (dangling symlink,
    symlink loop, unreadable or looping folder, special file, empty file)."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        if p.is_symlink():
            target = _link_target(p)
            raise ImageReadError(path, f"dangling symlink: its target {target} does not exist") from None
        raise ImageReadError(path, "file not found") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ImageReadError(path, "symlink loop: too many levels of symbolic links") from None
        raise ImageReadError(path, f"cannot access file: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageReadError(path, _folder_problem(p))
    if not stat.S_ISREG(st.st_mode):
        raise ImageReadError(path, "not a regular file")
    if st.st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    return Source(str(path), st.st_size, path=p)


def _link_target(p: Path) -> str:
    try:
        return repr(printable(os.readlink(p)))
    except OSError:
        return "(unreadable)"


def _folder_problem(p: Path) -> str:
    """Why a folder turned up where an image was expected (discovery lists the folders it cannot enter)."""
    if p.is_symlink():
        target, parent = p.resolve(), p.parent.resolve()
        if target == parent or target in parent.parents:
            return f"symlink loop: this folder link points to {printable(str(target))!r}, which contains it"
    try:
        with os.scandir(p):
            pass
    except OSError as e:
        return f"folder cannot be read ({e.strerror or e}): the images in it were not inspected"
    return "is a directory, expected an image file"
