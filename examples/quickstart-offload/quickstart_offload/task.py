"""Deterministic synthetic model shared by the ServerApp and the ClientApp.

Nothing here is learned: the point of the app is to move model-sized payloads
through a real Flower deployment and get a bit-exact, transport-independent result.
"""

from __future__ import annotations

import numpy as np

MIB = 1 << 20
_COLS = 256
# Shares of the float32 budget for each layer (sum to 1).
_LAYER_SHARES = (0.5, 0.25, 0.125, 0.125)


def build_model(model_mib: float, seed: int = 2024) -> dict[str, np.ndarray]:
    """Return an ordered dict of named arrays totalling about ``model_mib`` MiB.

    A few float32 matrices carry the bulk; a small int64 array and a 0-d float32
    array exercise the less common dtypes/shapes on every transport.
    """
    if not (model_mib > 0):
        raise ValueError(f"model-mib must be > 0, got {model_mib!r}")
    rng = np.random.default_rng(seed)
    n_float = max(len(_LAYER_SHARES) * _COLS, int(model_mib * MIB) // 4)
    arrays: dict[str, np.ndarray] = {}
    for i, share in enumerate(_LAYER_SHARES):
        rows = max(1, int(n_float * share) // _COLS)
        arrays[f"layer{i}.weight"] = rng.standard_normal((rows, _COLS), dtype=np.float32)
    arrays["step.counter"] = np.arange(16, dtype=np.int64)
    arrays["output.scale"] = np.array(1.5, dtype=np.float32)
    return arrays


def local_update(arrays: dict[str, np.ndarray], partition_id: int) -> dict[str, np.ndarray]:
    """Deterministic "training": add (partition_id + 1) * 0.001, keep each dtype."""
    delta = (partition_id + 1) * 0.001
    out: dict[str, np.ndarray] = {}
    for name, arr in arrays.items():
        out[name] = np.asarray(arr + delta).astype(arr.dtype, copy=False)
    return out


def model_loss(arrays: dict[str, np.ndarray]) -> float:
    """A deterministic scalar standing in for a loss (cheap even for large models)."""
    total = 0.0
    for arr in arrays.values():
        flat = np.asarray(arr).reshape(-1)
        if flat.size == 0:
            continue
        sample = flat[:: max(1, flat.size // 4096)]
        total += float(np.abs(sample.astype(np.float64)).mean())
    return total
