"""Initial models, shared by the ServerApp and by the tests' in-process reference."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


def initial_arrays(kind: str, mib: float = 1.0) -> ArrayRecord:
    if kind == "small":
        return ArrayRecord(
            {
                "w": Array(np.arange(12, dtype=np.float32).reshape(3, 4) / 7),
                "b": Array(np.linspace(-1, 1, 5).astype(np.float64)),
            }
        )
    if kind == "payload":
        # several dtypes, empty arrays, a 0-d array, many small arrays, one larger one
        arrays = {
            "f32": Array(np.arange(10, dtype=np.float32) / 3),
            "f64": Array(np.arange(6, dtype=np.float64).reshape(2, 3) / 9),
            "f16": Array(np.arange(8, dtype=np.float16)),
            "empty": Array(np.zeros((0, 4), dtype=np.float32)),
            "scalar": Array(np.array(2.5, dtype=np.float64)),
            "large": Array(np.arange(300_000, dtype=np.float32) / 11),  # 1.2 MB
        }
        for i in range(300):
            arrays[f"tiny.{i:03d}"] = Array(np.full((2,), i, dtype=np.float32))
        return ArrayRecord(arrays)
    if kind == "big":
        n = int(mib * (1 << 20)) // 4
        return ArrayRecord({"big": Array(np.arange(n, dtype=np.float32) % 1000 / 8)})
    raise ValueError(f"unknown model kind {kind!r}")
