"""Link registry keyed by URL scheme, with lazy imports and install hints."""

from __future__ import annotations

import importlib
from typing import Any

from .base import ClientLink, LinkError, PayloadSource, ServerLink, split_url

__all__ = [
    "REGISTRY",
    "ClientLink",
    "LinkError",
    "PayloadSource",
    "ServerLink",
    "client_link",
    "link_classes",
    "server_link",
    "split_url",
]

# scheme -> (module, server class, client class, extra that provides its dependencies)
REGISTRY: dict[str, tuple[str, str, str, str | None]] = {
    "shm": ("flwr_transports.links.fs", "ShmServerLink", "ShmClientLink", None),
    "file": ("flwr_transports.links.fs", "FileServerLink", "FileClientLink", None),
    "s3": ("flwr_transports.links.s3", "S3ServerLink", "S3ClientLink", "s3"),
    "tcp": ("flwr_transports.links.tcp", "TcpServerLink", "TcpClientLink", None),
    "rdma": ("flwr_transports.links.rdma", "RdmaServerLink", "RdmaClientLink", "rdma"),
}


def link_classes(scheme: str) -> tuple[type[ServerLink], type[ClientLink]]:
    if scheme not in REGISTRY:
        known = ", ".join(f"{s}://" for s in REGISTRY)
        raise ValueError(f"unknown transport scheme {scheme!r}; known: inband, {known}")
    module, srv, cli, extra = REGISTRY[scheme]
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        hint = f" (pip install 'flwr-transports[{extra}]')" if extra else ""
        raise LinkError(f"the {scheme}:// link needs a missing dependency: {exc}{hint}") from exc
    return getattr(mod, srv), getattr(mod, cli)


def server_link(url: str, run_id: int | str, options: dict[str, Any] | None = None) -> ServerLink:
    """Build the server side of the link named by ``url`` (options: URL query + kwargs)."""
    scheme, _, _, query = split_url(url)
    srv, _ = link_classes(scheme)
    opts = {**query, **(options or {})}
    return srv(url, run_id, opts)


_CLIENTS: dict[str, ClientLink] = {}


def client_link(scheme: str) -> ClientLink:
    if scheme not in _CLIENTS:
        _, cli = link_classes(scheme)
        _CLIENTS[scheme] = cli()
    return _CLIENTS[scheme]
