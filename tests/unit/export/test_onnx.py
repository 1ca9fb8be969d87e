"""ONNX export: CLI, graph checks, parity ONNX-backed vs torch-backed Inspector, metadata and threshold edits.

Tolerances (fp32; the SSIM variance terms E[x^2] - E[x]^2 amplify summation-order differences between
torch's and onnxruntime's depthwise convolutions): maps within PARITY_RTOL = 1e-4 of the map's max |value|
(1e-3 for standardised maps, see imganom.export.onnx), image scores within 1e-4 relative, verdicts identical,
masks equal on >= 99.9 % of pixels. The CLI runs in-process (typer's CliRunner) to spare a torch import.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from imganom.cli.main import app
from imganom.config import load_config
from imganom.export.onnx import (
    PARITY_RTOL,
    PARITY_RTOL_STANDARDIZED,
    UnsupportedModelError,
    export_onnx,
    read_onnx_meta,
    update_onnx_thresholds,
)
from imganom.formats.modelfile import ModelFileError, load_model, read_meta, save_model, update_calibration
from imganom.inference import Inspector, load_inspector
from imganom.inference.backends import OnnxBackend, TorchBackend
from imganom.workflows.calibrate import calibrate


@pytest.fixture(scope="session")
def trained(small_run: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The shared tiny calibrated model (conftest ``small_run``), ~10 test images (one non-square) and the
    CLI-exported ONNX file; ``root`` is this module's own folder (``root/data`` links to the data)."""
    root = tmp_path_factory.mktemp("export")
    data = root / "data"
    data.symlink_to(small_run["data"], target_is_directory=True)
    model = small_run["model"]
    good = sorted((data / "test" / "good").glob("*.png"))[:4]
    bad = sorted(p for p in (data / "test").glob("*/*.png") if p.parent.name != "good")[:5]
    wide = root / "wide.png"  # non-square (48 x 80), stretched to 64 x 64 by the tiny config
    cv2.imwrite(str(wide), cv2.resize(cv2.imread(str(bad[0]), cv2.IMREAD_GRAYSCALE), (80, 48)))
    onnx_path = root / "model.onnx"
    args = ["export", "--model", str(model), "--format", "onnx", "--out", str(onnx_path), "--opset",
            "18", "--check"]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().splitlines()[-1] == str(onnx_path)
    assert "check:" in r.output
    return {"root": root, "model": model, "onnx": onnx_path, "images": [*good, *bad, wide]}


def _variant(trained: dict, name: str, **overrides: dict) -> Path:
    """The trained weights saved under a changed config (calibration and stats copied)."""
    model, meta, stats = load_model(trained["model"])
    cfg = meta.cfg.model_dump()
    for section, values in overrides.items():
        cfg[section].update(values)
    path = trained["root"] / f"{name}.safetensors"
    save_model(path, model, load_config(None, cfg), training=meta.training, calibration=meta.calibration,
               stats=stats)  # fmt: skip
    return path


def _assert_parity(a: list, b: list, rtol: float = PARITY_RTOL) -> None:
    assert [r.id for r in a] == [r.id for r in b]
    for ra, rb in zip(a, b):
        assert ra.anomaly_map.shape == rb.anomaly_map.shape
        scale = float(np.abs(rb.anomaly_map).max())
        assert float(np.abs(ra.anomaly_map - rb.anomaly_map).max()) <= rtol * scale, ra.id
        assert ra.score == pytest.approx(rb.score, rel=1e-4, abs=1e-7), ra.id
        assert ra.verdict == rb.verdict, ra.id
        assert np.mean(ra.mask != rb.mask) <= 1e-3, ra.id


def test_exported_graph_is_valid_with_dynamic_batch(trained: dict) -> None:
    m = onnx.load(str(trained["onnx"]))
    onnx.checker.check_model(m, full_check=True)
    assert [i.name for i in m.graph.input] == ["images"]
    assert [o.name for o in m.graph.output] == ["anomaly_map", "score", "elbo"]
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 64, 64]
    pads = [n for n in m.graph.node if n.op_type == "Pad"]
    assert any(a.name == "mode" and a.s == b"reflect" for n in pads for a in n.attribute)
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    assert any(a.name == "group" and a.i > 1 for n in convs for a in n.attribute)  # depthwise smoothing
    keys = {p.key for p in m.metadata_props}
    assert keys >= {"imganom.thresholds", "imganom.config", "imganom.calibration", "imganom.preprocess"}

    insp = load_inspector(trained["onnx"], threads=1)
    x = np.random.default_rng(0).random((5, 1, 64, 64), dtype=np.float32)
    five = insp.backend.session.run(None, {"images": x})
    assert [o.shape for o in five] == [(5, 64, 64), (5,), (5,)]
    for k in (0, 3):
        one = insp.backend.session.run(None, {"images": x[k : k + 1]})
        assert [o.shape for o in one] == [(1, 64, 64), (1,), (1,)]
        np.testing.assert_allclose(one[0][0], five[0][k], rtol=0, atol=1e-6)
        assert float(one[1][0]) == pytest.approx(float(five[0][k].max()), rel=1e-6)  # score 'max'


def test_onnx_inspector_matches_inspector(trained: dict) -> None:
    ref = Inspector.load(trained["model"])
    oi = load_inspector(trained["onnx"], threads=1)
    paths = trained["images"]
    assert len(paths) == 10
    want = ref.predict(paths)
    assert {r.verdict for r in want} == {"OK", "NG"}  # the comparison covers both verdicts
    assert want[-1].anomaly_map.shape == (48, 80)
    _assert_parity(oi.predict(paths), want)
    _assert_parity(list(oi.predict_batch(paths, batch_size=5)), want)  # batches of 5 and 5
    _assert_parity([oi.predict(paths[0])], want[:1])  # batch of 1
    items = [(str(p), *oi.load_input(p)) for p in paths[:3]]
    _assert_parity(oi.predict_arrays(items), ref.predict_arrays(items))
    # ELBO output and the graph's own score output for model-sized inputs
    x = np.stack([oi.load_input(p)[0] for p in paths[:9]])
    _, score, elbo = oi.backend.session.run(None, {"images": x})
    ref_maps, ref_elbo = ref.model_maps(torch.from_numpy(x))
    np.testing.assert_allclose(elbo, ref_elbo.numpy(), rtol=1e-4)
    np.testing.assert_allclose(score, [r.score for r in want[:9]], rtol=1e-4)
    assert float(np.abs(ref_maps.numpy().max(axis=(1, 2)) - score).max()) < 1e-4


def test_metadata_round_trip(trained: dict) -> None:
    meta = read_meta(trained["model"])
    d = read_onnx_meta(trained["onnx"])
    assert d["model_id"] == meta.model_id
    assert d["config"] == meta.config
    assert d["calibration"] == meta.calibration
    assert d["thresholds"]["image_threshold"] == meta.calibration["image_threshold"]
    assert d["preprocess"]["size"] == [64, 64] and d["preprocess"]["channels"] == 1
    assert d["preprocess"]["intensity"]["mode"] == "dtype" and d["preprocess"]["resize"] == "stretch"
    assert d["export"]["opset"] == 18 and d["export"]["score"] == "max"
    oi, ref = load_inspector(trained["onnx"], threads=1), Inspector.load(trained["model"])
    assert asdict(oi.meta) == asdict(meta)
    assert oi.model_id == ref.model_id
    assert (oi.image_threshold, oi.pixel_threshold, oi.score_scale) == (
        ref.image_threshold, ref.pixel_threshold, ref.score_scale)  # fmt: skip
    assert isinstance(load_inspector(trained["onnx"], threads=1).backend, OnnxBackend)
    assert isinstance(load_inspector(trained["model"]).backend, TorchBackend)
    assert type(load_inspector(trained["onnx"], threads=1)) is type(ref) is Inspector


def test_update_thresholds_changes_verdicts_without_reexport(trained: dict, tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    shutil.copy(trained["onnx"], path)
    graph_before = onnx.load(str(path)).graph.SerializeToString()
    paths = trained["images"][:9]
    scores = [r.score for r in load_inspector(path, threads=1).predict(paths)]

    update_onnx_thresholds(path, image_threshold=max(scores) + 1.0, pixel_threshold=1e6)
    rs = load_inspector(path, threads=1).predict(paths)
    assert {r.verdict for r in rs} == {"OK"} and all(r.mask.sum() == 0 and not r.regions for r in rs)

    update_onnx_thresholds(path, image_threshold=min(scores) - 1e-3)  # pixel threshold kept
    d = read_onnx_meta(path)
    assert d["thresholds"]["pixel_threshold"] == 1e6 == d["calibration"]["pixel_threshold"]
    assert d["calibration"]["image_threshold"] == pytest.approx(min(scores) - 1e-3)
    assert {r.verdict for r in load_inspector(path, threads=1).predict(paths)} == {"NG"}
    assert onnx.load(str(path)).graph.SerializeToString() == graph_before
    with pytest.raises(ValueError):
        update_onnx_thresholds(path)


def test_standardized_model_exports_its_stats(trained: dict) -> None:
    path = _variant(trained, "std", map={"standardize": True})
    insp = Inspector.load(path)
    cal, stats = calibrate(insp, sorted((trained["root"] / "data" / "train" / "good").glob("*.png"))[:12])
    update_calibration(path, cal, stats)
    out = trained["root"] / "std.onnx"
    rep = export_onnx(path, out, check=True, threads=1)
    assert rep.max_rel_diff is not None and rep.max_rel_diff <= PARITY_RTOL_STANDARDIZED
    assert read_onnx_meta(out)["export"]["standardized"] is True
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    mean = stats["map_mean"].numpy().reshape(1, 64, 64)
    assert any(a.shape == mean.shape and np.array_equal(a, mean) for a in inits.values())
    ref = Inspector.load(path)
    assert "map_mean" in ref.stats
    got = load_inspector(out, threads=1).predict(trained["images"])
    _assert_parity(got, ref.predict(trained["images"]), PARITY_RTOL_STANDARDIZED)


@pytest.mark.parametrize(
    "name, overrides",
    [("topk", {"postprocess": {"score": "topk_mean", "topk": 0.02, "border": 2}}),
     ("elbo_tile", {"postprocess": {"score": "elbo"}, "preprocess": {"resize": "tile"}}),
     ("roi_auto", {"postprocess": {"roi": "auto", "roi_erode": 1}, "map": {"residual": "positive"}})],
)  # fmt: skip
def test_score_variants_and_tiles(trained: dict, name: str, overrides: dict) -> None:
    path = _variant(trained, name, **overrides)
    out = trained["root"] / f"{name}.onnx"
    export_onnx(path, out, threads=1)
    ref, oi = Inspector.load(path), load_inspector(out, threads=1)
    paths = trained["images"][:6]
    want = ref.predict(paths)
    x = np.stack([oi.load_input(p)[0] for p in paths])
    graph_scores = oi.backend.session.run(["score"], {"images": x})[0]
    np.testing.assert_allclose(graph_scores, [r.score for r in want], rtol=1e-4)
    big = trained["root"] / "big.png"  # 100 x 90: several overlapping tiles in tile mode
    cv2.imwrite(str(big), cv2.resize(cv2.imread(str(paths[-1]), cv2.IMREAD_GRAYSCALE), (90, 100)))
    _assert_parity(oi.predict([*paths, big]), ref.predict([*paths, big]))


def test_mc_sampling_refused_unless_allowed(trained: dict) -> None:
    path = _variant(trained, "mc", map={"mc_samples": 2})
    out = trained["root"] / "mc.onnx"
    with pytest.raises(UnsupportedModelError, match="mc_samples"):
        export_onnx(path, out)
    r = CliRunner().invoke(app, ["export", "--model", str(path), "--out", str(out)])
    assert r.exit_code == 2 and not out.exists()
    rep = export_onnx(path, out, allow_mc=True)
    assert rep.notes and read_onnx_meta(out)["config"]["map"]["mc_samples"] == 0


def test_bad_inputs_are_usage_errors(trained: dict, tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["export", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "x.onnx")])
    assert r.exit_code == 2
    r = runner.invoke(app, ["export", "--model", str(trained["model"]), "--format", "tflite", "--out", "x"])
    assert r.exit_code == 2
    with pytest.raises(ModelFileError):
        load_inspector(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all")
    with pytest.raises(ModelFileError):
        load_inspector(junk)
    plain = onnx.load(str(trained["onnx"]))
    del plain.metadata_props[:]
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    with pytest.raises(ModelFileError, match="no imganom metadata"):
        load_inspector(tmp_path / "plain.onnx")
    with pytest.raises(ModelFileError):
        read_onnx_meta(tmp_path / "plain.onnx")
    info = json.loads(json.dumps(read_onnx_meta(trained["onnx"])))  # every value is plain JSON
    assert info["format"] == {"format": "imganom-onnx", "version": 1}


def test_score_side_standardisation_exports_and_matches(trained: dict) -> None:
    """map.standardize="score": plain map for masks, standardised map for the score, in torch and ONNX."""
    path = _variant(trained, "zscore", map={"standardize": "score"})
    insp = Inspector.load(path)
    cal, stats = calibrate(insp, sorted((trained["root"] / "data" / "train" / "good").glob("*.png"))[:12])
    update_calibration(path, cal, stats)
    ref = Inspector.load(path)
    assert ref.standardize_mode == "score"
    out = trained["root"] / "zscore.onnx"
    rep = export_onnx(path, out, check=True, threads=1)
    assert rep.max_rel_diff is not None and rep.max_rel_diff <= PARITY_RTOL_STANDARDIZED
    m = onnx.load(str(out))
    assert [o.name for o in m.graph.output] == ["anomaly_map", "score", "elbo", "score_map"]
    onnx_insp = load_inspector(out, threads=1)
    assert onnx_insp.standardize_mode == "score"
    _assert_parity(onnx_insp.predict(trained["images"]), ref.predict(trained["images"]), PARITY_RTOL)


def test_multiscale_map_exports_and_matches(trained: dict) -> None:
    path = _variant(trained, "ms", map={"scales": [4.0], "standardize": "score"})
    insp = Inspector.load(path)
    cal, stats = calibrate(insp, sorted((trained["root"] / "data" / "train" / "good").glob("*.png"))[:12])
    assert stats["scale_mean"].shape == (2,) and bool((stats["scale_std"] > 0).all())
    update_calibration(path, cal, stats)
    ref = Inspector.load(path)
    assert ref.scale_sigmas == [ref.cfg.postprocess.sigma, 4.0]
    out = trained["root"] / "ms.onnx"
    rep = export_onnx(path, out, check=True, threads=1)
    assert rep.max_rel_diff is not None and rep.max_rel_diff <= PARITY_RTOL_STANDARDIZED
    assert read_onnx_meta(out)["export"]["scales"] == [ref.cfg.postprocess.sigma, 4.0]
    got = load_inspector(out, threads=1).predict(trained["images"])
    _assert_parity(got, ref.predict(trained["images"]), PARITY_RTOL_STANDARDIZED)


def test_load_inspector_same_keywords_same_results_for_onnx_and_safetensors(trained: dict) -> None:
    """One loader, one set of keywords (device, precision, thresholds, roi file, maps) for both formats."""
    roi = trained["root"] / "roi.png"
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :44] = 255  # inspect the left two thirds only
    cv2.imwrite(str(roi), mask)
    paths = trained["images"]
    kw = dict(device="cpu", precision="fp32", roi=roi, maps="ng")
    ref = load_inspector(trained["model"], **kw)
    thr = float(np.median([r.score for r in ref.predict(paths)]))  # half OK, half NG: both paths covered
    ref, got = (load_inspector(p, image_threshold=thr, **kw) for p in (trained["model"], trained["onnx"]))
    assert isinstance(got.backend, OnnxBackend) and got.roi.shape == (64, 64) and not got.roi[:, 50].any()
    assert np.array_equal(got.roi_for((48, 80)), ref.roi_for((48, 80)))
    a, b = got.predict(paths), ref.predict(paths)
    assert {r.verdict for r in b} == {"OK", "NG"}
    for ra, rb in zip(a, b):
        assert ra.score == pytest.approx(rb.score, rel=1e-4, abs=1e-7) and ra.verdict == rb.verdict, ra.id
        assert (ra.anomaly_map is None) == (rb.anomaly_map is None) == (ra.verdict == "OK"), ra.id
        if ra.anomaly_map is not None:
            assert not ra.mask[:, 50:].any() and np.mean(ra.mask != rb.mask) <= 1e-3, ra.id
    whole = load_inspector(trained["onnx"], device="cpu", image_threshold=thr)  # no ROI: other scores
    assert any(w.score != r.score for w, r in zip(whole.predict(paths), a))
    with pytest.raises(ValueError, match="compile"):
        load_inspector(trained["onnx"], compile=True)
    with pytest.raises(RuntimeError, match="baked"):
        got.with_calibration(stats={"map_mean": torch.zeros(64, 64)})


def test_calibrating_an_onnx_inspector_matches_torch(trained: dict) -> None:
    """Thresholds need only scores and maps: an exported model calibrates like its source."""
    normals = sorted((trained["root"] / "data" / "train" / "good").glob("*.png"))[:12]
    cal_t, _ = calibrate(Inspector.load(trained["model"], device="cpu"), normals)
    onnx_insp = load_inspector(trained["onnx"], device="cpu", threads=1)
    cal_o, stats = calibrate(onnx_insp, normals)
    assert stats == {}
    for k in ("image_threshold", "pixel_threshold"):
        assert cal_o[k] == pytest.approx(cal_t[k], rel=1e-3), k
    std = _variant(trained, "std_calib", map={"standardize": "score"})
    out = trained["root"] / "std_calib.onnx"
    export_onnx(std, out, threads=1)  # uncalibrated: no statistics baked in
    with pytest.raises(RuntimeError, match="safetensors"):
        calibrate(load_inspector(out, device="cpu"), normals)
