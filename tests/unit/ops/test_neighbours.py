"""Scores relative to the nearest normals (``calibration.neighbours``): the op, its fit, calibration, every
backend (the reference is traced into the graph) and the Result's explanation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from imganom.config import ConfigError, load_config
from imganom.export.onnx import export_onnx
from imganom.formats.modelfile import ModelFileError, load_model, save_model, update_calibration
from imganom.inference import Inspector, load_inspector
from imganom.ops.neighbours import (
    MAX_REFERENCE,
    NeighbourReference,
    fit_reference,
    has_reference,
    reference_numpy,
)
from imganom.workflows.calibrate import calibrate

HAS_OV = importlib.util.find_spec("openvino") is not None
GRAPH = ["onnxruntime", pytest.param("openvino", marks=pytest.mark.skipif(not HAS_OV, reason="no openvino"))]


def test_op_matches_brute_force_numpy() -> None:
    rng = np.random.default_rng(0)
    z, s = rng.normal(size=(50, 8)), rng.uniform(0.5, 3.0, 50)
    stats = fit_reference(z, s, k=4)
    q = rng.normal(size=(7, 8))
    got = NeighbourReference(stats, 4)(torch.from_numpy(q).float()).double().numpy()
    want = []
    for v in q:  # cosine similarity, the 4 most similar, their mean score
        cos = (z @ v) / (np.linalg.norm(z, axis=1) * np.linalg.norm(v))
        want.append(s[np.argsort(-cos)[:4]].mean())
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(reference_numpy(q, stats, 4), want, rtol=1e-6)


def test_a_hard_normal_is_judged_against_hard_normals() -> None:
    """Two kinds of normal images: 'easy' ones score ~1, 'hard' ones ~4. A hard normal scoring 4 is
    ordinary (relative ~1); an easy image scoring 3 is not (relative ~3), although its raw score is lower."""
    rng = np.random.default_rng(1)
    easy, hard = rng.normal([5, 0, 0], 0.3, (40, 3)), rng.normal([0, 5, 0], 0.3, (40, 3))
    scores = np.r_[rng.normal(1.0, 0.05, 40), rng.normal(4.0, 0.2, 40)]
    ref = NeighbourReference(fit_reference(np.r_[easy, hard], scores, 5), 5)
    q = torch.tensor([[0.1, 5.0, 0.2], [5.0, 0.1, -0.1]])
    rel = torch.tensor([4.0, 3.0]) / ref(q)
    assert float(rel[0]) == pytest.approx(1.0, abs=0.1) and float(rel[1]) == pytest.approx(3.0, abs=0.3)


def test_fit_checks_and_caps() -> None:
    z = np.ones((5, 3))
    with pytest.raises(ValueError, match="needs more than 5 normal images, got 5"):
        fit_reference(z, np.ones(5), k=5)
    with pytest.raises(ValueError, match="must be finite and > 0"):
        fit_reference(z, np.array([1.0, 2.0, 0.0, 1.0, 1.0]), k=2)
    with pytest.raises(ValueError, match="must match"):
        fit_reference(z, np.ones(4), k=2)
    big = fit_reference(np.random.default_rng(0).normal(size=(MAX_REFERENCE + 500, 4)),
                        np.ones(MAX_REFERENCE + 500), k=3)  # fmt: skip
    assert big["neighbour_latents"].shape == (MAX_REFERENCE, 4) and has_reference(big)
    np.testing.assert_allclose(big["neighbour_latents"].norm(dim=1).numpy(), 1.0, rtol=1e-5)


def test_tiles_are_refused() -> None:
    with pytest.raises(ConfigError, match="calibration.neighbours needs one view per image"):
        load_config("tiny", {"calibration": {"neighbours": 3}, "preprocess": {"resize": "tile"}})


@pytest.fixture(scope="module")
def relative_model(small_run: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The integration model with ``calibration.neighbours: 3``, calibrated as ``imganom train`` does
    (reference and statistics from training images, thresholds from held-out ones)."""
    model, meta, _ = load_model(small_run["model"])
    cfg = meta.cfg.model_dump()
    cfg["calibration"]["neighbours"] = 3
    cfg["map"]["standardize"] = "score"
    root = tmp_path_factory.mktemp("relative")
    path = root / "rel.safetensors"
    save_model(path, model, load_config(None, cfg), training=meta.training)
    normals = sorted((small_run["data"] / "train" / "good").glob("*.png"))
    cal, stats = calibrate(Inspector.load(path, device="cpu"), normals[24:], stats_paths=normals[:24])
    save_model(path, model, load_config(None, cfg), training=meta.training, calibration=cal, stats=stats)
    return {"path": path, "normals": normals, "stats": stats, "cal": cal,
            "tests": sorted((small_run["data"] / "test").glob("*/*.png"))}  # fmt: skip


def test_calibration_keeps_training_normals_and_scores_are_relative(relative_model: dict) -> None:
    stats = relative_model["stats"]
    assert has_reference(stats) and stats["neighbour_latents"].shape[0] == 24  # the statistics' images
    insp = Inspector.load(relative_model["path"], device="cpu")
    assert insp.backend.head.reference is not None
    raw = insp.with_calibration(stats={k: v for k, v in insp.stats.items() if not k.startswith("neighbour")},
                                replace_stats=True)  # fmt: skip
    assert raw.backend.head.reference is None
    got, base = insp.predict(relative_model["tests"]), raw.predict(relative_model["tests"])
    for r, b in zip(got, base):
        want_ref = float(reference_numpy(b.latent[None], stats, 3)[0])
        assert r.explanation["neighbours_mean"] == pytest.approx(want_ref, rel=1e-4)
        assert r.score == pytest.approx(b.score / want_ref, rel=1e-4)
        assert r.explanation["raw_score"] == pytest.approx(b.score, rel=1e-4)
        assert r.verdict == ("NG" if r.score > insp.image_threshold else "OK")
    # thresholds were set on relative scores of the held-out normals: their largest one is the threshold
    held = [r.score for r in insp.predict(relative_model["normals"][24:])]
    assert max(held) <= insp.image_threshold + 1e-9 and relative_model["cal"]["n_images"] == len(held)


def test_recalibration_keeps_or_replaces_the_reference(relative_model: dict) -> None:
    insp = Inspector.load(relative_model["path"], device="cpu")
    _, kept = calibrate(insp, relative_model["normals"][24:], keep_stats=True)
    assert not has_reference(kept)  # the model's own reference stays in the file
    some = relative_model["normals"][::2]
    _, new = calibrate(insp, some)  # split: half for statistics and reference, half for thresholds
    assert has_reference(new) and new["neighbour_latents"].shape[0] == len(some[::2])


@pytest.mark.parametrize("backend", GRAPH)
def test_graph_backends_trace_the_reference(relative_model: dict, backend: str, tmp_path: Path) -> None:
    ref = Inspector.load(relative_model["path"], device="cpu")
    got = Inspector.load(relative_model["path"], device="cpu", backend=backend, threads=1)
    want, have = ref.predict(relative_model["tests"]), got.predict(relative_model["tests"])
    assert {r.verdict for r in want} == {r.verdict for r in have}
    for a, b in zip(have, want):
        assert a.score == pytest.approx(b.score, rel=1e-4) and a.verdict == b.verdict, a.id
    onnx_path = tmp_path / "rel.onnx"
    export_onnx(relative_model["path"], onnx_path, threads=1)
    import onnx

    assert "reference" in [o.name for o in onnx.load(str(onnx_path)).graph.output]
    exported = load_inspector(onnx_path, device="cpu", threads=1)
    assert [r.verdict for r in exported.predict(relative_model["tests"])] == [r.verdict for r in want]


def test_old_graph_without_reference_is_refused(
    small_run: dict, relative_model: dict, tmp_path: Path
) -> None:
    """A graph exported before the model scored relative to its neighbours cannot give its scores."""
    import onnx

    plain = tmp_path / "plain.onnx"
    export_onnx(small_run["model"], plain, threads=1)
    m = onnx.load(str(plain))
    _, meta, _ = load_model(relative_model["path"])
    for p in m.metadata_props:  # the relative model's config on the plain graph (it is calibrated)
        if p.key == "imganom.config":
            p.value = meta.cfg.model_dump_json()
    onnx.save(m, str(plain))
    with pytest.raises(ModelFileError, match="no 'reference' output"):
        load_inspector(plain, device="cpu")


def test_too_few_reference_images_keep_raw_scores(relative_model: dict, tmp_path: Path) -> None:
    """k = 10 needs >= 30 reference images: with 20 the scores stay raw, the calibration says so, and the
    file's earlier reference is dropped with it (its thresholds are on raw scores now)."""
    import shutil

    path = tmp_path / "m.safetensors"
    shutil.copy(relative_model["path"], path)
    model, meta, stats = load_model(path)
    cfg = load_config(None, {**meta.cfg.model_dump(), "calibration": {"neighbours": 10}})
    save_model(path, model, cfg, training=meta.training, calibration=meta.calibration, stats=stats)
    normals = relative_model["normals"]
    assert has_reference(load_model(path)[2]) and len(normals) >= 28
    cal, new = calibrate(Inspector.load(path, device="cpu"), normals[20:], stats_paths=normals[:20])
    assert cal["neighbours"] == 0 and not has_reference(new)
    update_calibration(path, cal, new)
    assert not has_reference(load_model(path)[2])
    insp = Inspector.load(path, device="cpu")
    assert insp.backend.head.reference is None
    assert max(r.score for r in insp.predict(normals[20:])) <= insp.image_threshold + 1e-9


def test_a_score_rule_that_goes_negative_keeps_raw_scores(relative_model: dict, tmp_path: Path) -> None:
    """z-scored maps (standardize "map") can give normal images scores <= 0: no ratio, a warning, raw
    scores and thresholds on them (training does not fail at its calibration)."""
    model, meta, _ = load_model(relative_model["path"])
    cfg = meta.cfg.model_dump()
    cfg["map"]["standardize"] = "map"
    cfg["postprocess"]["score"] = "topk_mean"
    cfg["postprocess"]["topk"] = 1.0  # the mean of the whole z-scored map: about 0 for normals
    path = tmp_path / "neg.safetensors"
    save_model(path, model, load_config(None, cfg), training=meta.training)
    normals = relative_model["normals"]
    cal, stats = calibrate(Inspector.load(path, device="cpu"), normals[24:], stats_paths=normals[:24])
    assert cal["neighbours"] == 0 and not has_reference(stats) and cal["normal_scores"]["min"] < 0


def test_monte_carlo_spread_is_on_the_relative_scale(relative_model: dict) -> None:
    """With uncertainty samples, the score spread is divided by the same reference as the score, so the
    verdict confidence compares like with like."""
    insp = Inspector.load(relative_model["path"], device="cpu").with_options(uncertainty=4)
    raw = insp.with_calibration(stats={k: v for k, v in insp.stats.items() if not k.startswith("neighbour")},
                                replace_stats=True)  # fmt: skip
    paths = relative_model["tests"][:6]
    for r, b in zip(insp.predict(paths), raw.predict(paths)):
        assert b.score_spread > 0
        ref = r.explanation["neighbours_mean"]
        assert r.score_spread == pytest.approx(b.score_spread / ref, rel=1e-4)
