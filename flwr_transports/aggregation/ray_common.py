"""What the Ray shard owners (:mod:`.ray_shards`) and their server step
(:mod:`.ray_step`) share: limits and the cluster error (its own module, so that neither
imports the other)."""

from __future__ import annotations

#: restarts of one shard actor per round before the round fails
MAX_RESTARTS = 3
ASSEMBLY_CHUNK = 64 << 20  # the mean is fetched from the shard owners in pieces this big


class RayClusterError(RuntimeError):
    """The Ray cluster of ``aggregation=ray`` cannot be reached (or keeps losing the
    shard actors): the run fails (nothing is left in the store)."""
