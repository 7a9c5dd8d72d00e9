"""FDA variance estimators on synthetic drifts (fixed seeds, many draws)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flwr_transports.strategies import fda_estimators as E


def _drifts(rng, k, dim, common_scale, spread_scale):
    """K drifts = a common component (so the mean drift is not ~0) + per-client noise."""
    common = rng.standard_normal(dim) * common_scale
    return [
        common + rng.standard_normal(dim) * spread_scale * rng.uniform(0.2, 2.0) for _ in range(k)
    ]


def test_naive_never_underestimates_and_linear_between():
    rng = np.random.default_rng(1234)
    for draw in range(300):
        k = int(rng.integers(2, 9))
        dim = int(rng.integers(3, 200))
        d = _drifts(rng, k, dim, rng.uniform(0, 3), rng.uniform(0.01, 2))
        weights = None if draw % 2 else rng.uniform(0.1, 5, size=k)
        true = E.true_variance(d, weights)
        sq = [float(x @ x) for x in d]
        naive = E.naive_estimate(sq, weights)
        tol = 1e-9 * max(1.0, naive)
        assert naive >= true - tol
        # any unit xi: linear is never above naive and (Cauchy-Schwarz) never below true
        xi = rng.standard_normal(dim)
        xi /= np.linalg.norm(xi)
        lin = E.linear_estimate(sq, [float(xi @ x) for x in d], weights)
        assert lin <= naive + tol
        assert lin >= true - tol
        # xi along the mean drift makes linear exact
        p = np.ones(k) / k if weights is None else np.asarray(weights) / np.sum(weights)
        mean = sum(pi * x for pi, x in zip(p, d, strict=True))
        xi_m = mean / np.linalg.norm(mean)
        exact = E.linear_estimate(sq, [float(xi_m @ x) for x in d], weights)
        assert exact == pytest.approx(true, rel=1e-9, abs=1e-9)


def test_true_variance_zero_when_all_equal_and_naive_strictly_above():
    x = np.arange(10.0)
    assert E.true_variance([x, x, x]) == pytest.approx(0.0, abs=1e-9)
    assert E.naive_estimate([x @ x] * 3) == pytest.approx(float(x @ x))


def test_sketch_is_linear_and_unbiased_per_row():
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal(500), rng.standard_normal(500)
    sa, sb = E.ams_sketch(a, 5, 64, seed=3), E.ams_sketch(b, 5, 64, seed=3)
    np.testing.assert_allclose(E.ams_sketch(2 * a - b, 5, 64, seed=3), 2 * sa - sb, atol=1e-9)
    # the same seed on another "client" gives the same hashes; a new seed other hashes
    assert not np.allclose(E.ams_sketch(a, 5, 64, seed=4), sa)
    # rows are unbiased for ||a||^2: averaged over seeds the row estimate converges
    ests = [
        np.einsum("rw,rw->r", s, s).mean()
        for s in (E.ams_sketch(a, 5, 64, seed=s) for s in range(200))
    ]
    assert np.mean(ests) == pytest.approx(float(a @ a), rel=0.03)


def test_sketch_chunked_hashing_matches_linearity(monkeypatch):
    monkeypatch.setattr(E, "_HASH_CHUNK", 100)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(1050), rng.standard_normal(1050)
    s = E.ams_sketch(a + b, 3, 32, seed=9)
    np.testing.assert_allclose(s, E.ams_sketch(a, 3, 32, 9) + E.ams_sketch(b, 3, 32, 9), atol=1e-9)


def test_sketch_within_error_bound_with_stated_probability():
    """|estimate - true| within [-2eps, 4eps]/(1+eps) ||m||^2 w.p. >= 1 - 0.0765 (depth 5).

    The bound (Chebyshev per row + median of 5 rows) is proved in docs/fda.md. We draw
    400 independent (drifts, hash seed) pairs and require the observed failure rate not
    to exceed the stated bound by more than 3 binomial standard deviations.
    """
    depth, width, draws = 5, 250, 400
    p_fail = E.sketch_failure_probability(depth)
    assert p_fail == pytest.approx(0.0765, abs=5e-4)
    rng = np.random.default_rng(2025)
    failures = 0
    above_true = 0
    for seed in range(draws):
        k, dim = 6, 1000
        d = _drifts(rng, k, dim, rng.uniform(0.2, 2.0), rng.uniform(0.1, 1.0))
        sq = [float(x @ x) for x in d]
        sketches = [E.ams_sketch(x, depth, width, seed=seed) for x in d]
        est = E.sketch_estimate(sq, sketches)
        true = E.true_variance(d)
        mean = np.mean(d, axis=0)
        lo, hi = E.sketch_error_bound(float(mean @ mean), width)
        err = est - true
        failures += not (lo <= err <= hi)
        above_true += err >= 0
        # always: never above naive (the subtracted term is >= 0)
        assert est <= E.naive_estimate(sq) + 1e-9
    sd = math.sqrt(p_fail * (1 - p_fail) / draws)
    assert failures / draws <= p_fail + 3 * sd, failures
    # with the 1/(1+eps) correction the sketch over-estimates most of the time
    assert above_true / draws > 0.5


def test_sketch_estimate_better_than_naive_when_drifts_agree():
    rng = np.random.default_rng(5)
    common = rng.standard_normal(2000)
    d = [common + 0.05 * rng.standard_normal(2000) for _ in range(5)]
    sq = [float(x @ x) for x in d]
    est = E.sketch_estimate(sq, [E.ams_sketch(x, 5, 250, seed=1) for x in d])
    naive = E.naive_estimate(sq)
    true = E.true_variance(d)
    assert abs(est - true) < 0.2 * abs(naive - true)


def test_estimator_input_validation():
    with pytest.raises(ValueError):
        E.naive_estimate([])
    with pytest.raises(ValueError):
        E.naive_estimate([1.0, 2.0], weights=[1.0, -1.0])
    with pytest.raises(ValueError):
        E.ams_sketch(np.ones(3), 0, 10, seed=0)
    with pytest.raises(ValueError):
        E.ams_sketch(np.ones(3), 5, E.MAX_SKETCH_WIDTH + 1, seed=0)
    with pytest.raises(ValueError):
        E.estimate("bogus", [1.0])


def test_adaptive_threshold_rule():
    # EMA towards the target (rho * one-step variance), floored at theta_min
    assert E.adaptive_threshold(1.0, 2.0, beta=0.5, theta_min=0.0) == pytest.approx(1.5)
    assert E.adaptive_threshold(1.0, 0.0, beta=1.0, theta_min=0.1) == pytest.approx(0.1)
    assert E.adaptive_threshold(0.0, 3.0, beta=0.5, theta_min=0.0, first=True) == 3.0
    assert E.adaptive_threshold(1.0, float("nan"), beta=0.5, theta_min=0.0) == 1.0
