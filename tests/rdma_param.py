"""``RDMA``: the pytest parameter "rdma", skipped with the engine's reason where NIXL
does not load (shared by the codec and downlink-delta tests)."""

from __future__ import annotations

import pytest


def rdma_missing() -> str | None:
    """Why rdma:// cannot run here (its engine, NIXL, does not load), or None."""
    from flwr_transports.links import LinkError

    try:
        from flwr_transports.links.rdma import load_nixl

        load_nixl()
    except LinkError as exc:
        return str(exc)
    return None


_WHY = rdma_missing()
RDMA = pytest.param("rdma", marks=pytest.mark.skipif(
    _WHY is not None, reason=f"rdma engine not installed: {_WHY}"))
