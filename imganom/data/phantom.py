"""A synthetic head-like MRI phantom with spherical lesions, for tests and the README's worked example.

``head_phantom`` builds one volume on a known grid (anisotropic spacing, an affine with a flipped axis and an
origin, as scanners write them): a scalp shell, a textured brain ellipsoid, two ventricles and optional
spherical lesions, in several sequences (T1, T2, FLAIR contrasts). ``write_nifti`` and
``write_dicom_series`` save it the way scanners and converters do (int16 NIfTI; one uint16 MR file per slice
with ImagePositionPatient / ImageOrientationPatient / PixelSpacing). ``make_dataset`` writes the medical
evaluation layout (``normal/``, ``abnormal/``, ``masks/``) plus 2-D training slices of the normal volumes
(``train/good``, an MVTec layout ``imganom train`` reads)::

    python -m imganom.data.phantom OUT [--normal 6] [--abnormal 4] [--size 64] [--slices 16]
"""

from __future__ import annotations

import argparse
import gzip
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

SEQUENCES = ("t1", "t2", "flair")
# tissue -> intensity per sequence (0..1): background, scalp, brain, ventricle (CSF), lesion
_CONTRAST = {
    "t1": (0.0, 0.85, 0.55, 0.15, 0.35),
    "t2": (0.0, 0.45, 0.45, 0.95, 0.85),
    "flair": (0.0, 0.40, 0.45, 0.08, 0.95),
}
MAX_VALUE = 1000  # stored intensities are 0..MAX_VALUE (int16 NIfTI, uint16 DICOM)


@dataclass(frozen=True)
class Sphere:
    """A spherical lesion: centre in voxel indices (i, j, k), radius in mm."""

    center: tuple[float, float, float]
    radius_mm: float


@dataclass
class Phantom:
    """One phantom volume: ``images[seq]`` int16 (X, Y, Z), the lesion mask, the affine (voxel -> RAS mm)."""

    images: dict[str, np.ndarray]
    lesion_mask: np.ndarray  # uint8 (X, Y, Z): 0 background, k = lesion k (1-based)
    affine: np.ndarray
    spacing: tuple[float, float, float]
    lesions: list[Sphere] = field(default_factory=list)

    def lesion_volume_mm3(self, k: int) -> float:
        """Volume of lesion ``k`` (1-based) as voxelised: voxel count x voxel volume."""
        return float((self.lesion_mask == k).sum() * np.prod(self.spacing))

    def stacked(self, sequences: Sequence[str] = SEQUENCES) -> np.ndarray:
        """(X, Y, Z, C) int16, the sequences as channels (a 4-D NIfTI)."""
        return np.stack([self.images[s] for s in sequences], axis=-1)


def phantom_affine(spacing: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """A scanner-like affine: x flipped (LAS-like storage), centred on the origin, anisotropic spacing."""
    a = np.diag([-float(spacing[0]), float(spacing[1]), float(spacing[2]), 1.0])
    half = [s * (n - 1) / 2 for s, n in zip(spacing, shape)]
    a[:3, 3] = [half[0], -half[1], -half[2]]
    return a


def _ellipsoid(grid: tuple[np.ndarray, ...], center: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0


def head_phantom(
    shape: tuple[int, int, int] = (64, 64, 16),
    spacing: tuple[float, float, float] = (1.0, 1.0, 3.0),
    lesions: Sequence[Sphere] = (),
    sequences: Sequence[str] = SEQUENCES,
    seed: int = 0,
    noise: float = 0.02,
) -> Phantom:
    """A head-like volume; geometry is in mm so that anisotropic spacing gives round shapes in space."""
    rng = np.random.default_rng(seed)
    sx, sy, sz = spacing
    mm = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing)), indexing="ij")
    c = [(n - 1) * s / 2 for n, s in zip(shape, spacing)]
    ext = [n * s / 2 for n, s in zip(shape, spacing)]
    jitter = 1.0 + 0.04 * rng.standard_normal(3)
    head = _ellipsoid(mm, c, [0.9 * e * j for e, j in zip(ext, jitter)])
    brain = _ellipsoid(mm, c, [0.75 * e * j for e, j in zip(ext, jitter)])
    vent = np.zeros(shape, bool)
    for side in (-1, 1):
        vc = [c[0] + side * 0.18 * ext[0], c[1] - 0.05 * ext[1], c[2]]
        vent |= _ellipsoid(mm, vc, [0.1 * ext[0], 0.3 * ext[1], 0.3 * ext[2]])
    tissue = np.where(brain, 2, np.where(head, 1, 0)).astype(np.uint8)
    tissue[vent & brain] = 3
    labels = np.zeros(shape, np.uint8)
    for k, sph in enumerate(lesions, 1):
        centre = [ci * s for ci, s in zip(sph.center, spacing)]
        labels[_ellipsoid(mm, centre, [sph.radius_mm] * 3)] = k
    tissue[labels > 0] = 4
    texture = ndimage.gaussian_filter(rng.standard_normal(shape), (2.0 / sx, 2.0 / sy, 2.0 / sz))
    texture /= max(float(np.abs(texture).max()), 1e-6)
    images = {}
    for s in sequences:
        level = np.asarray(_CONTRAST[s], np.float64)[tissue]
        level *= 1.0 + 0.08 * texture * (tissue >= 2)
        level += noise * rng.standard_normal(shape) * (tissue > 0)
        images[s] = np.rint(np.clip(level, 0.0, 1.0) * MAX_VALUE).astype(np.int16)
    return Phantom(images, labels, phantom_affine(spacing, shape), tuple(spacing), list(lesions))


def random_lesions(shape: Sequence[int], n: int, rng: np.random.Generator) -> list[Sphere]:
    """``n`` spheres of 3-6 mm radius centred in the middle half of the volume (inside the brain)."""
    out = []
    for _ in range(n):
        centre = tuple(float((0.5 + rng.uniform(-0.25, 0.25)) * (s - 1)) for s in shape)
        out.append(Sphere(centre, float(rng.uniform(3.0, 6.0))))
    return out


# ------------------------------------------------------------------------------------------------ writers


def write_nifti(path: str | Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Write ``data`` as NIfTI-1 with ``affine`` as both sform and qform (code 1, scanner), units mm."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data), affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = img.to_bytes()
    path.write_bytes(gzip.compress(raw, 6) if path.name.endswith(".gz") else raw)
    return path


def lps_geometry(affine: np.ndarray) -> tuple[list[float], list[float], np.ndarray]:
    """DICOM plane geometry of a (rows, cols, slices) array with RAS ``affine``: ImageOrientationPatient
    (row direction, column direction), PixelSpacing (between rows, between columns) and the LPS affine."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, float)
    d_row = np.linalg.norm(lps[:3, 0])  # step along axis 0 = between rows
    d_col = np.linalg.norm(lps[:3, 1])
    iop = [*(lps[:3, 1] / d_col), *(lps[:3, 0] / d_row)]  # direction of increasing column, then row
    return [float(v) for v in iop], [float(d_row), float(d_col)], lps


def write_dicom_series(
    folder: str | Path,
    data: np.ndarray,
    affine: np.ndarray,
    *,
    series_uid: str | None = None,
    study_uid: str | None = None,
    patient_id: str = "PHANTOM",
    description: str = "phantom",
) -> list[Path]:
    """One single-frame MR Image Storage file per slice (``data`` (rows, cols, slices) >= 0) under ``folder``,
    file names ``IM0001.dcm``... in slice order; returns the paths."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    iop, spacing, lps = lps_geometry(affine)
    series_uid, study_uid = series_uid or generate_uid(), study_uid or generate_uid()
    frame_uid = generate_uid()
    thickness = float(np.linalg.norm(lps[:3, 2]))
    paths = []
    for k in range(data.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.PatientID, ds.PatientName = patient_id, f"{patient_id}^"
        ds.PatientSex, ds.PatientBirthDate = "O", ""
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20260101", "120000", ""
        ds.ReferringPhysicianName = ""
        ds.StudyID, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "1", "MR", 1, k + 1
        ds.SeriesDescription, ds.Manufacturer, ds.PositionReferenceIndicator = description, "imganom", ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "2D"
        ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength, ds.MagneticFieldStrength = 10, 500, 1, 1.5
        ds.ImagePositionPatient = [float(v) for v in (lps @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient, ds.PixelSpacing = iop, spacing
        ds.SliceThickness, ds.SliceLocation = thickness, float((lps @ [0, 0, k, 1])[2])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(data.shape[0]), int(data.shape[1])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(data[:, :, k], dtype=np.uint16).tobytes()
        path = folder / f"IM{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def make_dataset(
    root: str | Path,
    n_normal: int = 6,
    n_abnormal: int = 4,
    shape: tuple[int, int, int] = (64, 64, 16),
    spacing: tuple[float, float, float] = (1.0, 1.0, 3.0),
    sequences: Sequence[str] = SEQUENCES,
    seed: int = 0,
    min_tissue: float = 0.2,
) -> Path:
    """The medical layout under ``root``: ``normal/<id>.nii.gz``, ``abnormal/<id>.nii.gz`` with
    ``masks/<id>.nii.gz`` (4-D NIfTI, the sequences as channels; one sequence: 3-D), and ``train/good``
    (2-D slices of the normal volumes with at least ``min_tissue`` of the slice in the head, for training)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for i in range(n_normal + n_abnormal):
        abnormal = i >= n_normal
        lesions = random_lesions(shape, int(rng.integers(1, 3)), rng) if abnormal else []
        ph = head_phantom(shape, spacing, lesions, sequences, seed=seed * 1000 + i)
        vol = ph.stacked(sequences) if len(sequences) > 1 else ph.images[sequences[0]]
        name = f"case{i:03d}"
        write_nifti(root / ("abnormal" if abnormal else "normal") / f"{name}.nii.gz", vol, ph.affine)
        if abnormal:
            write_nifti(root / "masks" / f"{name}.nii.gz", (ph.lesion_mask > 0).astype(np.uint8), ph.affine)
            continue
        for k in range(shape[2]):
            if (ph.images[sequences[0]][:, :, k] > 0).mean() >= min_tissue:
                slab = vol[:, :, k : k + 1]
                write_nifti(root / "train" / "good" / f"{name}_z{k:03d}.nii.gz", slab, ph.affine)
    return root


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m imganom.data.phantom OUT``: write a phantom dataset (see ``make_dataset``)."""
    ap = argparse.ArgumentParser(prog="python -m imganom.data.phantom", description=make_dataset.__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--normal", type=int, default=6)
    ap.add_argument("--abnormal", type=int, default=4)
    ap.add_argument("--size", type=int, default=64, help="in-plane size (voxels, 1 mm)")
    ap.add_argument("--slices", type=int, default=16, help="slices (3 mm)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    root = make_dataset(a.out, a.normal, a.abnormal, (a.size, a.size, a.slices), seed=a.seed)
    print(f"phantom dataset written to {root}")


if __name__ == "__main__":
    main()
