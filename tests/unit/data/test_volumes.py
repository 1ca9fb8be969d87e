"""Volumes keep their geometry: NIfTI and DICOM series read into the same grid, series and sequence checks."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from imganom.config import IntensityConfig
from imganom.data.phantom import Sphere, head_phantom, write_dicom_series, write_nifti
from imganom.data.readers import ImageReadError, read_image
from imganom.data.volumes import read_dicom_volume, read_nifti, slice_item, stack_channels

SHAPE = (32, 24, 8)  # rows differ from columns: transposes would show


@pytest.fixture(scope="module")
def phantom():
    return head_phantom(SHAPE, (1.0, 1.0, 3.0), [Sphere((16, 12, 4), 4.0)], seed=1)


@pytest.fixture(scope="module")
def series(phantom, tmp_path_factory) -> list[Path]:
    return write_dicom_series(tmp_path_factory.mktemp("dcm") / "s", phantom.images["t1"], phantom.affine)


def test_nifti_volume_keeps_affine_spacing_and_voxels(phantom, tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "t1.nii.gz", phantom.images["t1"], phantom.affine)
    vol = read_nifti(path)
    assert vol.shape == SHAPE and vol.channels == 1
    assert np.array_equal(vol.affine, phantom.affine)
    assert vol.spacing == (1.0, 1.0, 3.0) and vol.voxel_mm3 == pytest.approx(3.0)
    assert vol.orientation == "LAS"  # x flipped in the phantom's affine: reported, not applied
    assert np.array_equal(vol.data[..., 0], phantom.images["t1"])


def test_slices_match_the_2d_reader_and_other_axes_keep_stored_order(phantom, tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "all.nii.gz", phantom.stacked(), phantom.affine)
    vol = read_nifti(path)
    assert vol.channels == 3
    kw = {"intensity": IntensityConfig(mode="percentile")}
    for k in (0, 5):
        a, meta = slice_item(vol, 2, k, **kw)
        b, _ = read_image(path, slice_index=k, **kw)
        assert np.array_equal(a, b) and meta.slice == k
    x, _ = slice_item(vol, 0, 3, **kw)
    assert x.shape == (3, SHAPE[1], SHAPE[2])  # (Y, Z): no transposition, no resampling
    y, _ = slice_item(vol, 1, 3, channels=1, **kw)
    assert y.shape == (1, SHAPE[0], SHAPE[2])


def test_dicom_series_assembles_to_the_nifti_grid(phantom, series: list[Path]) -> None:
    shuffled = [series[i] for i in (3, 0, 7, 1, 5, 2, 6, 4)]  # file order must not matter
    vol = read_dicom_volume(shuffled)
    assert vol.fmt == "dicom" and vol.shape == SHAPE
    assert np.allclose(vol.affine, phantom.affine, atol=1e-6)
    assert np.array_equal(vol.data[..., 0], phantom.images["t1"])
    assert [vol.dicom[s].InstanceNumber for s, _ in vol.frames] == list(range(1, 9))


def test_dicom_geometry_matches_monai(series: list[Path]) -> None:
    """MONAI's PydicomReader (rows/columns swapped by default) sees the same voxels at the same positions."""
    pytest.importorskip("monai")
    from monai.transforms import LoadImage

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = LoadImage(reader="PydicomReader", image_only=True)(str(series[0].parent))
    vol = read_dicom_volume(series)
    ours = vol.affine[:, [1, 0, 2, 3]]  # MONAI's array is (columns, rows, slices)
    assert np.allclose(np.asarray(m.affine), ours, atol=1e-4)
    assert np.array_equal(np.asarray(m)[..., :], vol.data[..., 0].transpose(1, 0, 2))


def test_missing_slice_is_an_error_naming_the_files(series: list[Path]) -> None:
    with pytest.raises(ImageReadError, match=r"missing slice\(s\).*IM0004\.dcm and .*IM0006\.dcm"):
        read_dicom_volume([p for p in series if p.name != "IM0005.dcm"])


def test_duplicated_slice_is_an_error(series: list[Path], tmp_path: Path) -> None:
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(series[2])
    ds.SOPInstanceUID = generate_uid()
    dup = tmp_path / "copy.dcm"
    ds.save_as(dup)
    with pytest.raises(ImageReadError, match="duplicated slice position") as e:
        read_dicom_volume([*series, dup])
    assert "IM0003.dcm" in str(e.value) and "copy.dcm" in str(e.value)


def test_mixed_series_and_orientation_are_errors(phantom, series: list[Path], tmp_path: Path) -> None:
    other = write_dicom_series(tmp_path / "o", phantom.images["t2"], phantom.affine)
    with pytest.raises(ImageReadError, match="several series"):
        read_dicom_volume([*series[:4], *other[4:]])
    tilted = phantom.affine.copy()
    tilted[:3, :3] = tilted[:3, :3] @ np.array([[1, 0, 0], [0, 0.8, -0.6], [0, 0.6, 0.8]])
    rot = write_dicom_series(tmp_path / "r", phantom.images["t1"], tilted, series_uid=str(series_uid(series)))
    with pytest.raises(ImageReadError, match="ImageOrientationPatient"):
        read_dicom_volume([*series[:4], *rot[4:]])


def series_uid(paths: list[Path]) -> str:
    import pydicom

    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)


def test_multiframe_dicom_reads_like_its_series(phantom, series: list[Path], tmp_path: Path) -> None:
    hd = pytest.importorskip("highdicom")
    import pydicom

    sources = [pydicom.dcmread(p) for p in series]
    mf = hd.legacy.LegacyConvertedEnhancedMRImage(sources, hd.UID(), 2, hd.UID(), 1)
    path = tmp_path / "mf.dcm"
    mf.save_as(path)
    vol = read_dicom_volume([path])
    assert vol.shape == SHAPE and np.allclose(vol.affine, phantom.affine, atol=1e-6)
    assert np.array_equal(vol.data[..., 0], phantom.images["t1"])
    assert len(vol.frames) == SHAPE[2] and {s for s, _ in vol.frames} == {0}


def test_sequences_stack_only_on_the_same_grid(phantom, tmp_path: Path) -> None:
    t1 = read_nifti(write_nifti(tmp_path / "t1.nii.gz", phantom.images["t1"], phantom.affine))
    t2 = read_nifti(write_nifti(tmp_path / "t2.nii.gz", phantom.images["t2"], phantom.affine))
    both = stack_channels([t1, t2], "subj")
    assert both.channels == 2 and both.id == "subj" and np.array_equal(both.affine, t1.affine)
    shifted = phantom.affine.copy()
    shifted[2, 3] += 1.5
    moved = read_nifti(write_nifti(tmp_path / "flair.nii.gz", phantom.images["flair"], shifted))
    with pytest.raises(ImageReadError, match=r"flair\.nii\.gz.*t1\.nii\.gz.*origin"):
        stack_channels([t1, moved])
    coarse = phantom.affine @ np.diag([1.0, 1.0, 2.0 / 3.0, 1.0])
    thin = read_nifti(write_nifti(tmp_path / "thin.nii.gz", phantom.images["flair"], coarse))
    with pytest.raises(ImageReadError, match=r"voxel spacing \[1\.0, 1\.0, 3\.0\] vs \[1\.0, 1\.0, 2\.0\]"):
        stack_channels([t1, thin])
    small = read_nifti(write_nifti(tmp_path / "small.nii.gz", phantom.images["t1"][:, :, :4], phantom.affine))
    with pytest.raises(ImageReadError, match=r"shape \(32, 24, 8\) vs \(32, 24, 4\)"):
        stack_channels([t1, small])
