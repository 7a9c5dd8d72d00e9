"""8-bit quantisation of model updates with per-block scales and error feedback.

Used by the ``q8`` codec (:mod:`flwr_transports.codecs.stream`) on the float arrays
of a reply that also exist, with the same name and layout, in the model the client
received (the *base*). For each block of :data:`QBLOCK` consecutive elements:

* ``u = (x - b) + r`` in float32, where ``x`` is the client's value, ``b`` the base
  value and ``r`` the residual carried from the previous round (error feedback);
* ``s = max|u| / 127`` (float32), ``q = round(u / s)`` as int8 in ``[-127, 127]``;
* the receiver computes ``y = cast(b + q * s)`` in the array's dtype (float32, float16
  or bfloat16, round to nearest even): :func:`dequantize`, the one definition used on
  both sides, so the client knows exactly what the server will see;
* the new residual is ``r' = (x + r) - y`` (float32), kept by the client in an
  :class:`ErrorFeedback` for the next round of the same run.

**This changes the arithmetic**: the server aggregates ``y``, not ``x``. Error
feedback makes the *sum over rounds* of what was sent track the sum of the true
updates (what was not sent this round is sent later), which is what keeps training
on course; a single round's model is only within ``s / 2`` per element of the
client's. It is never a default.
"""

from __future__ import annotations

import threading

import numpy as np

#: elements per quantisation block (one float32 scale each: 1.6% of int8 codes)
QBLOCK = 256
#: dtype codes in the q8 part descriptors
F32, F16, BF16 = 1, 2, 3
ITEMSIZE = {F32: 4, F16: 2, BF16: 2}


def to_f32(raw: np.ndarray, dt: int) -> np.ndarray:
    """Little-endian element bytes (uint8 array) of dtype code ``dt`` as float32."""
    if dt == F32:
        return raw.view("<f4").astype(np.float32)
    if dt == F16:
        return raw.view("<f2").astype(np.float32)
    if dt == BF16:
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    raise ValueError(f"unknown q8 dtype code {dt}")


def from_f32(vals: np.ndarray, dt: int) -> np.ndarray:
    """float32 values as the little-endian bytes (uint8 array) of dtype code ``dt``
    (round to nearest even; bf16 NaN stays NaN)."""
    if dt == F32:
        return vals.astype("<f4", copy=False).view(np.uint8)
    if dt == F16:
        return vals.astype("<f2").view(np.uint8)
    if dt == BF16:
        u = vals.astype(np.float32, copy=False).view(np.uint32)
        r = ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype("<u2")
        r = np.where(np.isnan(vals), np.uint16(0x7FC0), r).astype("<u2", copy=False)
        return r.view(np.uint8)
    raise ValueError(f"unknown q8 dtype code {dt}")


def _blocks(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``v`` split into ``(full blocks as a (k, QBLOCK) view, tail)``."""
    k = len(v) // QBLOCK
    return v[: k * QBLOCK].reshape(k, QBLOCK), v[k * QBLOCK:]


def quantize(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``u`` (finite) -> ``(scales float32[nblocks], codes int8[n])``."""
    n = len(u)
    nb = -(-n // QBLOCK)
    scales = np.empty(nb, np.float32)
    codes = np.empty(n, np.int8)
    full, tail = _blocks(u)
    parts = [(full, slice(0, len(full)), codes[: full.size].reshape(full.shape))]
    if len(tail):
        parts.append((tail[None, :], slice(len(full), nb), codes[full.size:][None, :]))
    for blk, sl, out in parts:
        m = np.abs(blk).max(axis=1) / np.float32(127.0)
        scales[sl] = m
        safe = np.where(m > 0, m, np.float32(1.0))
        q = np.rint(blk / safe[:, None])
        np.clip(q, -127, 127, out=q)
        out[...] = q.astype(np.int8)
    return scales, codes


def dequantize(base: np.ndarray, scales: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """``base + codes * scale`` (float32), block by block. ``base`` float32[n]."""
    out = codes.astype(np.float32)
    full, tail = _blocks(out)
    nfull = len(full)
    full *= scales[:nfull, None]
    if len(tail):
        tail *= scales[nfull]
    out += base
    return out


class ErrorFeedback:
    """The client's q8 residuals for one run: ``name -> float32 array`` (one per
    quantised array), carried from each round's reply to the next. Keep one object per
    run on the client (a new run, or a model whose shape changed, starts from zero).
    Thread-safe for the codec's parallel windows (they touch disjoint slices)."""

    def __init__(self) -> None:
        self._res: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def residual(self, name: str, n: int) -> np.ndarray:
        """The residual of array ``name`` with ``n`` elements (zeros when new or when
        the element count changed)."""
        with self._lock:
            r = self._res.get(name)
            if r is None or len(r) != n:
                r = self._res[name] = np.zeros(n, np.float32)
            return r

    def norm(self) -> float:
        """L2 norm of all residuals (for logs and tests)."""
        with self._lock:
            return float(np.sqrt(sum(float(np.dot(r, r)) for r in self._res.values())))

    def items(self) -> list[tuple[str, np.ndarray]]:
        with self._lock:
            return list(self._res.items())

    def clear(self) -> None:
        with self._lock:
            self._res.clear()

    def __len__(self) -> int:
        return len(self._res)
