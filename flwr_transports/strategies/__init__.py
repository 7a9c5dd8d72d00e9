"""Strategy wrappers beyond offloading.

``FDA`` (server-side strategy wrapper) and ``fda_mod`` (ClientApp mod) implement
Federated Dynamic Averaging; see docs/fda.md. Imported lazily so that importing the
package stays cheap.
"""

from __future__ import annotations

__all__ = ["FDA", "fda_mod"]


def __getattr__(name: str):
    if name == "FDA":
        from .fda import FDA

        return FDA
    if name == "fda_mod":
        from .fda_client import fda_mod

        return fda_mod
    raise AttributeError(f"module 'flwr_transports.strategies' has no attribute {name!r}")
