"""Deterministic synthetic model shared by the ServerApp and the ClientApp.

Nothing here is learned: the point of the app is to move model-sized payloads
through a real Flower deployment and get a bit-exact, transport-independent result.
"""

from __future__ import annotations

import json
from pathlib import Path

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


# ---------------------------------------------------------------- trained weights (benchmarks)
# ``weights-dir`` (run config) names a directory written by benchmarks/trained_weights.py:
# the llm-offload example's GPT after a few rounds of training (``base.npy``) and each
# client's change after one more round (``update-K.npy``), fp32, flattened in
# ``index.json``'s order. The ServerApp starts from ``base``; client K replies
# ``received + update-K``, so what crosses the wire is a real round's update, not the
# constant shift of :func:`local_update`.


def _index(weights_dir: str) -> dict:
    path = Path(weights_dir)
    if not path.is_absolute():
        raise ValueError(f"weights-dir must be absolute, got {weights_dir!r}")
    try:
        return json.loads((path / "index.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} holds no trained weights: run benchmarks/trained_weights.py --out {path}"
        ) from None


def _views(weights_dir: str, file: str) -> dict[str, np.ndarray]:
    idx = _index(weights_dir)
    flat = np.load(Path(weights_dir) / file, mmap_mode="r")
    if flat.dtype != np.float32 or flat.shape != (idx["elements"],):
        raise ValueError(f"{file} in {weights_dir} does not match its index.json")
    return {n: flat[o:o + k].reshape(idx["shapes"][n]) for n, (o, k) in idx["offsets"].items()}


def load_trained(weights_dir: str) -> dict[str, np.ndarray]:
    """The trained global model (read from the file as it is used: memory-mapped)."""
    return _views(weights_dir, "base.npy")


def trained_update(arrays: dict[str, np.ndarray], partition_id: int,
                   weights_dir: str) -> dict[str, np.ndarray]:
    """``arrays`` + client ``partition_id``'s recorded one-round change (mod the count)."""
    n = int(_index(weights_dir)["settings"]["clients"])
    upd = _views(weights_dir, f"update-{partition_id % n}.npy")
    if upd.keys() != arrays.keys():
        raise ValueError("the model received is not the one in weights-dir")
    return {k: np.add(arrays[k], upd[k], dtype=np.float32) for k in arrays}
