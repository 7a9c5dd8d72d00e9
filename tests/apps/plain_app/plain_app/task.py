"""A linear model in NumPy, trained on synthetic data each SuperNode makes for itself.

About 2 MiB of float32 weights: large enough that flwr-transports' default 1 MiB
threshold sends it out of band once the app is migrated. Everything is seeded, so a
run is reproducible bit for bit.
"""

from __future__ import annotations

import numpy as np

N_IN, N_OUT = 512, 1024
N_EXAMPLES = 64


def init_model(seed: int = 0) -> dict[str, np.ndarray]:
    """Initial weights: small random W, zero bias."""
    rng = np.random.default_rng(seed)
    return {
        "w": (0.01 * rng.standard_normal((N_IN, N_OUT))).astype(np.float32),
        "b": np.zeros(N_OUT, dtype=np.float32),
    }


def load_data(partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """This partition's synthetic regression data (y = x @ w_true + noise)."""
    rng = np.random.default_rng(1000 + partition_id)
    w_true = np.random.default_rng(7).standard_normal((N_IN, N_OUT)).astype(np.float32)
    x = rng.standard_normal((N_EXAMPLES, N_IN)).astype(np.float32)
    y = x @ w_true + 0.1 * rng.standard_normal((N_EXAMPLES, N_OUT)).astype(np.float32)
    return x, y


def loss(model: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    """Mean squared error."""
    err = x @ model["w"] + model["b"] - y
    return float(np.mean(err * err))


def train(model: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, steps: int,
          lr: float) -> dict[str, np.ndarray]:
    """A few steps of full-batch gradient descent on the MSE; returns new arrays."""
    w, b = model["w"].copy(), model["b"].copy()
    scale = np.float32(2.0 / (x.shape[0] * y.shape[1]))
    for _ in range(steps):
        err = x @ w + b - y
        w -= np.float32(lr) * scale * (x.T @ err) * np.float32(N_OUT)
        b -= np.float32(lr) * scale * err.sum(axis=0) * np.float32(N_OUT)
    return {"w": w, "b": b}
