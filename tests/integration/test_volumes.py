"""Volumes end to end on a generated head phantom: ``imganom inspect --volumes`` (NIfTI, DICOM series,
sequences) and ``imganom evaluate`` on the volume layout, with a tiny model trained on phantom slices."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import cli_env

from imganom.data.phantom import head_phantom, make_dataset, write_dicom_series, write_nifti
from imganom.ops.lesions3d import label_volume

SHAPE = (48, 48, 12)


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A FLAIR phantom layout (4 normal, 2 abnormal volumes, 1 x 1 x 3 mm) and ``tiny`` trained 6 epochs on
    every slice of the normal volumes (about 10 s), calibrated on its held-out slices."""
    from imganom.config import load_config
    from imganom.formats.modelfile import update_calibration
    from imganom.inference.inspector import Inspector
    from imganom.training.trainer import train
    from imganom.workflows.calibrate import calibrate

    root = tmp_path_factory.mktemp("phantom")
    make_dataset(root / "data", 4, 2, SHAPE, sequences=("flair",), min_tissue=0.0)
    cfg = load_config("tiny", {"train": {"epochs": 6}, "preprocess": {"size": [48, 48]},
                               "postprocess": {"border": 3}})  # fmt: skip
    res = train(cfg, root / "data", root / "run", device="cpu", progress=False)
    cal, stats = calibrate(Inspector.load(res.model_path, device="cpu"), res.val_paths)
    update_calibration(res.model_path, cal, stats)
    return {"model": Path(res.model_path), "data": root / "data", "root": root}


@pytest.fixture(scope="module")
def insp(phantom_run):
    from imganom.inference.inspector import Inspector

    return Inspector.load(phantom_run["model"], device="cpu")


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_cli_inspect_volumes_nifti_and_dicom(phantom_run, tmp_path: Path) -> None:
    data = phantom_run["data"]
    ph = head_phantom(SHAPE, (1.0, 1.0, 3.0), seed=7)
    series = write_dicom_series(tmp_path / "in" / "series1", ph.images["flair"], ph.affine)
    (tmp_path / "in" / "note.png").write_bytes(b"not a volume")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "imganom.cli", "inspect", "-m", str(phantom_run["model"]), "-i",
           str(data / "abnormal"), "-i", str(tmp_path / "in"), "-o", str(out), "--volumes",
           "--per-slice"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    rows = _rows(out)
    vols = [r for r in rows if r["kind"] == "volume"]
    assert [r["id"] for r in vols] == ["abnormal/case004.nii.gz", "abnormal/case005.nii.gz", "in/series1",
                                       "in/note.png"]  # fmt: skip
    assert vols[3]["status"] == "error" and "not a volume" in vols[3]["error"]
    slices = [r for r in rows if r["kind"] == "slice"]
    assert len(slices) == 3 * SHAPE[2]
    first = [f"abnormal/case004.nii.gz#slice={k:04d}" for k in range(SHAPE[2])]
    assert [r["id"] for r in rows[1 : 1 + SHAPE[2]]] == first  # each volume's slices follow it
    for v in vols[:3]:
        assert v["status"] == "ok" and v["geometry"]["spacing_mm"] == [1.0, 1.0, 3.0]
        mine = [r for r in slices if r["volume"] == v["id"]]
        assert v["score"] == max(r["score"] for r in mine)
        assert mine[v["slice_index"]]["score"] == v["score"]
        mask_img = nib.load(out / v["outputs"]["mask"])
        map_img = nib.load(out / v["outputs"]["anomaly_map"])
        assert mask_img.get_data_dtype() == np.uint8 and map_img.get_data_dtype() == np.float32
        assert mask_img.shape == SHAPE and map_img.shape == SHAPE
        mask = np.asarray(mask_img.dataobj)
        _, n = label_volume(mask)
        assert v["n_lesions"] == n == len(v["lesions"])
        assert v["lesion_volume_mm3"] == pytest.approx(3.0 * int(mask.sum()))
        for les in v["lesions"]:
            assert les["volume_mm3"] == pytest.approx(3.0 * les["voxels"])
            peak = np.asarray(map_img.dataobj)[tuple(les["peak_voxel"])]
            assert les["peak_score"] == pytest.approx(float(peak))
            assert mask[tuple(les["peak_voxel"])] == 1
    src = nib.load(data / "abnormal" / "case004.nii.gz")
    mask_img = nib.load(out / vols[0]["outputs"]["mask"])
    assert np.array_equal(mask_img.affine, src.affine)  # overlays the input exactly
    assert mask_img.header.get_sform(coded=True)[1] == src.header.get_sform(coded=True)[1]
    assert np.allclose(nib.load(out / vols[2]["outputs"]["mask"]).affine, ph.affine, atol=1e-5)
    hd = pytest.importorskip("highdicom")
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seg = hd.seg.segread(out / vols[2]["outputs"]["seg"])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(series[0]).SeriesInstanceUID
    refs = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs == {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in series}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["total"] == 4 and summary["volumes"]["slices"] == 3 * SHAPE[2]
    header = (out / "results.csv").read_text().splitlines()[0]
    assert header.endswith("n_lesions,lesion_volume_mm3,orientation,spacing_mm")


def test_lesions_are_found_where_the_phantom_has_them(phantom_run, insp) -> None:
    from imganom.data.volumes import read_nifti
    from imganom.inference.volume import inspect_volume

    data = phantom_run["data"]
    hits = 0
    for name in ("case004", "case005"):
        vr = inspect_volume(insp, read_nifti(data / "abnormal" / f"{name}.nii.gz"))
        gt = np.asarray(nib.load(data / "masks" / f"{name}.nii.gz").dataobj) > 0
        gl, _ = label_volume(gt)
        hits += np.unique(gl[(vr.mask > 0) & gt]).size
        assert vr.anomaly_map[gt].mean() > np.median(vr.anomaly_map[~gt])
    assert hits >= 2


def test_sequences_channels_axis_and_bad_series_get_rows(phantom_run, insp, tmp_path: Path) -> None:
    from imganom.workflows.volumes import VolumeOptions, run_volumes

    ph = head_phantom(SHAPE, (1.0, 1.0, 3.0), seed=3)
    folder = tmp_path / "subjects"
    for seq in ("t1", "t2", "flair"):
        write_nifti(folder / f"s1_{seq}.nii.gz", ph.images[seq], ph.affine)
    write_nifti(folder / "s2_t1.nii.gz", ph.images["t1"], ph.affine)  # s2 lacks t2 and flair
    moved = ph.affine.copy()
    moved[0, 3] += 2.0
    write_nifti(tmp_path / "flair_moved.nii.gz", ph.images["flair"], moved)
    series = write_dicom_series(tmp_path / "broken", ph.images["t1"], ph.affine)
    series[5].unlink()  # a missing slice
    rows, _ = run_volumes(insp, [folder], tmp_path / "o1", sequences=["t1", "t2", "flair"], report=False)
    by_id = {r["id"]: r for r in rows}
    assert by_id["s1"]["status"] == "ok" and by_id["s1"]["geometry"]["channels"] == 3
    assert by_id["s2"]["status"] == "error" and "lacks sequence(s) t2, flair" in by_id["s2"]["error"]
    channels = [[folder / "s1_t1.nii.gz", folder / "s1_t2.nii.gz", tmp_path / "flair_moved.nii.gz"]]
    rows, _ = run_volumes(insp, [tmp_path / "broken"], tmp_path / "o2", channels=channels, report=False,
                          options=VolumeOptions(axis=0))  # fmt: skip
    bad, broken = rows
    assert bad["status"] == "error" and "flair_moved.nii.gz" in bad["error"] and "origin" in bad["error"]
    assert broken["status"] == "error" and "missing slice(s)" in broken["error"]
    assert "IM0005.dcm and" in broken["error"] and "IM0007.dcm" in broken["error"]
    rows, _ = run_volumes(insp, [folder / "s1_t1.nii.gz"], tmp_path / "o3", report=False,
                          options=VolumeOptions(axis=0, per_slice=True))  # fmt: skip
    assert rows[0]["status"] == "ok" and len(rows) == 1 + SHAPE[0]
    assert rows[1]["size"] == [SHAPE[1], SHAPE[2]]  # slices along axis 0: (Y, Z), not resampled
    assert np.array_equal(nib.load(tmp_path / "o3" / rows[0]["outputs"]["mask"]).affine, ph.affine)
    again, _ = run_volumes(insp, [folder / "s1_t1.nii.gz"], tmp_path / "o3", resume=True, report=False,
                           options=VolumeOptions(axis=0, per_slice=True))  # fmt: skip
    assert [r["id"] for r in again] == [r["id"] for r in rows]


def test_cli_evaluate_volume_layout(phantom_run, tmp_path: Path) -> None:
    out = tmp_path / "ev"
    cmd = [sys.executable, "-m", "imganom.cli", "evaluate", "-m", str(phantom_run["model"]), "--data",
           str(phantom_run["data"]), "-o", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "lesions found" in proc.stdout + proc.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["counts"] == {"volumes": 6, "normal": 4, "abnormal": 2, "errors": 0, "missing_masks": 0,
                           "slices": 6 * SHAPE[2]}  # fmt: skip
    assert m["slice"]["n_anomalous"] > 0 and m["slice"]["auroc"] > 0.7
    assert m["voxel"]["auroc"] > 0.7 and 0.0 < m["voxel"]["aupro_0.3"] <= 1.0
    assert 0.0 <= m["voxel"]["dice"] <= 1.0
    assert m["lesion"]["lesions"] >= 2 and m["lesion"]["found"] >= 1
    assert m["volume"]["n_images"] == 6 and m["volume"]["auroc"] is not None
    lines = (out / "scores.csv").read_text().splitlines()
    assert lines[0] == "id,label,score,slice_index,n_lesions,gt_lesions,found,dice" and len(lines) == 7


def test_evaluate_layout_mask_off_grid_and_missing_mask(phantom_run, insp, tmp_path: Path) -> None:
    import shutil

    from imganom.evaluation.volumes import evaluate_volumes

    root = tmp_path / "layout"
    shutil.copytree(phantom_run["data"] / "normal", root / "normal")
    shutil.copytree(phantom_run["data"] / "abnormal", root / "abnormal")
    (root / "masks").mkdir()
    mask = nib.load(phantom_run["data"] / "masks" / "case004.nii.gz")
    write_nifti(root / "masks" / "case004.nii.gz", np.asarray(mask.dataobj)[:, :, :6], mask.affine)
    m = evaluate_volumes(insp, root, tmp_path / "ev")
    assert m["missing_masks"] == ["abnormal/case005.nii.gz"]
    assert m["errors"][0]["id"] == "abnormal/case004.nii.gz" and "not on the grid" in m["errors"][0]["error"]
    assert m["counts"]["abnormal"] == 1 and m["volume"]["n_images"] == 5
    assert m["slice"]["n_images"] == 4 * SHAPE[2]  # the maskless volume counts at volume level only


def test_volume_slices_score_exactly_as_the_2d_slice_path(phantom_run, insp, tmp_path: Path) -> None:
    """--volumes --per-slice rows of a NIfTI equal plain inspect's rows of its slices (same ids, same scores,
    same regions): the volume path changes the bookkeeping, not the inspection."""
    from imganom.workflows.inspect import run_inspect
    from imganom.workflows.volumes import VolumeOptions, run_volumes

    src = phantom_run["data"] / "abnormal" / "case005.nii.gz"
    plain, _ = run_inspect(insp, [src], tmp_path / "a", workers=0, report=False)
    rows, _ = run_volumes(insp, [src], tmp_path / "b", options=VolumeOptions(per_slice=True), report=False)
    slices = [r for r in rows if r["kind"] == "slice"]
    assert [r["id"] for r in slices] == [r["id"] for r in plain]
    assert [r["score"] for r in slices] == [r["score"] for r in plain]
    assert [r["regions"] for r in slices] == [r["regions"] for r in plain]


def test_dicom_files_without_extension_form_a_series(phantom_run, insp, tmp_path: Path) -> None:
    from imganom.workflows.volumes import list_volumes, run_volumes

    ph = head_phantom(SHAPE, (1.0, 1.0, 3.0), seed=5)
    for p in write_dicom_series(tmp_path / "export" / "study" / "series", ph.images["flair"], ph.affine):
        p.rename(p.with_suffix(""))  # IM0001 ... as PACS exports name them
    (tmp_path / "export" / "study" / "series" / "NOTES").write_text("not DICOM")
    sources = list_volumes([tmp_path / "export"])
    assert [(s.id, s.kind, len(s.paths)) for s in sources] == [("study/series", "dicom", SHAPE[2])]
    rows, _ = run_volumes(insp, [tmp_path / "export"], tmp_path / "out", report=False)
    assert rows[0]["status"] == "ok" and rows[0]["geometry"]["shape"] == list(SHAPE)
    assert (tmp_path / "out" / rows[0]["outputs"]["seg"]).is_file()
