"""What the Ray shard owners (:mod:`.ray_shards`) and their server step
(:mod:`.ray_step`) share: limits and the cluster error (its own module, so that neither
imports the other)."""

from __future__ import annotations

from typing import Any

import numpy as np

#: restarts of one shard actor per round before the round fails
MAX_RESTARTS = 3
ASSEMBLY_CHUNK = 64 << 20  # the mean is fetched from the shard owners in pieces this big


class RayClusterError(RuntimeError):
    """The Ray cluster of ``aggregation=ray`` cannot be reached (or keeps losing the
    shard actors): the run fails (nothing is left in the store)."""


def collect_pieces(ray: Any, actor: Any, spans: dict, bodies: Any, chunk: int) -> None:
    """Copy a shard owner's part of the result into the arrays' buffers, ``chunk``
    bytes at a time, one piece in flight ahead (``actor.piece.remote(key, e0, e1)``).

    ``spans``: ``{key: (the shard's first element in the array, element count)}``;
    ``bodies[key][1]``: the array's writable bytes, ``bodies[key][2]``: its element
    size."""
    jobs = []  # (array, shard-relative start, end, array element offset)
    for k, (lo, n) in spans.items():
        step = max(1, chunk // bodies[k][2])
        jobs += [(k, e, min(n, e + step), lo + e) for e in range(0, n, step)]
    ahead = None
    for i, (k, e0, e1, at) in enumerate(jobs):
        ref = ahead if ahead is not None else actor.piece.remote(k, e0, e1)
        ahead = actor.piece.remote(*jobs[i + 1][:3]) if i + 1 < len(jobs) else None
        piece = ray.get(ref)
        del ref
        body, z = bodies[k][1], bodies[k][2]
        raw = np.ascontiguousarray(piece).reshape(-1).view(np.uint8)
        body[at * z:at * z + len(raw)] = raw
        del piece, raw
