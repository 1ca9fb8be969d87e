"""Builders of real image files for the reader tests: one small valid file per format variant, DICOM with any
header, PNG of any claimed size streamed through zlib (a 13000 x 13000 PNG without 169 MB in memory), and
NIfTI headers claiming any shape."""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import tifffile
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

H, W = 12, 16
RNG = np.random.default_rng(0)
GRAY8 = RNG.integers(0, 256, (H, W), dtype=np.uint8)
RGB8 = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
RGBA8 = np.dstack([RGB8, RNG.integers(0, 256, (H, W), dtype=np.uint8)])
GRAY16 = RNG.integers(0, 65536, (H, W), dtype=np.uint16)
RGB16 = RNG.integers(0, 65536, (H, W, 3), dtype=np.uint16)


def write_dicom(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int = 16,
                slope: float | str | None = None, intercept: float | None = None,
                center: float | str | None = None, width: float | str | None = None, preamble: bool = True,
                frames: int | str | None = None) -> Path:  # fmt: skip
    """Uncompressed Explicit VR Little Endian DICOM, 16-bit, one frame or a (frames, H, W) stack.

    ``frames`` overrides NumberOfFrames (a header claiming more frames than the pixel data holds)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if center is not None:
        ds.WindowCenter, ds.WindowWidth = center, width
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    ds.save_as(path, enforce_file_format=True)
    if not preamble:  # legacy files without the 128-byte preamble and 'DICM'
        path.write_bytes(path.read_bytes()[132:])
    return path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_zeros(width: int, height: int, *, bit_depth: int = 8, colour: int = 0) -> bytes:
    """A valid all-black PNG of any size, its rows streamed through zlib (never held in memory)."""
    spp = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    row = b"\0" * (1 + width * spp * bit_depth // 8)  # filter byte + samples
    z, parts = zlib.compressobj(9), []
    for _ in range(height):
        parts.append(z.compress(row))
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    body = _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def nifti_header(shape: tuple[int, ...], dtype=np.uint8, *, version: int = 2) -> bytes:
    """A NIfTI-1 (352 bytes) or NIfTI-2 (544 bytes) single-file header claiming ``shape``, no voxel data."""
    hdr = (nib.Nifti2Header if version == 2 else nib.Nifti1Header)()
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(shape)
    hdr["magic"] = b"n+2" if version == 2 else b"n+1"
    hdr["vox_offset"] = hdr.sizeof_hdr + 4
    return hdr.binaryblock + b"\0" * 4  # + the extension flag


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def sample_files(folder: Path) -> dict[str, Path]:
    """One small valid file per format variant (names say what they are)."""
    f: dict[str, Path] = {}

    def pil(name: str, arr: np.ndarray, **kw) -> None:
        f[name] = folder / name
        Image.fromarray(arr).save(f[name], **kw)

    pil("gray8.png", GRAY8)
    pil("rgb8.png", RGB8)
    pil("rgba8.png", RGBA8)
    pil("rgb.bmp", RGB8)
    pil("rgb.jpg", RGB8, quality=95)
    f["gray16.png"] = folder / "gray16.png"
    cv2.imwrite(str(f["gray16.png"]), GRAY16)
    f["rgb16.png"] = folder / "rgb16.png"
    cv2.imwrite(str(f["rgb16.png"]), RGB16[..., ::-1])  # OpenCV writes BGR
    f["u16.tif"] = folder / "u16.tif"
    tifffile.imwrite(f["u16.tif"], GRAY16)
    f["ct.dcm"] = write_dicom(folder / "ct.dcm", GRAY16 % 4096, bits_stored=12)
    f["vol.nii.gz"] = folder / "vol.nii.gz"
    nib.save(nib.Nifti1Image(RNG.random((H, W, 3)).astype(np.float32), np.eye(4)), f["vol.nii.gz"])
    return f


def zlib_zeros(n: int, *, raw: bool = False) -> bytes:
    """``n`` zero bytes through zlib (``raw``: bare deflate), streamed in 1 MiB pieces."""
    z, parts, block = zlib.compressobj(9, zlib.DEFLATED, -15 if raw else 15), [], b"\0" * (1 << 20)
    for start in range(0, n, len(block)):
        parts.append(z.compress(block[: n - start]))
    parts.append(z.flush())
    return b"".join(parts)


def patch_tiff(data: bytes, **values: int) -> bytes:
    """``data`` with single-valued tags of its first page (by name) set to ``values``."""
    out = bytearray(data)
    with tifffile.TiffFile(io.BytesIO(data)) as t:
        tags = t.pages[0].tags
        for name, v in values.items():
            tag = tags[name]
            assert tag.count == 1, name
            struct.pack_into({3: "<H", 4: "<I"}[int(tag.dtype)], out, tag.valueoffset, v)
    return bytes(out)


def tiff_planes_claim(planes: int, side: int) -> bytes:
    """A zlib TIFF of ``planes`` float64 planes whose header claims ``side`` x ``side`` (data for 64 x 64)."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((planes, 64, 64)), photometric="minisblack", planarconfig="separate",
                     compression="zlib", rowsperstrip=64)  # fmt: skip
    return patch_tiff(buf.getvalue(), ImageWidth=side, ImageLength=side, RowsPerStrip=side)


def tiff_strip_bomb(inflated: int) -> bytes:
    """An 8 x 8 zlib TIFF whose one strip inflates to ``inflated`` bytes (it needs 64)."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((8, 8), np.uint8), compression="zlib")
    small, bomb = buf.getvalue(), zlib_zeros(inflated)
    out = patch_tiff(small, StripOffsets=len(small), StripByteCounts=len(bomb))
    return out + bomb


def jpeg_claim(width: int, height: int) -> bytes:
    """A small RGB JPEG whose frame header (SOF0) claims ``width`` x ``height``."""
    buf = io.BytesIO()
    Image.fromarray(RGB8).save(buf, "JPEG")
    out = bytearray(buf.getvalue())
    sof = out.index(b"\xff\xc0")
    struct.pack_into(">HH", out, sof + 5, height, width)
    return bytes(out)


def bmp_claim(width: int, height: int) -> bytes:
    """A small 24-bit BMP whose info header claims ``width`` x ``height``."""
    buf = io.BytesIO()
    Image.fromarray(RGB8).save(buf, "BMP")
    out = bytearray(buf.getvalue())
    struct.pack_into("<ii", out, 18, width, height)
    return bytes(out)


def dicom_deflated(inflated: int) -> bytes:
    """A DICOM file in Deflated Explicit VR Little Endian whose dataset inflates to ``inflated`` bytes."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    fp = DicomBytesIO()
    fp.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    return fp.getvalue() + zlib_zeros(inflated, raw=True)


def tiff_ifd_loop(n: int) -> bytes:
    """A small TIFF followed by ``n`` empty image directories chained in a loop back to the first of them."""
    data = bytearray(_tiff_gray8())
    first = struct.unpack_from("<I", data, 4)[0]
    next_at = first + 2 + 12 * struct.unpack_from("<H", data, first)[0]
    base = len(data)
    struct.pack_into("<I", data, next_at, base)
    for i in range(n):
        data += struct.pack("<HI", 0, base + 6 * ((i + 1) % n))
    return bytes(data)


def _tiff_gray8() -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, GRAY8)
    return buf.getvalue()
