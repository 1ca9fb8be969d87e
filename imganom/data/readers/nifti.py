"""NIfTI-1/2 through nibabel (``.nii``, ``.nii.gz``): 3-D volumes are read one 2-D slice at a time.

Array axes 0, 1 are H, W (the affine is ignored, no reorientation); axis 2 is the slice; a 4th axis of up to
``MAX_PLANES`` volumes is read as channels. A header must not claim more slices than ``MAX_SLICES`` nor more
voxel data than the file can hold (uncompressed: its size; gzip: its size times deflate's largest ratio).
Not supported: RGB/structured datatypes and 4-D series with more than ``MAX_PLANES`` volumes.
"""

from __future__ import annotations

import gzip
from typing import BinaryIO

import numpy as np

from imganom.data.readers import base
from imganom.data.readers.base import ImageReadError


@base.register
class NiftiReader(base.ImageReader):
    fmt, label, suffixes = "nifti", "NIfTI", (".nii", ".nii.gz")

    def sniff(self, head: bytes) -> bool:
        if head[:2] == b"\x1f\x8b":
            return True  # gzip: .nii.gz is the only compressed container we read
        return head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] == b"n+2\x00"

    def open(self, fh: BinaryIO, src: base.Source, head: bytes, limits: base.Limits) -> base.Decoded:
        import nibabel as nib

        name, gz = src.name, head[:2] == b"\x1f\x8b"
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
        if c > base.MAX_PLANES:
            raise ImageReadError(name, f"NIfTI shape {shape}: last axis of {c} volumes is not a channel axis "
                                 f"(at most {base.MAX_PLANES}); 4-D series are not supported")  # fmt: skip
        base.check_slices(name, n)
        claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize + int(getattr(img.dataobj, "offset", 0))
        what = f"voxel data of shape {shape} ({dtype})"
        if gz:
            hint = f" once inflated (deflate expands at most {base.DEFLATE_MAX_RATIO} times)"
            base.check_claim(name, what, claimed, src.size * base.DEFLATE_MAX_RATIO, hint)
        else:
            base.check_claim(name, what, claimed, src.size)

        def read(k: int) -> tuple[np.ndarray, str]:
            arr = np.asanyarray(img.dataobj[(all_, all_) if tail is None else (all_, all_, k, *tail)])
            arr = arr.reshape(shape[0], shape[1], c)
            if not arr.dtype.isnative:
                arr = arr.astype(arr.dtype.newbyteorder("="))
            return arr, dtype.name

        return base.Decoded("nifti", (shape[0], shape[1]), n, read, channels=c, itemsize=dtype.itemsize)
