"""Run Flower apps under ``mpiexec``: rank 0 runs the ServerApp with a Grid over MPI,
ranks 1..N-1 run the ClientApp, arrays travel as raw MPI buffers (no pickle).

Entry point: ``mpiexec -n 3 flwr-transports mpi APP_DIR`` (see docs/mpi.md).
``MpiGrid`` is importable for programs that set up MPI themselves; mpi4py is only
imported when an ``MpiGrid`` is created or the launcher runs.
"""

from __future__ import annotations

__all__ = ["MpiGrid", "RankTimeout"]


def __getattr__(name: str):
    if name in __all__:
        from . import grid

        return getattr(grid, name)
    raise AttributeError(f"module 'flwr_transports.mpi' has no attribute {name!r}")
