"""Variance estimators for FDA (Federated Dynamic Averaging), pure numpy.

Notation: K clients, d_i = w_i - w_sync is client i's drift since the last sync,
p_i >= 0 are weights summing to 1 (uniform by default). The quantity FDA monitors is
the (weighted) model variance

    Var = sum_i p_i ||d_i||^2 - ||sum_i p_i d_i||^2   (>= 0).

Each variant lets every client send a tiny *local state* from which the server builds
an estimate of Var:

- naive:  ||d_i||^2                       -> sum p_i ||d_i||^2 (an upper bound of Var)
- linear: ||d_i||^2, xi . d_i              -> sum p_i ||d_i||^2 - (sum p_i xi . d_i)^2
          (xi a unit vector shared by all clients; since (xi . m)^2 <= ||m||^2 this is
          still an upper bound of Var and never above naive)
- sketch: ||d_i||^2, AMS sketch S(d_i)     -> sum p_i ||d_i||^2 - M / (1 + eps)
          with M = median over rows r of ||sum_i p_i S(d_i)[r]||^2 (the sketch is linear,
          so the mean of sketches is the sketch of the mean drift), eps = 1/sqrt(width).

Sketch error bound (proved in docs/fda.md, checked in tests/test_fda_estimators.py):
each row is an unbiased estimate of ||m||^2 (m the mean drift) with variance at most
2 ||m||^4 / width. By Chebyshev a row is off by more than 3 eps ||m||^2 with probability
at most 2/9; the median of ``depth`` rows is off only if at least half the rows are.
For depth 5 that probability is at most 0.0765, and then

    -2 eps/(1+eps) ||m||^2  <=  estimate - Var  <=  4 eps/(1+eps) ||m||^2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

VARIANTS = ("naive", "linear", "sketch")

# Hostile-input limits for sketch dimensions (a sketch is depth*width float32 values).
MAX_SKETCH_DEPTH = 64
MAX_SKETCH_WIDTH = 65536
# Dimensions are hashed chunk by chunk so that memory stays bounded for large models.
_HASH_CHUNK = 1 << 20


def _weights(k: int, weights: Sequence[float] | np.ndarray | None) -> np.ndarray:
    if k == 0:
        raise ValueError("no client states to estimate from")
    if weights is None:
        return np.full(k, 1.0 / k)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (k,) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be k finite non-negative numbers with a positive sum")
    return w / w.sum()


def true_variance(drifts: Sequence[np.ndarray], weights=None) -> float:
    """Exact model variance sum p_i ||d_i||^2 - ||sum p_i d_i||^2 (needs all drifts)."""
    p = _weights(len(drifts), weights)
    mat = np.stack([np.asarray(d, dtype=np.float64).ravel() for d in drifts])
    mean = p @ mat
    return float(p @ np.einsum("ij,ij->i", mat, mat) - mean @ mean)


def naive_estimate(sqnorms: Sequence[float], weights=None) -> float:
    """Upper bound sum p_i ||d_i||^2."""
    p = _weights(len(sqnorms), weights)
    return float(p @ np.asarray(sqnorms, dtype=np.float64))


def linear_estimate(sqnorms: Sequence[float], xi_dots: Sequence[float], weights=None) -> float:
    """sum p_i ||d_i||^2 - (sum p_i xi.d_i)^2, xi a shared unit vector."""
    p = _weights(len(sqnorms), weights)
    proj = float(p @ np.asarray(xi_dots, dtype=np.float64))
    return float(p @ np.asarray(sqnorms, dtype=np.float64)) - proj * proj


def sketch_eps(width: int) -> float:
    """The sketch's relative accuracy parameter eps = 1/sqrt(width)."""
    return 1.0 / math.sqrt(width)


def sketch_sqnorm(sketch: np.ndarray) -> float:
    """AMS estimate of ||x||^2 from a sketch of x: median over rows of the row's ||.||^2."""
    s = np.asarray(sketch, dtype=np.float64)
    return float(np.median(np.einsum("rw,rw->r", s, s)))


def sketch_estimate(
    sqnorms: Sequence[float], sketches: Sequence[np.ndarray], weights=None
) -> float:
    """sum p_i ||d_i||^2 - M/(1+eps), M = median_r ||sum_i p_i S(d_i)[r]||^2."""
    p = _weights(len(sqnorms), weights)
    stack = np.stack([np.asarray(s, dtype=np.float64) for s in sketches])
    if stack.ndim != 3 or stack.shape[0] != len(sqnorms):
        raise ValueError("expected one (depth, width) sketch per client")
    mean_sketch = np.tensordot(p, stack, axes=1)
    eps = sketch_eps(stack.shape[2])
    return float(p @ np.asarray(sqnorms, dtype=np.float64)) - sketch_sqnorm(mean_sketch) / (
        1.0 + eps
    )


def sketch_failure_probability(depth: int, row_tail: float = 2.0 / 9.0) -> float:
    """Upper bound on P(median of ``depth`` rows is off by > 3 eps ||m||^2).

    Each row fails independently with probability <= ``row_tail`` (Chebyshev: 2/9 at
    3 eps); the median fails only if at least ceil(depth/2) rows fail.
    """
    need = (depth + 1) // 2
    return float(
        sum(
            math.comb(depth, j) * row_tail**j * (1 - row_tail) ** (depth - j)
            for j in range(need, depth + 1)
        )
    )


def sketch_error_bound(mean_sqnorm: float, width: int) -> tuple[float, float]:
    """(low, high) bounds of estimate - Var when the median row is within 3 eps."""
    eps = sketch_eps(width)
    return (-2.0 * eps / (1.0 + eps) * mean_sqnorm, 4.0 * eps / (1.0 + eps) * mean_sqnorm)


def ams_sketch(vec: np.ndarray, depth: int, width: int, seed: int) -> np.ndarray:
    """AMS (count-sketch style) sketch of ``vec``: a (depth, width) float64 matrix.

    Row r holds sum_{j: h_r(j) = b} s_r(j) vec[j] in bucket b, where the bucket hash h_r
    and the sign hash s_r are drawn from a generator seeded by (seed, chunk index), so
    every client with the same seed uses the same hashes. The sketch is linear:
    S(a x + b y) = a S(x) + b S(y).
    """
    check_sketch_shape(depth, width)
    v = np.asarray(vec, dtype=np.float64).ravel()
    out = np.zeros((depth, width), dtype=np.float64)
    for c, start in enumerate(range(0, v.size, _HASH_CHUNK)):
        part = v[start : start + _HASH_CHUNK]
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, c])
        buckets = rng.integers(0, width, size=(depth, part.size), dtype=np.int64)
        signs = rng.integers(0, 2, size=(depth, part.size), dtype=np.int8).astype(np.float64)
        signs = 2.0 * signs - 1.0
        for r in range(depth):
            out[r] += np.bincount(buckets[r], weights=signs[r] * part, minlength=width)
    return out


def check_sketch_shape(depth: int, width: int) -> None:
    if not (isinstance(depth, int) and 1 <= depth <= MAX_SKETCH_DEPTH):
        raise ValueError(f"sketch depth must be an int in [1, {MAX_SKETCH_DEPTH}], got {depth!r}")
    if not (isinstance(width, int) and 1 <= width <= MAX_SKETCH_WIDTH):
        raise ValueError(f"sketch width must be an int in [1, {MAX_SKETCH_WIDTH}], got {width!r}")


def random_unit_vector(dim: int, seed: int) -> np.ndarray:
    """The shared random direction xi used by the linear variant before the first sync."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x5EED])
    v = rng.standard_normal(dim)
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


def estimate(variant: str, sqnorms, xi_dots=None, sketches=None, weights=None) -> float:
    """Dispatch to the estimator of ``variant``."""
    if variant == "naive":
        return naive_estimate(sqnorms, weights)
    if variant == "linear":
        return linear_estimate(sqnorms, xi_dots, weights)
    if variant == "sketch":
        return sketch_estimate(sqnorms, sketches, weights)
    raise ValueError(f"unknown FDA variant {variant!r}; expected one of {VARIANTS}")


def adaptive_threshold(
    theta: float, target: float, beta: float, theta_min: float, first: bool = False
) -> float:
    """Adaptive Theta (the rule documented in docs/fda.md).

    ``target`` is rho times the variance estimate after the first monitoring step of
    the current epoch (the one-step drift). The new Theta is

        max(theta_min, (1 - beta) * Theta + beta * target)      (target if ``first``)

    i.e. an exponential moving average that keeps Theta at about rho one-step
    variances, whatever the units of the model and the size of its steps.
    """
    if not math.isfinite(target) or target < 0:
        return theta
    if first:
        return max(theta_min, target)
    return max(theta_min, (1.0 - beta) * theta + beta * target)
