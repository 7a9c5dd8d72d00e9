"""Wire protocol shared by the FDA strategy (server) and ``fda_mod`` (client).

Every FDA message is a Flower ``train`` message whose ConfigRecord carries
``fda.phase``:

``monitor``  one local training step. If the message's ArrayRecord is non-empty it is a
             new global model: the mod first resets its drift base (and local model) to
             it. The mod runs the user's train function on the node's local model, keeps
             the result in node state and replies with the local state only:
             ``fda.state`` (MetricRecord: sqnorm, optionally xi-dot), ``fda.sketch``
             (ArrayRecord, sketch variant) and the user's own train MetricRecord.
``sync``     no payload down; the mod replies with the full local model (under the
             ArrayRecord key the user's train function used) and the train metrics of
             its last step, i.e. exactly what the user's train function returned.

A node that joins between syncs (or missed a broadcast) gets the global model with its
next ``monitor`` message; there is no separate reset phase.

Config keys sent down: ``fda.phase``, ``fda.variant``, ``fda.seed``, ``fda.epoch`` (sync
counter) and for the sketch ``fda.sketch-depth`` / ``fda.sketch-width``. A monitor
message that carries a new model to a node that cannot rely on its previous base also
carries ``fda.prev`` (ArrayRecord, the previous global model) so that the linear
variant's direction xi is the same on all nodes.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import Array, ArrayRecord

PHASE = "fda.phase"
VARIANT = "fda.variant"
SEED = "fda.seed"
EPOCH = "fda.epoch"
SKETCH_DEPTH = "fda.sketch-depth"
SKETCH_WIDTH = "fda.sketch-width"

MONITOR, SYNC = "monitor", "sync"
PHASES = (MONITOR, SYNC)

# Records in replies / node state
STATE = "fda.state"  # MetricRecord in monitor replies
SKETCH = "fda.sketch"  # ArrayRecord in monitor replies (sketch variant)
PREV = "fda.prev"  # ArrayRecord in monitor messages to late nodes (previous global model)
SQNORM = "fda.sqnorm"
XI_DOT = "fda.xi-dot"

# Keys in context.state (node-local, never sent)
NODE_LOCAL = "fda.local"
NODE_BASE = "fda.base"
NODE_XI = "fda.xi"
NODE_METRICS = "fda.metrics"
NODE_META = "fda.meta"


def flatten(arrays: ArrayRecord) -> np.ndarray:
    """Concatenate the floating-point arrays of ``arrays`` (in key order) into float64."""
    parts = []
    for arr in arrays.values():
        a = arr.numpy()
        if np.issubdtype(a.dtype, np.floating):
            parts.append(a.astype(np.float64, copy=False).ravel())
    if not parts:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate(parts)


def layout(arrays: ArrayRecord) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, dtype) of every array, used to check that two models match."""
    out = []
    for key, arr in arrays.items():
        out.append((key, tuple(arr.shape), str(arr.dtype)))
    return out


def vector_record(vec: np.ndarray, key: str = "v") -> ArrayRecord:
    return ArrayRecord({key: Array(np.ascontiguousarray(vec))})


def is_finite_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
