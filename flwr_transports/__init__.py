"""flwr-transports: out-of-band payload transports for Flower.

Public names: ``offload`` (server-side strategy wrapper), ``offload_grid`` (server-side
Grid wrapper, for any ServerApp), ``payload_mod`` (client-side ClientApp mod, the
default instance) and ``PayloadMod`` (a mod instance with a client policy: allowed
schemes, hosts, ports, file roots, size) and ``load_model`` (read a model a
``final_model=store`` run kept in the store). Everything else lives in submodules.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["PayloadMod", "__version__", "load_model", "offload", "offload_grid", "payload_mod"]


def __getattr__(name: str):  # lazy: importing the package stays cheap
    if name == "offload":
        from .flower.wrapper import offload

        return offload
    if name == "offload_grid":
        from .flower.wrapper import offload_grid

        return offload_grid
    if name == "payload_mod":
        from .flower.mod import payload_mod

        return payload_mod
    if name == "PayloadMod":
        from .flower.mod import PayloadMod

        return PayloadMod
    if name == "load_model":
        from .loading import load_model

        return load_model
    raise AttributeError(f"module 'flwr_transports' has no attribute {name!r}")
