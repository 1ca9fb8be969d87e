"""Image I/O: any supported file becomes a float32 CHW array in [0, 1] plus an ``ImageMeta``.

One reader per format behind one registry (``base.READERS``), detected by signature first and by extension
second: PNG/JPEG/BMP (``pil``: Pillow; 16-bit PNG via OpenCV so all 16 bits survive), TIFF (``tiff``:
tifffile), DICOM (``dicom``: pydicom) and NIfTI (``nifti``: nibabel, ``.nii``/``.nii.gz``). 3-D NIfTI volumes
and multi-frame DICOM are read as 2-D slices (``slice_index`` / ``iter_items``).

Every failure is an ``ImageReadError`` naming the file and the reason; library exceptions never escape.
Budgets are checked from the header before pixel data is decoded: ``max_pixels`` (H x W), ``max_bytes``
(H x W x channels x bytes per sample), ``MAX_SLICES`` items per file, ``MIN_SIDE`` pixels a side, and no
header may claim more pixel data than its file can hold. Float pixels that are NaN/Inf are an error.

Pixels are returned as stored: no EXIF rotation, no NIfTI reorientation (array axes 0, 1 = H, W; the
affine is ignored). Limits of each format are in its module's docstring.
"""

# isort: off
from imganom.data.readers import pil, tiff, dicom, nifti  # noqa: F401  - the formats, in detection order
# isort: on
from imganom.data.readers.api import (
    count_slices,
    iter_items,
    open_decoded,
    read_decoded,
    read_image,
    read_image_bytes,
    read_options,
    split_item_id,
)
from imganom.data.readers.base import (
    MAX_SLICES,
    MIN_SIDE,
    READERS,
    Decoded,
    ImageMeta,
    ImageReader,
    ImageReadError,
)
from imganom.data.readers.intensity import normalize_intensity, to_uint8_preview

IMAGE_EXTENSIONS: tuple[str, ...] = tuple(s for r in READERS.values() for s in r.suffixes)

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_SLICES",
    "MIN_SIDE",
    "READERS",
    "Decoded",
    "ImageMeta",
    "ImageReadError",
    "ImageReader",
    "count_slices",
    "iter_items",
    "normalize_intensity",
    "open_decoded",
    "read_decoded",
    "read_image",
    "read_image_bytes",
    "read_options",
    "split_item_id",
    "to_uint8_preview",
]
