"""``evaluate`` reports the latent-density score (alone and combined, with AUROC) and the error rate per
confidence bin."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imganom.evaluation.evaluate import evaluate
from imganom.evaluation.trust import confidence_metrics, latent_metrics
from imganom.inference.inspector import Inspector


def test_evaluate_reports_latent_and_confidence(latent_model: Path, synth_root: Path, tmp_path: Path) -> None:
    insp = Inspector.load(latent_model, device="cpu").with_options(uncertainty=4)
    m = evaluate(insp, synth_root, tmp_path / "ev", batch_size=8, workers=0, report=False)
    lat = m["latent"]
    assert lat["available"] is True
    for k in ("latent_auroc", "combined_auroc", "reconstruction_auroc"):
        assert 0.0 <= lat[k] <= 1.0
    assert lat["reconstruction_auroc"] == m["image"]["auroc"]
    unc = m["uncertainty"]
    assert sum(b["n"] for b in unc["bins"]) == m["counts"]["good"] + m["counts"]["anomalous"]
    assert sum(b["errors"] for b in unc["bins"]) / 18 == unc["error_rate"]


def test_trust_metrics_on_synthetic_scores() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.9, 0.8, 0.95, 0.3])  # threshold 0.5: ids 2 and 5 wrong
    conf = [0.999, 0.995, 0.3, 0.95, 0.999, 0.6]
    c = confidence_metrics(scores, labels, conf, 0.5)
    rates = {tuple(b["range"]): b["error_rate"] for b in c["bins"]}
    assert rates[(0.0, 0.5)] == 1.0 and rates[(0.5, 0.9)] == 1.0 and rates[(0.99, 1.0)] == 0.0
    assert c["confidence_auroc_correct"] == 1.0  # every right verdict more confident than every wrong one
    assert confidence_metrics(scores, labels, [None] * 6, 0.5) is None
    assert latent_metrics({}, None, scores, labels, [None] * 6)["available"] is False
