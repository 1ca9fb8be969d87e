import math

import numpy as np
import pytest
from scipy import stats

from imganom.ops.thresholds import (
    ReservoirSampler,
    f1_max_threshold,
    min_calibration_size,
    normalize_score,
    pixel_threshold,
    quantile_upper_bound,
)

FPR, CONF = 0.01, 0.9
TRUE_Q = -math.log(FPR)  # (1 - FPR) quantile of Exp(1)


@pytest.fixture(scope="module")
def exp_trials():
    """200 calibrations on 2000 Exp(1) normal scores each (seeded)."""
    rng = np.random.default_rng(0)
    return [quantile_upper_bound(x, FPR, CONF) for x in rng.exponential(size=(200, 2000))]


def test_order_statistic_bound_covers_true_quantile(exp_trials):
    coverage = np.mean([th >= TRUE_Q for th, _ in exp_trials])
    info = exp_trials[0][1]
    assert info["method"] == "order_statistic" and info["n"] == 2000
    # The exact coverage of the k-th order statistic is >= CONF; allow ~3 sigma of trial noise.
    exact = stats.binom.cdf(info["k"] - 1, 2000, 1 - FPR)
    assert exact >= CONF
    assert CONF - 0.05 <= coverage <= 0.995
    assert abs(coverage - exact) < 0.06
    # k is the smallest index that works: one lower would not reach the confidence.
    assert stats.binom.cdf(info["k"] - 2, 2000, 1 - FPR) < CONF


def test_fresh_false_reject_rate_close_to_target(exp_trials):
    true_fprs = np.array([math.exp(-th) for th, _ in exp_trials])  # exact FPR of each threshold
    assert 0.5 * FPR < true_fprs.mean() < FPR
    th, info = exp_trials[0]
    fresh = np.random.default_rng(1).exponential(size=1_000_000)
    assert 0.3 * FPR < np.mean(fresh > th) < 1.2 * FPR
    assert info["empirical_fpr"] <= FPR
    assert set(info) >= {"n", "target_fpr", "confidence", "method", "k", "empirical_fpr", "mean", "std"}
    assert info["quantiles"]["p50"] == pytest.approx(math.log(2), abs=0.1)
    assert info["mean"] == pytest.approx(1.0, abs=0.1) and info["std"] == pytest.approx(1.0, abs=0.1)


def test_small_n_falls_back_to_gaussian_tail_with_warning():
    need = min_calibration_size(FPR, CONF)
    assert need == 230  # 1 - 0.99**n >= 0.9  <=>  n >= 229.1
    rng = np.random.default_rng(2)
    _, info = quantile_upper_bound(rng.normal(size=need), FPR, CONF)
    assert info["method"] == "order_statistic" and info["k"] == need

    x = rng.normal(size=need - 1)
    th, info = quantile_upper_bound(x, FPR, CONF)
    assert info["method"] == "gaussian_tail" and info["k"] is None
    assert f">= {need}" in info["warning"]
    assert th >= x.max()
    # Under normality the fallback is still an upper confidence bound of the quantile.
    z = stats.norm.ppf(1 - FPR)
    covered = [quantile_upper_bound(s, FPR, CONF)[0] >= z for s in rng.normal(size=(200, 40))]
    assert np.mean(covered) >= CONF - 0.05


def test_quantile_upper_bound_rejects_bad_input():
    with pytest.raises(ValueError):
        quantile_upper_bound(np.array([1.0]), FPR)
    with pytest.raises(ValueError):
        quantile_upper_bound(np.array([1.0, np.nan, 2.0]), FPR)
    with pytest.raises(ValueError):
        quantile_upper_bound(np.arange(10.0), 0.0)


def test_pixel_threshold():
    x = np.random.default_rng(3).uniform(size=(100, 1000))
    assert pixel_threshold(x, 0.99) == pytest.approx(0.99, abs=0.005)
    assert pixel_threshold(x.ravel(), 0.5) == pytest.approx(np.median(x))
    with pytest.raises(ValueError):
        pixel_threshold(x, 1.0)


def test_f1_max_separable_and_strict_convention():
    rng = np.random.default_rng(4)
    neg, pos = rng.uniform(0, 1, 300), rng.uniform(2, 3, 30)
    scores = np.concatenate([neg, pos])
    labels = np.r_[np.zeros(300), np.ones(30)]
    th, f1 = f1_max_threshold(scores, labels)
    assert f1 == 1.0
    assert neg.max() < th < pos.min()
    assert np.array_equal(scores > th, labels.astype(bool))


def test_f1_max_overlapping_data_and_single_class():
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    labels = np.array([0, 0, 1, 0, 1, 1])
    th, f1 = f1_max_threshold(scores, labels)
    pred = scores > th
    tp = np.sum(pred & (labels == 1))
    assert f1 == pytest.approx(2 * tp / (pred.sum() + labels.sum()))
    assert f1 == pytest.approx(6 / 7)  # best cut: predict {0.3 .. 0.6}: tp 3, fp 1
    with pytest.raises(ValueError, match="single class"):
        f1_max_threshold(scores, np.ones(6))


def test_normalize_score():
    assert normalize_score(3.0, 3.0, 0.5) == 0.5
    assert isinstance(normalize_score(3.0, 3.0, 0.5), float)
    s = np.linspace(-100, 100, 201)
    out = normalize_score(s, 3.0, 0.5)
    assert isinstance(out, np.ndarray) and out.shape == s.shape
    assert np.all(np.diff(out) >= 0) and np.all((out >= 0) & (out <= 1))
    assert normalize_score(3.5, 3.0, 0.5) == pytest.approx(1 / (1 + math.exp(-1)))
    # Non-positive scale: still finite, 0.5 at the threshold and a step around it.
    assert normalize_score(3.0, 3.0, 0.0) == 0.5
    assert normalize_score(3.01, 3.0, 0.0) > 0.99 and normalize_score(2.99, 3.0, -1.0) < 0.01


def test_reservoir_keeps_everything_below_capacity():
    r = ReservoirSampler(capacity=100, seed=0)
    r.add(np.arange(30.0))
    r.add(np.arange(30.0, 60.0).reshape(5, 6))
    assert len(r) == 60 and r.seen == 60
    assert np.array_equal(np.sort(r.sample()), np.arange(60.0))
    assert ReservoirSampler(10).sample().size == 0


def test_reservoir_capacity_determinism_and_uniformity():
    def run(seed):
        r = ReservoirSampler(capacity=5000, seed=seed)
        for i in range(100):
            r.add(np.arange(i * 1000, (i + 1) * 1000, dtype=np.float64))
        return r

    a, b, c = run(0), run(0), run(1)
    sa = a.sample()
    assert sa.size == 5000 and a.seen == 100_000
    assert np.unique(sa).size == 5000  # without replacement
    assert np.array_equal(sa, b.sample())
    assert not np.array_equal(np.sort(sa), np.sort(c.sample()))
    # Uniform over the whole stream: early and late items equally likely (index mean ~ N/2).
    assert sa.mean() == pytest.approx(50_000, rel=0.03)
    assert np.mean(sa < 10_000) == pytest.approx(0.1, abs=0.02)


def test_reservoir_quantiles_match_full_data():
    rng = np.random.default_rng(5)
    r = ReservoirSampler(capacity=20_000, seed=0)
    chunks = [rng.lognormal(sigma=0.5 + i / 100, size=5000) for i in range(100)]  # drifting distribution
    for ch in chunks:
        r.add(ch)
    full = np.concatenate(chunks)
    full.sort()
    for q in (0.5, 0.9, 0.99):
        # Rank of the sample quantile within the full data: within 4 standard errors of q.
        rank = np.searchsorted(full, np.quantile(r.sample(), q)) / full.size
        assert abs(rank - q) < 4 * math.sqrt(q * (1 - q) / 20_000)
    assert np.quantile(r.sample(), 0.9) == pytest.approx(np.quantile(full, 0.9), rel=0.03)
