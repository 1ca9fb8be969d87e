"""Per-volume output files on the input's own grid: NIfTI mask (uint8) and anomaly map (float32) with the
input's affine and header, and for DICOM input a DICOM SEG (highdicom) referencing the source series.

A mask written here overlays its input exactly in 3D Slicer, ITK-SNAP or FSLeyes: same shape, same affine
(sform and qform, with the input's codes), no reorientation. Everything is written atomically.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path
from typing import Any

import numpy as np

from imganom.data.volumes import Volume
from imganom.utils.files import atomic_write_bytes
from imganom.utils.version import __version__

SEG_LABEL = "anomaly"


def nifti_bytes(data: np.ndarray, like: Volume, *, gz: bool = True) -> bytes:
    """A NIfTI file holding ``data`` (X, Y, Z) on ``like``'s grid: its header (NIfTI input: dimensions,
    units, sform/qform codes, intent and scaling reset) and exactly its affine."""
    import nibabel as nib

    if data.shape[:3] != like.shape:
        raise ValueError(f"data {data.shape} is not on the volume's grid {like.shape}")
    header = like.header
    if isinstance(header, nib.Nifti1Header):  # Nifti2Header is a subclass
        img: Any = (nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image)(
            data, like.affine, header=header.copy()
        )
        sform, scode = header.get_sform(coded=True)
        qform, qcode = header.get_qform(coded=True)
        img.set_sform(like.affine if sform is None else sform, code=int(scode) or 2)  # 2: aligned
        img.set_qform(qform, code=int(qcode) if qform is not None else 0)
    else:  # DICOM input: a fresh header in scanner coordinates
        img = nib.Nifti1Image(data, like.affine)
        img.header.set_xyzt_units("mm", "sec")
        img.set_qform(like.affine, code=1)
        img.set_sform(like.affine, code=1)
    img.set_data_dtype(data.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = 0.0, 0.0
    img.header.set_intent("none")
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=6, mtime=0) if gz else raw


def write_nifti_like(path: Path, data: np.ndarray, like: Volume) -> None:
    """``nifti_bytes`` written atomically to ``path`` (``.nii.gz`` compressed, ``.nii`` not)."""
    atomic_write_bytes(path, nifti_bytes(data, like, gz=path.name.lower().endswith(".gz")))


def dicom_seg_bytes(mask: np.ndarray, vol: Volume, *, description: str = "imganom anomaly mask") -> bytes:
    """A binary DICOM SEG (highdicom) of ``mask`` (X, Y, Z = rows, columns, slices of ``vol``) that references
    ``vol``'s source series and, frame by frame, the source image each slice came from. One segment
    (``anomaly``: morphologically abnormal structure); empty slices are omitted by highdicom."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import ExplicitVRLittleEndian

    if vol.fmt != "dicom" or not vol.dicom:
        raise ValueError(f"{vol.id}: a DICOM SEG needs DICOM input")
    if mask.shape != vol.shape:
        raise ValueError(f"mask {mask.shape} is not on the volume's grid {vol.shape}")
    binary = (np.asarray(mask) > 0).astype(np.uint8)
    multi = len(vol.dicom) == 1 and len(vol.frames) > 1
    if multi:  # one multi-frame source: frames in the source's own order
        pixels = np.zeros((len(vol.frames), *vol.shape[:2]), np.uint8)
        for k, (_, f) in enumerate(vol.frames):
            pixels[f] = binary[:, :, k]
        sources = list(vol.dicom)
    else:  # single-frame sources: one frame per source image, in slice order
        pixels = np.moveaxis(binary, 2, 0)
        sources = [vol.dicom[s] for s, _ in vol.frames]
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEG_LABEL,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.MorphologicallyAbnormalStructure,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="imganom", version=__version__, family=codes.DCM.ArtificialIntelligence
        ),
    )
    first = sources[0]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=hd.UID(),
        series_number=int(first.get("SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="imganom",
        manufacturer_model_name="imganom",
        software_versions=__version__,
        device_serial_number="0",
        series_description=description,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=True,
    )
    buf = io.BytesIO()
    seg.save_as(buf)
    return buf.getvalue()


def write_dicom_seg(path: Path, mask: np.ndarray, vol: Volume) -> None:
    """``dicom_seg_bytes`` written atomically to ``path``."""
    atomic_write_bytes(path, dicom_seg_bytes(mask, vol))
