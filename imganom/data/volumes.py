"""Volumes as volumes: a NIfTI file, several NIfTI sequences of one subject, a DICOM series or a multi-frame
DICOM becomes one ``Volume`` that keeps its geometry (affine, spacing, orientation) and its sources.

Nothing is reoriented or resampled: ``Volume.data`` is the stored array (X, Y, Z, C) (for DICOM: rows,
columns, slices sorted along the slice normal, C samples) and ``Volume.affine`` maps its voxel indices to
patient coordinates in mm, RAS+ as NIfTI stores them (DICOM's LPS is flipped in x and y). Slices are taken
along any axis of the stored array (``slice_item``) and normalised by the same read pipeline as 2-D images.

Checks, each an ``ImageReadError`` naming the file(s): a DICOM series must share orientation, size and
spacing, with slices evenly spaced along the normal (a gap is a missing slice, equal positions a duplicate);
multi-sequence input must share shape and affine (within ``AFFINE_TOL`` mm); the whole volume must fit
``MAX_VOLUME_BYTES``. Multi-frame DICOM needs per-frame positions (enhanced/legacy-converted objects).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imganom.data.readers import (
    Decoded,
    ImageMeta,
    ImageReadError,
    count_slices,
    open_decoded,
    read_decoded,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from imganom.data.readers.api import ReadOptions

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")
AFFINE_TOL = 1e-3  # mm (and direction cosines): geometries closer than this are the same grid
SPACING_TOL = 0.1  # a slice step may differ from the series' usual step by this fraction
MAX_VOLUME_BYTES = 4 << 30  # raw voxel bytes of one volume held in memory
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # DICOM LPS <-> NIfTI RAS (its own inverse)


@dataclass
class Volume:
    """One volume: the stored voxels (X, Y, Z, C), their geometry and where they came from."""

    id: str
    data: np.ndarray  # (X, Y, Z, C) raw values as stored (DICOM: rescaled), native byte order
    stored: str  # stored dtype name (the 'dtype' intensity rule uses it)
    affine: np.ndarray  # (4, 4) voxel index -> patient mm, RAS+
    fmt: str  # 'nifti' | 'dicom'
    sources: list[Path]
    header: Any = None  # nibabel header of the (first) NIfTI source
    dicom: list[Any] = field(default_factory=list)  # DICOM: source datasets (no pixel data)
    frames: list[tuple[int, int]] = field(default_factory=list)  # DICOM: slice k <- (dataset, frame), 0-based
    window: tuple[float, float] | None = None  # DICOM VOI window (intensity mode 'dtype')
    window_error: str | None = None
    invert: bool = False  # DICOM MONOCHROME1

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.data.shape[:3])  # type: ignore[return-value]

    @property
    def channels(self) -> int:
        return int(self.data.shape[3])

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the three stored axes (the affine's column norms)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def voxel_mm3(self) -> float:
        """Volume of one voxel in mm^3 (|det| of the affine's linear part: exact for oblique grids too)."""
        return float(abs(np.linalg.det(self.affine[:3, :3])))

    @property
    def orientation(self) -> str:
        """Axis codes of the stored axes (e.g. ``LAS``: axis 0 points to the patient's left); reported, never
        applied."""
        import nibabel as nib

        return "".join(nib.orientations.aff2axcodes(self.affine))

    def n_slices(self, axis: int) -> int:
        return self.shape[check_axis(axis)]

    def slice(self, axis: int, k: int) -> np.ndarray:
        """Slice ``k`` along stored ``axis`` as (H, W, C): the two other axes in stored order, no copy."""
        return np.take(self.data, k, axis=check_axis(axis))

    def geometry(self, axis: int) -> dict[str, Any]:
        """What results rows record about the grid."""
        return {
            "shape": list(self.shape),
            "channels": self.channels,
            "spacing_mm": [round(v, 6) for v in self.spacing],
            "orientation": self.orientation,
            "affine": np.round(self.affine, 6).tolist(),
            "axis": axis,
            "format": self.fmt,
        }


def check_axis(axis: int) -> int:
    if axis not in (0, 1, 2):
        raise ValueError(f"slice axis must be 0, 1 or 2 (an axis of the stored array), got {axis}")
    return axis


def slice_item(
    vol: Volume, axis: int, k: int, **options: Unpack[ReadOptions]
) -> tuple[np.ndarray, ImageMeta]:
    """Slice ``k`` along ``axis`` as the model's normalised CHW float32, through the same pipeline
    (intensity, channels, budgets) as ``read_image`` on a 2-D file; a NIfTI along axis 2 gives exactly what
    ``read_image(path, slice_index=k)`` gives."""
    h, w = (s for a, s in enumerate(vol.shape) if a != axis)
    dec = Decoded(
        vol.fmt, (h, w), vol.n_slices(axis), lambda j: (vol.slice(axis, j), vol.stored),
        channels=vol.channels, itemsize=vol.data.dtype.itemsize, invert=vol.invert,
        dtype_window=vol.window, window_error=vol.window_error,
    )  # fmt: skip
    return read_decoded(vol.id, dec, k, **options)


def _check_bytes(name: str, shape: Sequence[int], itemsize: int) -> None:
    need = int(np.prod([int(n) for n in shape], dtype=object)) * itemsize
    if need > MAX_VOLUME_BYTES:
        raise ImageReadError(name, f"volume {tuple(shape)} needs {need} bytes, more than {MAX_VOLUME_BYTES}")


# --------------------------------------------------------------------------------------------------- NIfTI


def read_nifti(path: str | Path, volume_id: str | None = None) -> Volume:
    """A NIfTI file as a volume: 2-D -> one slice, 3-D, 4-D (4th axis = channels) or 5-D (X, Y, Z, 1, C)."""
    import nibabel as nib

    path = Path(path)
    name = str(path)
    count_slices(path)  # the header checks and budgets of the slice reader (raises ImageReadError)
    try:
        img = nib.load(str(path))
        shape = tuple(int(n) for n in img.shape)
        if len(shape) == 5 and shape[3] == 1:
            shape4 = (*shape[:3], shape[4])
        elif 2 <= len(shape) <= 4:
            shape4 = (*shape, 1, 1)[:4]
        else:
            raise ImageReadError(name, f"unsupported NIfTI shape {shape} (expected 2-D to 4-D)")
        _check_bytes(name, shape4, img.get_data_dtype().itemsize)
        data = np.asanyarray(img.dataobj).reshape(shape4)
    except ImageReadError:
        raise
    except Exception as e:  # noqa: BLE001 - nibabel's errors name no file
        raise ImageReadError(name, f"cannot read NIfTI volume: {type(e).__name__}: {e}") from e
    if not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise ImageReadError(name, "contains NaN/Inf voxel values")
    return Volume(
        volume_id or path.name, data, img.get_data_dtype().name, np.asarray(img.affine, np.float64), "nifti",
        [path], header=img.header,
    )  # fmt: skip


def geometry_mismatch(a: Volume, b: Volume) -> str | None:
    """Why two volumes are not on the same grid (shape, spacing, orientation, origin), or None."""
    if a.shape != b.shape:
        return f"shape {a.shape} vs {b.shape}"
    if np.allclose(a.affine, b.affine, atol=AFFINE_TOL, rtol=0):
        return None
    sa, sb = np.round(a.spacing, 4).tolist(), np.round(b.spacing, 4).tolist()
    if sa != sb:
        return f"voxel spacing {sa} vs {sb} mm"
    if a.orientation != b.orientation or not np.allclose(a.affine[:3, :3], b.affine[:3, :3], atol=AFFINE_TOL):
        return f"orientation {a.orientation} vs {b.orientation} (direction cosines differ)"
    oa, ob = np.round(a.affine[:3, 3], 3).tolist(), np.round(b.affine[:3, 3], 3).tolist()
    return f"origin {oa} vs {ob} mm"


def stack_channels(vols: Sequence[Volume], volume_id: str | None = None) -> Volume:
    """Sequences of one subject (T1, T2, FLAIR ...) as the channels of one volume, in the order given; they
    must share the grid: no resampling, a mismatch is an error naming both files and what differs."""
    if not vols:
        raise ValueError("no sequences to stack")
    first = vols[0]
    for v in vols[1:]:
        why = geometry_mismatch(first, v)
        if why:
            raise ImageReadError(
                str(v.sources[0]), f"geometry does not match {first.sources[0]} ({why}); sequences are "
                "stacked as channels only on the same grid (imganom does not resample)",
            )  # fmt: skip
    stored = {v.stored for v in vols}
    data = np.concatenate([v.data for v in vols], axis=3)
    kind = stored.pop() if len(stored) == 1 else data.dtype.name
    sources = [p for v in vols for p in v.sources]
    return dataclasses.replace(first, id=volume_id or first.id, data=data, stored=kind, sources=sources)


# --------------------------------------------------------------------------------------------------- DICOM


def _floats(ds: Any, keyword: str, n: int, name: str) -> np.ndarray:
    v = ds.get(keyword)
    try:
        arr = np.asarray([float(x) for x in v], np.float64)
    except (TypeError, ValueError):
        arr = np.zeros(0)
    if arr.shape != (n,) or not np.isfinite(arr).all():
        raise ImageReadError(name, f"DICOM {keyword} missing or invalid ({v!r}); a volume needs its geometry")
    return arr


@dataclass
class _Plane:
    """Geometry of one frame: position (IPP), orientation (IOP), pixel spacing; where its pixels are."""

    name: str
    ipp: np.ndarray
    iop: np.ndarray
    spacing: np.ndarray
    source: int  # index of the dataset
    frame: int  # frame within it (0-based)


def _assemble(planes: list[_Plane], what: str) -> tuple[list[_Plane], np.ndarray]:
    """Planes sorted along the slice normal and the LPS affine of the stack; refuses mixed orientation or
    spacing, duplicated positions and uneven steps (a missing slice), naming the files."""
    p0 = planes[0]
    for p in planes[1:]:
        if not np.allclose(p.iop, p0.iop, atol=1e-4):
            raise ImageReadError(p.name, f"{what}: ImageOrientationPatient {p.iop.tolist()} differs from "
                                 f"{p0.iop.tolist()} in {p0.name}; not one volume")  # fmt: skip
        if not np.allclose(p.spacing, p0.spacing, atol=1e-4):
            raise ImageReadError(p.name, f"{what}: PixelSpacing {p.spacing.tolist()} differs from "
                                 f"{p0.spacing.tolist()} in {p0.name}")  # fmt: skip
    row, col = p0.iop[:3], p0.iop[3:]
    normal = np.cross(row, col)
    planes = sorted(planes, key=lambda p: float(p.ipp @ normal))
    pos = np.array([float(p.ipp @ normal) for p in planes])
    steps = np.diff(pos)
    for i, d in enumerate(steps):
        if d < AFFINE_TOL:
            a, b = planes[i], planes[i + 1]
            raise ImageReadError(b.name, f"{what}: duplicated slice position {pos[i]:.3f} mm along the "
                                 f"normal (same as {a.name}); remove the duplicate")  # fmt: skip
    if len(steps):
        usual = float(np.median(steps))
        for i, d in enumerate(steps):
            if abs(d - usual) > SPACING_TOL * usual:
                a, b = planes[i], planes[i + 1]
                kind = f"missing slice(s): a gap of {d:.3f} mm" if d > usual else f"uneven step of {d:.3f} mm"
                raise ImageReadError(b.name, f"{what}: {kind} between {a.name} and {b.name} (the other "
                                     f"slices are {usual:.3f} mm apart); the series is incomplete or "
                                     "irregular")  # fmt: skip
        step = (planes[-1].ipp - planes[0].ipp) / (len(planes) - 1)
    else:
        step = normal
    affine = np.eye(4)
    affine[:3, 0] = col * p0.spacing[0]  # axis 0 = rows: moving down a column
    affine[:3, 1] = row * p0.spacing[1]  # axis 1 = columns: moving along a row
    affine[:3, 2] = step
    affine[:3, 3] = planes[0].ipp
    return planes, affine


def read_dicom_header(path: Path) -> Any:
    """The dataset of a DICOM file without its pixel data (ImageReadError naming the file on failure)."""
    import pydicom

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception as e:  # noqa: BLE001
        raise ImageReadError(str(path), f"not a readable DICOM file: {type(e).__name__}: {e}") from e


def _frame_planes(ds: Any, index: int, name: str) -> list[_Plane]:
    """One plane per frame of a dataset: single-frame from its own tags, multi-frame from its functional
    groups (per-frame positions, shared or per-frame orientation and spacing)."""
    n = int(ds.get("NumberOfFrames", 1) or 1)
    if n == 1 and "PerFrameFunctionalGroupsSequence" not in ds:
        return [_Plane(name, _floats(ds, "ImagePositionPatient", 3, name),
                       _floats(ds, "ImageOrientationPatient", 6, name),
                       _floats(ds, "PixelSpacing", 2, name), index, 0)]  # fmt: skip
    shared = ds.get("SharedFunctionalGroupsSequence", [None])[0]
    per = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per) != n:
        raise ImageReadError(name, f"multi-frame DICOM with {n} frames has {len(per)} per-frame geometry "
                             "items; a volume needs each frame's ImagePositionPatient")  # fmt: skip

    def group(i: int, seq: str) -> Any:
        for g in (per[i], shared):
            if g is not None and seq in g:
                return g[seq][0]
        raise ImageReadError(name, f"frame {i + 1}: no {seq} (needed for the volume's geometry)")

    return [
        _Plane(f"{name} frame {i + 1}",
               _floats(group(i, "PlanePositionSequence"), "ImagePositionPatient", 3, name),
               _floats(group(i, "PlaneOrientationSequence"), "ImageOrientationPatient", 6, name),
               _floats(group(i, "PixelMeasuresSequence"), "PixelSpacing", 2, name), index, i)
        for i in range(n)
    ]  # fmt: skip


def read_dicom_volume(paths: Sequence[str | Path], volume_id: str | None = None) -> Volume:
    """A DICOM series (single-frame files of one SeriesInstanceUID) or one multi-frame file as a volume,
    slices sorted by ImagePositionPatient along the normal; ``Volume.frames``: each slice's source."""
    paths = [Path(p) for p in paths]
    headers = [read_dicom_header(p) for p in paths]
    uids = {str(ds.get("SeriesInstanceUID", "")) for ds in headers}
    what = f"DICOM series {sorted(uids)[0] or '(no SeriesInstanceUID)'}"
    if len(uids) > 1:
        raise ImageReadError(str(paths[0]), f"files of several series given as one volume: {sorted(uids)}")
    planes = [pl for i, (p, ds) in enumerate(zip(paths, headers)) for pl in _frame_planes(ds, i, str(p))]
    if len(paths) > 1 and len(planes) != len(paths):
        raise ImageReadError(str(paths[0]), f"{what}: mixes multi-frame and single-frame files")
    planes, lps = _assemble(planes, what)
    slices: list[np.ndarray] = []
    stored, window, window_error, invert = "uint16", None, None, False
    for k, pl in enumerate(planes):
        path = paths[pl.source]
        with open_decoded(path, max_pixels=None, max_bytes=None) as dec:
            if k == 0:
                _check_bytes(str(path), (*dec.size, len(planes), dec.channels), dec.itemsize)
                window, window_error, invert = dec.dtype_window, dec.window_error, dec.invert
            raw, stored = dec.read(pl.frame)
        if slices and raw.shape != slices[0].shape:
            raise ImageReadError(str(path), f"{what}: slice of {raw.shape[:2]} pixels, the series has "
                                 f"{slices[0].shape[:2]}")  # fmt: skip
        slices.append(raw)
    dtype = np.result_type(*{s.dtype for s in slices})
    data = np.stack([s.astype(dtype, copy=False) for s in slices], axis=2)
    first = paths[0]
    vid = volume_id or (first.name if len(paths) == 1 else first.parent.name or str(first.parent))
    return Volume(
        vid, data, stored, _LPS @ lps, "dicom", paths, dicom=headers,
        frames=[(pl.source, pl.frame) for pl in planes], window=window, window_error=window_error,
        invert=invert,
    )  # fmt: skip


def group_dicom_series(paths: Sequence[Path]) -> tuple[dict[str, list[Path]], dict[Path, str]]:
    """Single-frame DICOM files grouped by SeriesInstanceUID (multi-frame files: one group each, keyed by
    path), in first-seen order; files whose header cannot be read are returned with the reason."""
    groups: dict[str, list[Path]] = {}
    bad: dict[Path, str] = {}
    for p in paths:
        try:
            ds = read_dicom_header(p)
        except ImageReadError as e:
            bad[p] = str(e)
            continue
        multi = int(ds.get("NumberOfFrames", 1) or 1) > 1
        key = f"file:{p}" if multi else str(ds.get("SeriesInstanceUID", "")) or f"file:{p}"
        groups.setdefault(key, []).append(p)
    return groups, bad


def find_dicom_without_extension(folder: Path, recursive: bool = True) -> list[Path]:
    """Files under ``folder`` with no extension that carry the DICOM signature (``DICM`` at byte 128), as
    PACS exports name them (``IM000001``); hidden entries and DICOMDIR are skipped, links are not followed."""
    out = []
    for base, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        for name in sorted(files):
            p = Path(base) / name
            if name.startswith(".") or "." in name or name.upper() == "DICOMDIR" or not p.is_file():
                continue
            try:
                with open(p, "rb") as fh:
                    head = fh.read(132)
            except OSError:
                continue
            if head[128:132] == b"DICM":
                out.append(p)
    return out


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def is_dicom(path: Path) -> bool:
    """A DICOM file by name: ``.dcm``/``.dicom``, or no extension (``find_dicom_without_extension``)."""
    return path.name.lower().endswith(DICOM_SUFFIXES) or "." not in path.name
