"""Property-based fuzzing of the readers (Hypothesis): random bytes, valid small files of every format with
header bytes flipped, header fields set to extreme claimed sizes, truncations. Whatever the input, only
``ImageReadError`` may escape, a successful read is a finite float32 CHW array in [0, 1] of the size the meta
reports, the memory traced while reading stays under ``PEAK_BOUND`` (budgets: ``LIMITS``) and no read of
these small inputs takes longer than ``TIME_BOUND`` (a 464-byte PNG once held OpenCV for 13 s).

A bounded, derandomised number of examples keeps the run in CI deterministic and short (about 20 s)."""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import warnings

import nibabel as nib
import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from image_files import GRAY8, GRAY16, RGB8, gz, write_dicom
from PIL import Image

from imganom.data.readers import ImageReadError, read_image_bytes

pytestmark = pytest.mark.timeout(600)  # a decoder that hangs fails the run instead of blocking it
LIMITS = {"max_pixels": 1 << 20, "max_bytes": 4 << 20}
PEAK_BOUND = 64 << 20  # bytes traced (numpy and Python allocations) while reading one input
TIME_BOUND = 5.0  # seconds per read of an input of at most a few KB
SETTINGS = settings(deadline=None, database=None, derandomize=True, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
EXTREMES = [0, 1, 2, 3, 7, 8, 16, 255, 256, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 10**6, 0x7FFFFFFF, 0x80000000,
            0xFFFFFFFF, 10**12, 2**62, 2**64 - 1]  # fmt: skip


def _pil(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def _tiff(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


def _nifti(arr: np.ndarray, cls=nib.Nifti1Image) -> bytes:
    img = cls(arr, np.eye(4))
    return img.header.binaryblock + b"\0" * 4 + np.asarray(arr, order="F").tobytes(order="F")


def _dicom(tmp: str, pixels: np.ndarray) -> bytes:
    import pathlib
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return write_dicom(pathlib.Path(d) / tmp, pixels).read_bytes()


def _seeds() -> dict[str, bytes]:
    """One small valid file per format variant, keyed by a name carrying its extension."""
    import cv2

    vol = (GRAY8[:8, :8, None] + np.arange(3, dtype=np.uint8)).astype(np.int16)
    return {
        "gray8.png": _pil(GRAY8, "PNG"),
        "rgb8.png": _pil(RGB8, "PNG"),
        "pal.png": _pil_palette(),
        "gray16.png": cv2.imencode(".png", GRAY16)[1].tobytes(),
        "rgb.jpg": _pil(RGB8, "JPEG", quality=90),
        "rgb.bmp": _pil(RGB8, "BMP"),
        "u16.tif": _tiff(GRAY16),
        "zlib.tif": _tiff(RGB8, compression="zlib"),
        "pages.tif": _tiff(np.stack([GRAY8] * 3), compression="zlib"),
        "float.tif": _tiff(GRAY8.astype(np.float32) / 255, photometric="minisblack"),
        "ct.dcm": _dicom("ct.dcm", GRAY16 % 4096),
        "frames.dcm": _dicom("frames.dcm", np.stack([GRAY16[:8, :8]] * 3)),
        "vol.nii": _nifti(vol),
        "vol2.nii": _nifti(vol, nib.Nifti2Image),
        "vol.nii.gz": gz(_nifti(vol)),
    }


def _pil_palette() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(RGB8).convert("P").save(buf, "PNG")
    return buf.getvalue()


SEEDS = _seeds()
NAMES = sorted(SEEDS)


def check_read(data: bytes, name: str) -> None:
    """Read ``data`` as an upload named ``name`` (whole image and slice 0): only ImageReadError may escape."""
    for slice_index in (None, 0):
        tracemalloc.start()
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                x, meta = read_image_bytes(data, name, slice_index=slice_index, **LIMITS)
        except ImageReadError as e:
            assert e.reason and str(e).startswith(name)
            continue
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert peak < PEAK_BOUND, f"{name}: {peak} bytes traced"
            took = time.perf_counter() - t0
            assert took < TIME_BOUND, f"{name}: read took {took:.1f} s"
        assert x.dtype == np.float32 and x.ndim == 3 and x.shape[1:] == meta.original_size
        assert np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0


def test_every_seed_is_valid():
    for name, data in SEEDS.items():
        x, _ = read_image_bytes(data, name, slice_index=0 if "nii" in name or "frames" in name else None)
        assert x.size > 0, name


@settings(SETTINGS, max_examples=150)
@given(data=st.binary(max_size=1024), name=st.sampled_from(["x.png", "x.jpg", "x.bmp", "x.tif", "x.dcm",
                                                             "x.nii", "x.nii.gz", "x.bin", "x"]))  # fmt: skip
def test_random_bytes(data: bytes, name: str) -> None:
    check_read(data, name)


@settings(SETTINGS, max_examples=350)
@given(name=st.sampled_from(NAMES), edits=st.lists(st.tuples(st.integers(0, 599), st.integers(0, 255)),
                                                   min_size=1, max_size=8))  # fmt: skip
def test_flipped_header_bytes(name: str, edits: list[tuple[int, int]]) -> None:
    data = bytearray(SEEDS[name])
    for pos, value in edits:
        data[pos % min(len(data), 600)] = value
    check_read(bytes(data), name)


@settings(SETTINGS, max_examples=350)
@given(name=st.sampled_from(NAMES), pos=st.integers(0, 599), value=st.sampled_from(EXTREMES) | st.integers(0),
       fmt=st.sampled_from(["<H", ">H", "<I", ">I", "<Q", ">Q", "<i", ">i"]))  # fmt: skip
def test_claimed_sizes(name: str, pos: int, value: int, fmt: str) -> None:
    """An integer field of the header (dimensions, counts, offsets, lengths) set to an extreme value."""
    data = bytearray(SEEDS[name])
    width = struct.calcsize(fmt)
    pos = pos % (min(len(data), 600) - width)
    bits = 8 * width - (1 if fmt[-1].islower() else 0)
    struct.pack_into(fmt, data, pos, value % (1 << bits))
    check_read(bytes(data), name)


@settings(SETTINGS, max_examples=150)
@given(name=st.sampled_from(NAMES), cut=st.floats(0.0, 1.0), junk=st.binary(max_size=64))
def test_truncated_and_padded(name: str, cut: float, junk: bytes) -> None:
    data = SEEDS[name]
    check_read(data[: int(len(data) * cut)] + junk, name)


@pytest.mark.parametrize("name", NAMES)
def test_each_header_word_maxed_out(name: str) -> None:
    """Each 4-byte word of each seed's header set to 0xFFFFFFFF in turn: refused or read, nothing else."""
    data = bytearray(SEEDS[name])
    for pos in range(0, min(len(data), 560) - 4, 4):
        mutated = bytearray(data)
        struct.pack_into("<I", mutated, pos, 0xFFFFFFFF)
        check_read(bytes(mutated), name)
