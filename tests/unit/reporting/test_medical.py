"""NIfTI outputs overlay their input exactly; the DICOM SEG re-reads and references its source series."""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from imganom.data.phantom import Sphere, head_phantom, write_dicom_series, write_nifti
from imganom.data.volumes import read_dicom_volume, read_nifti
from imganom.reporting.medical import write_dicom_seg, write_nifti_like

SHAPE = (32, 24, 8)


@pytest.fixture(scope="module")
def phantom():
    return head_phantom(SHAPE, (1.0, 1.0, 3.0), [Sphere((16, 12, 4), 4.0)], seed=2)


def test_nifti_mask_and_map_keep_the_inputs_affine_and_header(phantom, tmp_path: Path) -> None:
    src = tmp_path / "in.nii.gz"
    write_nifti(src, phantom.stacked(), phantom.affine)  # 4-D int16 input
    img = nib.load(src)
    img.header.set_slope_inter(2.0, 1.0)  # scaled input: outputs must not inherit the scaling
    nib.save(img, tmp_path / "scaled.nii.gz")
    vol = read_nifti(tmp_path / "scaled.nii.gz")
    mask = (phantom.lesion_mask > 0).astype(np.uint8)
    amap = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    write_nifti_like(tmp_path / "mask.nii.gz", mask, vol)
    write_nifti_like(tmp_path / "map.nii", amap, vol)
    m, a = nib.load(tmp_path / "mask.nii.gz"), nib.load(tmp_path / "map.nii")
    for out in (m, a):
        assert np.array_equal(out.affine, vol.affine)
        assert out.header.get_sform(coded=True)[1] == 1 and out.header.get_qform(coded=True)[1] == 1
        assert out.header.get_xyzt_units() == ("mm", "sec")
        assert out.shape == SHAPE
    assert m.get_data_dtype() == np.uint8 and np.array_equal(np.asarray(m.dataobj), mask)
    assert a.get_data_dtype() == np.float32 and np.array_equal(np.asarray(a.dataobj), amap)
    with pytest.raises(ValueError, match="grid"):
        write_nifti_like(tmp_path / "bad.nii.gz", mask[:, :, :4], vol)


def test_nifti_output_from_dicom_input_has_the_series_geometry(phantom, tmp_path: Path) -> None:
    vol = read_dicom_volume(write_dicom_series(tmp_path / "s", phantom.images["t1"], phantom.affine))
    write_nifti_like(tmp_path / "mask.nii.gz", np.zeros(SHAPE, np.uint8), vol)
    assert np.allclose(nib.load(tmp_path / "mask.nii.gz").affine, phantom.affine, atol=1e-5)


def test_dicom_seg_references_the_series_and_each_source_frame(phantom, tmp_path: Path) -> None:
    hd = pytest.importorskip("highdicom")
    import pydicom

    files = write_dicom_series(tmp_path / "s", phantom.images["flair"], phantom.affine)
    vol = read_dicom_volume(files[::-1])
    mask = (phantom.lesion_mask > 0).astype(np.uint8)
    write_dicom_seg(tmp_path / "seg.dcm", mask, vol)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seg = hd.seg.segread(tmp_path / "seg.dcm")
    src = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == src[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == src[0].FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == src[0].SeriesInstanceUID
    lesion_slices = [k for k in range(SHAPE[2]) if mask[:, :, k].any()]
    assert seg.number_of_frames == len(lesion_slices)  # empty slices omitted
    uid_to_slice = {ds.SOPInstanceUID: k for k, ds in enumerate(src)}  # files are written in slice order
    for f, pf in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ref = pf.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = uid_to_slice[ref]
        assert np.array_equal(seg.pixel_array[f] > 0, mask[:, :, k] > 0)  # each frame on its source slice
        assert np.allclose([float(v) for v in pf.PlanePositionSequence[0].ImagePositionPatient],
                           [float(v) for v in src[k].ImagePositionPatient])  # fmt: skip
    nifti = read_nifti(write_nifti(tmp_path / "v.nii", mask, phantom.affine))
    with pytest.raises(ValueError, match="DICOM input"):
        write_dicom_seg(tmp_path / "x.dcm", mask, nifti)
