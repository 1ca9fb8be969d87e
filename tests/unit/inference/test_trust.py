"""Monte-Carlo uncertainty, latent means and explanations on the tiny trained model: K=1 is today's
inspection exactly, K>1 adds confidence without touching maps or scores, review is opt-in, graph backends
give None cleanly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from imganom.data.discovery import scan_mvtec
from imganom.data.preprocess import prepare
from imganom.inference.inspector import Inspector
from imganom.models.vae import kl_divergence
from imganom.ops.head import image_scores
from imganom.ops.latent import has_latent_stats


@pytest.fixture(scope="module")
def insp(latent_model: Path) -> Inspector:
    return Inspector.load(latent_model, device="cpu")


@pytest.fixture(scope="module")
def paths(synth_root: Path) -> list[Path]:
    return [it.path for it in scan_mvtec(synth_root).test]


def test_k1_maps_are_the_head_on_the_posterior_mean_exactly(insp: Inspector, paths: list[Path]) -> None:
    """The backend's maps, ELBO and scores at K=1 (the default) are bit-identical to the head applied to the
    mean decode (what inspection computed before sampling existed), and K=8 leaves them unchanged too."""
    assert insp.uncertainty == 1 and insp.cfg.uncertainty.samples == 1
    views = torch.from_numpy(np.concatenate([prepare(insp.load_input(p)[0], insp.cfg.preprocess)[0]
                                             for p in paths[:6]]))  # fmt: skip
    be = insp.backend
    with torch.no_grad():
        mu, logvar, recon = be.model.reconstruct(views)
        ref = be.head.finish(be.head.raw_map(views, [recon]), kl_divergence(mu, logvar))
    for k in (1, 8):
        out = be.maps(views, samples=k)
        assert torch.equal(out.maps, ref.maps) and torch.equal(out.elbo, ref.elbo)
        assert (out.score_maps is None) == (ref.score_maps is None)
        assert torch.equal(image_scores(out, insp.cfg.postprocess), image_scores(ref, insp.cfg.postprocess))
        assert ("sample_maps" in out.extra) == (k > 1)
    assert out.extra["sample_maps"].shape == (8, *ref.maps.shape)


def test_sampling_adds_confidence_without_changing_results(insp: Inspector, paths: list[Path]) -> None:
    r1 = insp.predict(paths)
    r8 = insp.with_options(uncertainty=8).predict(paths)
    for a, b in zip(r1, r8, strict=True):
        assert a.score == b.score and a.is_anomalous == b.is_anomalous
        assert np.array_equal(a.anomaly_map, b.anomaly_map) and np.array_equal(a.mask, b.mask)
        assert [g.bbox for g in a.regions] == [g.bbox for g in b.regions]
        assert a.confidence is None and a.score_spread is None and a.uncertainty_map is None
        assert b.score_spread > 0 and 0.0 <= b.confidence <= 1.0
        assert b.uncertainty_map.shape == b.anomaly_map.shape and (b.uncertainty_map >= 0).all()
        assert b.uncertainty_map.max() > 0
        assert all(g.confidence is not None and 0.0 <= g.confidence <= 1.0 for g in b.regions)
        assert all(g.confidence is None for g in a.regions)
        assert b.verdict == a.verdict  # review is opt-in
        d = b.to_dict()
        assert d["confidence"] == b.confidence and d["is_anomalous"] == b.is_anomalous
        assert "confidence" not in a.to_dict()
    assert any(b.regions for b in r8)  # the region confidence was exercised
    again = insp.with_options(uncertainty=8).predict(paths)  # seeded draws: reproducible
    assert [r.confidence for r in again] == [r.confidence for r in r8]


def test_explanation_parts_sum_to_the_elbo(insp: Inspector, paths: list[Path]) -> None:
    for r in insp.predict(paths):
        e = r.explanation
        assert e["recon_term"] + e["kl_term"] == pytest.approx(e["elbo"], rel=1e-12)
        assert e["recon_term"] > 0 and e["kl_term"] > 0 and e["score_rule"] == insp.cfg.postprocess.score
        shares = [g["share"] for g in e["regions"]]
        assert all(0.0 <= s <= 1.0 for s in shares) and sum(shares) <= 1.0 + 1e-9
        assert len(shares) == min(len(r.regions), 5)
        assert r.latent.shape == (insp.cfg.model.latent_dim,) and np.isfinite(r.latent).all()
        if insp.cfg.postprocess.score == "elbo":
            assert r.score == pytest.approx(e["elbo"])


def test_review_is_opt_in_and_follows_the_confidence(insp: Inspector, paths: list[Path]) -> None:
    with pytest.raises(ValueError, match="review_below"):
        insp.with_options(review_below=1.5)
    scores = sorted(r.score for r in insp.predict(paths))
    thr = scores[len(scores) // 2]  # one image exactly on the threshold: confidence 0
    sampled = insp.with_options(uncertainty=8, image_threshold=thr).predict(paths)
    cut = 0.5
    rev = insp.with_options(uncertainty=8, review_below=cut, image_threshold=thr).predict(paths)
    flagged = [r for r in rev if r.verdict == "review"]
    assert 0 < len(flagged) < len(rev)
    for a, b in zip(sampled, rev, strict=True):
        assert (b.verdict == "review") == (b.confidence < cut)
        assert b.is_anomalous == a.is_anomalous  # the thresholded call is kept
        if b.verdict != "review":
            assert b.verdict == a.verdict


def test_calibration_records_latent_statistics(insp: Inspector) -> None:
    assert has_latent_stats(insp.stats)
    d = insp.cfg.model.latent_dim
    assert insp.stats["latent_precision"].shape == (d, d)
    assert insp.stats["latent_normals_2d"].shape[1] == 2


def test_graph_backend_gives_no_extras(latent_model: Path, paths: list[Path]) -> None:
    pytest.importorskip("onnxruntime")
    g = Inspector.load(latent_model, device="cpu", backend="onnxruntime", uncertainty=4)
    ref = Inspector.load(latent_model, device="cpu").predict(paths[:3])
    for r, t in zip(g.predict(paths[:3]), ref, strict=True):
        assert r.latent is None and r.explanation is None and r.confidence is None
        assert r.uncertainty_map is None and r.verdict in ("OK", "NG")
        assert r.score == pytest.approx(t.score, rel=1e-4, abs=1e-5)
    with pytest.raises(RuntimeError, match="torch backend"):
        g.reconstruct(g.load_input(paths[0])[0])
