"""The link registry: the one place that knows the URL schemes.

Built-in links are registered lazily (module path + class names, imported on first
use, with an install hint when a dependency is missing). Third-party packages add a
scheme without editing this one, either at run time::

    from flwr_transports.links import register_link
    register_link("mem", MemServerLink, MemClientLink)

or through the ``flwr_transports.links`` entry-point group (the entry point's name is
the scheme; its object is the ``ServerLink`` subclass, whose ``client_class``
attribute names the ``ClientLink`` subclass, or a ``(server_cls, client_cls)`` pair)::

    [project.entry-points."flwr_transports.links"]
    mem = "my_package.mem_link:MemServerLink"

``doctor``, ``demo``, ``bench`` and ``cleanup`` iterate over :func:`schemes`.
"""

from __future__ import annotations

import importlib
import re
import threading
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..options import TransportSpec, parse_transport
from .base import ClientLink, LinkError, PayloadSource, ServerLink, split_url

__all__ = [
    "ClientLink",
    "LinkError",
    "LinkSpec",
    "PayloadSource",
    "ServerLink",
    "client_link",
    "link_classes",
    "link_options",
    "network_scheme",
    "parse",
    "register_link",
    "schemes",
    "server_link",
    "split_url",
    "unregister_link",
]

ENTRY_POINT_GROUP = "flwr_transports.links"
_SCHEME_RE = re.compile(r"^[a-z][a-z0-9+.-]{0,31}$")


@dataclass
class LinkSpec:
    """One registered scheme: classes, or where to import them from."""

    scheme: str
    server: type[ServerLink] | str  # class, or "module:Class"
    client: type[ClientLink] | str
    extra: str | None = None  # pip extra that provides its dependencies
    #: where it came from: "builtin", "register_link" or "entry point <dist>"
    origin: str = "builtin"
    #: True when the link only works inside one host (shm://, file:// without a share)
    local_only: bool = False


_LOCK = threading.Lock()
_REGISTRY: dict[str, LinkSpec] = {}
_ENTRY_POINTS_LOADED = False


def _builtin(scheme: str, module: str, srv: str, cli: str, extra: str | None = None,
             local_only: bool = False) -> None:
    _REGISTRY[scheme] = LinkSpec(scheme, f"{module}:{srv}", f"{module}:{cli}", extra,
                                 "builtin", local_only)


_builtin("shm", "flwr_transports.links.fs", "ShmServerLink", "ShmClientLink", local_only=True)
_builtin("file", "flwr_transports.links.fs", "FileServerLink", "FileClientLink",
         local_only=True)
_builtin("s3", "flwr_transports.links.s3", "S3ServerLink", "S3ClientLink", "s3")
_builtin("tcp", "flwr_transports.links.tcp", "TcpServerLink", "TcpClientLink")
_builtin("rdma", "flwr_transports.links.rdma", "RdmaServerLink", "RdmaClientLink", "rdma")


def register_link(scheme: str, server_cls: type[ServerLink] | str,
                  client_cls: type[ClientLink] | str | None = None, *,
                  extra: str | None = None, local_only: bool = False,
                  replace: bool = False, origin: str = "register_link") -> None:
    """Register a link for ``scheme://`` URLs.

    ``server_cls`` / ``client_cls``: the classes, or ``"module:Class"`` strings imported
    on first use. ``client_cls`` may be omitted when the server class has a
    ``client_class`` attribute. A scheme that exists already is an error unless
    ``replace=True``.
    """
    scheme = scheme.lower()
    if not _SCHEME_RE.match(scheme) or scheme in {"inband", "in-band", "none"}:
        raise ConfigError(f"invalid link scheme {scheme!r}")
    if client_cls is None:
        client_cls = getattr(server_cls, "client_class", None)
        if client_cls is None:
            raise ConfigError(f"register_link({scheme!r}): no client class given and "
                              f"{server_cls!r} has no client_class attribute")
    for cls, base in ((server_cls, ServerLink), (client_cls, ClientLink)):
        if not isinstance(cls, str) and not (isinstance(cls, type) and issubclass(cls, base)):
            raise ConfigError(f"register_link({scheme!r}): {cls!r} is not a {base.__name__} "
                              "subclass")
    with _LOCK:
        if scheme in _REGISTRY and not replace:
            raise ConfigError(f"link scheme {scheme}:// is already registered "
                              f"({_REGISTRY[scheme].origin}); pass replace=True to override")
        _REGISTRY[scheme] = LinkSpec(scheme, server_cls, client_cls, extra, origin, local_only)
        _CLIENTS.pop(scheme, None)


def unregister_link(scheme: str) -> None:
    """Remove a scheme registered with :func:`register_link` (tests, plugins)."""
    with _LOCK:
        _REGISTRY.pop(scheme.lower(), None)
        _CLIENTS.pop(scheme.lower(), None)


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        scheme = ep.name.lower()
        if scheme in _REGISTRY:
            continue  # built-ins and explicit registrations win
        dist = getattr(ep.dist, "name", None) or "?"
        # resolved lazily too: the entry point's module is imported on first use
        with _LOCK:
            _REGISTRY[scheme] = LinkSpec(scheme, f"ep:{ep.value}", f"ep:{ep.value}", None,
                                         f"entry point of {dist}")


def reload_entry_points() -> None:
    """Scan the entry-point group again (after installing a plugin in this process)."""
    global _ENTRY_POINTS_LOADED
    with _LOCK:
        for s in [s for s, sp in _REGISTRY.items() if sp.origin.startswith("entry point")]:
            del _REGISTRY[s]
            _CLIENTS.pop(s, None)
        _ENTRY_POINTS_LOADED = False
    _load_entry_points()


def schemes() -> list[str]:
    """Every registered scheme (built-in, registered, entry points), in registry order."""
    _load_entry_points()
    return list(_REGISTRY)


def link_spec(scheme: str) -> LinkSpec:
    _load_entry_points()
    spec = _REGISTRY.get(scheme.lower())
    if spec is None:
        known = ", ".join(f"{s}://" for s in _REGISTRY)
        raise ConfigError(f"unknown transport scheme {scheme!r}; known: inband, {known}")
    return spec


def _resolve(ref: str) -> Any:
    mod, _, attr = ref.partition(":")
    obj = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def link_classes(scheme: str) -> tuple[type[ServerLink], type[ClientLink]]:
    """The (server, client) classes of ``scheme``, imported on first use."""
    spec = link_spec(scheme)
    if isinstance(spec.server, type) and isinstance(spec.client, type):
        return spec.server, spec.client
    try:
        if isinstance(spec.server, str) and spec.server.startswith("ep:"):
            obj = _resolve(spec.server[3:])
            if isinstance(obj, tuple) and len(obj) == 2:
                srv, cli = obj
            else:
                srv, cli = obj, getattr(obj, "client_class", None)
            if not (isinstance(srv, type) and issubclass(srv, ServerLink)
                    and isinstance(cli, type) and issubclass(cli, ClientLink)):
                raise LinkError(f"the {spec.origin} for {scheme}:// does not name a ServerLink "
                                "subclass with a client_class, or a (server, client) pair")
        else:
            srv = spec.server if isinstance(spec.server, type) else _resolve(spec.server)
            cli = spec.client if isinstance(spec.client, type) else _resolve(spec.client)
    except ImportError as exc:
        hint = f" (pip install 'flwr-transports[{spec.extra}]')" if spec.extra else ""
        raise LinkError(f"the {scheme}:// link needs a missing dependency: {exc}{hint}") from exc
    with _LOCK:
        spec.server, spec.client = srv, cli
    return srv, cli


def link_options(scheme: str) -> tuple:
    """The options the ``scheme://`` link declares (its server class's ``OPTIONS``)."""
    return tuple(link_classes(scheme)[0].OPTIONS)


def parse(url: str | TransportSpec, wrapper_spec: tuple = (), **keywords: Any
          ) -> TransportSpec:
    """Parse a transport URL and keyword options ONCE against the wrapper's options
    and the link's declared ones (:func:`flwr_transports.options.parse_transport`)."""
    return parse_transport(url, wrapper_spec=wrapper_spec, link_spec=link_options,
                           keywords=keywords)


def server_link(url: str | TransportSpec, run_id: int | str,
                options: dict[str, Any] | None = None) -> ServerLink:
    """Build the server side of the link named by ``url``: a parsed
    :class:`~flwr_transports.options.TransportSpec` (used as given), or a URL string
    with raw keyword ``options`` merged over its query (parsed once here)."""
    spec = url if isinstance(url, TransportSpec) else parse(url, **(options or {}))
    if spec.scheme is None:
        raise ConfigError("transport 'inband' has no link")
    srv, _ = link_classes(spec.scheme)
    return srv(spec, run_id, spec.link)  # 3 arguments: links written before TransportSpec


def network_scheme(scheme: str) -> bool:
    """True for links that cross a network (a payload is worth keeping on a client
    for the next round); False for host-local links and unknown schemes."""
    try:
        return not link_spec(scheme).local_only
    except ConfigError:
        return False


_CLIENTS: dict[str, ClientLink] = {}


def client_link(scheme: str) -> ClientLink:
    """The (stateless, shared) client side of ``scheme``."""
    if scheme not in _CLIENTS:
        _, cli = link_classes(scheme)
        _CLIENTS[scheme] = cli()
    return _CLIENTS[scheme]
