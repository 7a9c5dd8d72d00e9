"""What a server's message may make a client touch: the client-side policy.

A reference or ticket names where the client should read or write a payload: a
presigned http(s) URL (``s3://``), a ``host:port`` (``tcp://``, ``rdma://``), a file
(``file://``, ``shm://``). A hostile or compromised server (or SuperLink) can put
anything there, so :class:`PayloadMod <flwr_transports.flower.mod.PayloadMod>`
checks every location against a :class:`ClientPolicy` BEFORE the link opens it.

Settings (constructor argument of ``PayloadMod``, else the environment variable,
else the default):

==================  ==================================  ======================================
setting             environment variable                default
==================  ==================================  ======================================
``schemes``         ``FLWR_TRANSPORTS_ALLOWED_SCHEMES`` every registered link
``hosts``           ``FLWR_TRANSPORTS_ALLOWED_HOSTS``   any host, except link-local/metadata
``ports``           ``FLWR_TRANSPORTS_ALLOWED_PORTS``   any port
``file_roots``      ``FLWR_TRANSPORTS_FILE_ROOTS``      any directory outside system ones
``max_payload``     ``FLWR_TRANSPORTS_MAX_PAYLOAD``     64 GiB
``allow_link_local`` ``FLWR_TRANSPORTS_ALLOW_LINK_LOCAL`` false
==================  ==================================  ======================================

``hosts`` entries are host names (``store.example.org``), suffix patterns
(``*.example.org``), addresses or networks (``10.0.0.0/8``, ``fd00::/8``); a name
matches by name, or by every address it resolves to. Environment lists are comma
separated. Link-local and cloud metadata addresses (169.254.0.0/16, fe80::/10,
fd00:ec2::254) are refused unless ``allow_link_local`` is set or the address is
listed in ``hosts`` explicitly. HTTP redirects are never followed (by either side).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .codec import parse_size
from .errors import ConfigError
from .refs import RefError

DEFAULT_MAX_PAYLOAD = 64 * 2**30
ENV = {
    "schemes": "FLWR_TRANSPORTS_ALLOWED_SCHEMES",
    "hosts": "FLWR_TRANSPORTS_ALLOWED_HOSTS",
    "ports": "FLWR_TRANSPORTS_ALLOWED_PORTS",
    "file_roots": "FLWR_TRANSPORTS_FILE_ROOTS",
    "max_payload": "FLWR_TRANSPORTS_MAX_PAYLOAD",
    "allow_link_local": "FLWR_TRANSPORTS_ALLOW_LINK_LOCAL",
}
#: never a legitimate place for a payload, whatever file_roots says by default
SYSTEM_DIRS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc",
               "/root", "/run", "/sbin", "/sys", "/usr", "/var/lib", "/var/spool", "/var/run")
LINK_LOCAL = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"),
              ipaddress.ip_network("fd00:ec2::254/128"))


class PolicyError(RefError):
    """The client's policy refuses what a server's message asks it to touch."""


def _setting_hint(name: str) -> str:
    return f"PayloadMod({name}=...) or the environment variable {ENV[name]}"


def _split(v: Any) -> list[str]:
    if isinstance(v, str):
        return [x.strip() for x in v.split(",") if x.strip()]
    return [str(x).strip() for x in v if str(x).strip()]


def _ports(v: Any) -> frozenset[int]:
    out: set[int] = set()
    for p in _split([v] if isinstance(v, int) else v):
        lo, _, hi = p.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise ConfigError(f"invalid port {p!r} in the client policy's ports") from None
        if not 0 < a <= b < 65536:
            raise ConfigError(f"invalid port range {p!r} in the client policy's ports")
        out.update(range(a, b + 1))
    return frozenset(out)


def _is_net(entry: str) -> bool:
    try:
        ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False
    return True


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    return str(v).strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class ClientPolicy:
    """A resolved policy (see the module docstring); build it with :meth:`build`."""

    schemes: frozenset[str] | None = None
    hosts: tuple[str, ...] | None = None
    ports: frozenset[int] | None = None
    file_roots: tuple[str, ...] | None = None
    max_payload: int = DEFAULT_MAX_PAYLOAD
    allow_link_local: bool = False

    @classmethod
    def build(cls, *, schemes=None, hosts=None, ports=None, file_roots=None, max_payload=None,
              allow_link_local=None, environ: dict[str, str] | None = None) -> ClientPolicy:
        """Settings given here win; unset ones come from the environment, then defaults."""
        env = os.environ if environ is None else environ

        def pick(name: str, value: Any) -> Any:
            if value is not None:
                return value
            raw = env.get(ENV[name], "")
            return raw if raw.strip() else None

        schemes, hosts = pick("schemes", schemes), pick("hosts", hosts)
        ports, roots = pick("ports", ports), pick("file_roots", file_roots)
        cap, ll = pick("max_payload", max_payload), pick("allow_link_local", allow_link_local)
        try:
            cap_n = DEFAULT_MAX_PAYLOAD if cap is None else parse_size(cap)
        except ValueError as exc:
            raise ConfigError(f"client policy max_payload: {exc}") from None
        roots_t = None
        if roots is not None:
            roots_t = tuple(os.path.realpath(r) for r in _split(roots.split(os.pathsep)
                            if isinstance(roots, str) else roots))
            if any(not os.path.isabs(r) for r in _split(roots.split(os.pathsep)
                   if isinstance(roots, str) else roots)):
                raise ConfigError("client policy file_roots must be absolute directories")
        host_t = None
        if hosts is not None:
            host_t = tuple(h.lower() for h in _split(hosts))
        return cls(
            schemes=None if schemes is None else frozenset(s.lower() for s in _split(schemes)),
            hosts=host_t,
            ports=None if ports is None else _ports(ports),
            file_roots=roots_t,
            max_payload=cap_n,
            allow_link_local=False if ll is None else _bool(ll),
        )

    # -- checks -------------------------------------------------------------------------
    def check_scheme(self, scheme: str) -> None:
        if self.schemes is not None and scheme not in self.schemes:
            raise PolicyError(
                f"this client's policy does not allow {scheme}:// payloads (allowed: "
                f"{', '.join(sorted(self.schemes)) or 'none'}; change it with "
                f"{_setting_hint('schemes')})")

    def check_size(self, size: int) -> None:
        if size > self.max_payload:
            raise PolicyError(
                f"payload of {size} bytes exceeds this client's limit of {self.max_payload} "
                f"(raise it with {_setting_hint('max_payload')})")

    def _host_listed(self, host: str, addrs: list) -> bool:
        for entry in self.hosts or ():
            if entry.startswith("*."):
                if host.endswith(entry[1:]):
                    return True
                continue
            try:
                net = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                if host == entry:
                    return True
                continue
            if addrs and all(a in net for a in addrs):
                return True
        return False

    def check_host(self, what: str, host: str, port: int | None) -> list[str]:
        """Check a host (name or address) and port; return the addresses it resolved to
        (all of them passed). Raises PolicyError naming the setting to change."""
        host = host.strip("[]").lower()
        by_name = self.hosts is not None and self._host_listed(host, [])
        try:
            addrs = [ipaddress.ip_address(host)]
        except ValueError:
            if self.hosts is not None and not by_name and not any(
                    _is_net(e) for e in self.hosts):
                addrs = []  # not listed, and no network entry it could match
            else:
                try:
                    infos = socket.getaddrinfo(host, port or 0, type=socket.SOCK_STREAM)
                except (OSError, UnicodeError) as exc:
                    if self.hosts is None or by_name:
                        raise PolicyError(f"{what}: cannot resolve host {host!r}: {exc}"
                                          ) from None
                    infos = []  # unresolvable and not listed by name: not allowed
                addrs = sorted({ipaddress.ip_address(i[4][0].split("%")[0]) for i in infos},
                               key=str)
        listed = by_name or (self.hosts is not None and self._host_listed(host, addrs))
        if self.hosts is not None and not listed:
            raise PolicyError(
                f"{what}: host {host!r} is not among the hosts this client's policy allows "
                f"({', '.join(self.hosts) or 'none'}); add it with {_setting_hint('hosts')}")
        bad = [a for a in addrs if any(a in n for n in LINK_LOCAL)
               or (a.version == 6 and a.ipv4_mapped is not None
                   and any(a.ipv4_mapped in n for n in LINK_LOCAL))]
        explicit = listed and any(not e.startswith("*.") for e in self.hosts or ())
        if bad and not (self.allow_link_local or explicit):
            raise PolicyError(
                f"{what}: host {host!r} is a link-local or cloud metadata address "
                f"({', '.join(map(str, bad))}); refused (allow it with "
                f"{_setting_hint('allow_link_local')}, or list it in hosts)")
        if self.ports is not None and port is not None and port not in self.ports:
            raise PolicyError(
                f"{what}: port {port} of {host!r} is not allowed by this client's policy; "
                f"change it with {_setting_hint('ports')}")
        return [str(a) for a in addrs]

    def check_url(self, what: str, url: Any) -> None:
        if not isinstance(url, str):
            return  # the link rejects it with its own message
        u = urlsplit(url)
        if u.scheme not in ("http", "https"):
            raise PolicyError(f"{what}: only http(s) URLs are followed, got {u.scheme!r}")
        try:
            port = u.port or (443 if u.scheme == "https" else 80)
        except ValueError:
            raise PolicyError(f"{what}: URL has an invalid port") from None
        self.check_host(what, u.hostname or "", port)

    def check_file(self, what: str, path: Any) -> None:
        if not isinstance(path, str) or "\x00" in path or not os.path.isabs(path):
            return  # the link rejects it
        d = os.path.realpath(os.path.dirname(os.path.normpath(path)))
        if self.file_roots is None:
            if any(d == s or d.startswith(s + os.sep) for s in SYSTEM_DIRS):
                raise PolicyError(
                    f"{what}: {d!r} is a system directory; refused (name the payload "
                    f"directories with {_setting_hint('file_roots')})")
            return
        if not any(d == r or d.startswith(r.rstrip(os.sep) + os.sep) for r in self.file_roots):
            raise PolicyError(
                f"{what}: directory {d!r} is not under the file roots this client's policy "
                f"allows ({', '.join(self.file_roots) or 'none'}); change it with "
                f"{_setting_hint('file_roots')}")

    def check_location(self, scheme: str, desc: Any, *, upload: bool) -> Any:
        """Check a reference location (``upload=False``) or a ticket slot; return the
        descriptor to hand to the link (tcp/rdma: the host pinned to the address that
        was checked, so a second DNS answer cannot point elsewhere)."""
        self.check_scheme(scheme)
        what = f"{scheme}:// {'upload slot' if upload else 'payload location'}"
        if not isinstance(desc, dict):
            return desc  # the link rejects it
        if scheme in ("tcp", "rdma"):
            host, port = desc.get("host"), desc.get("port")
            if isinstance(host, str) and isinstance(port, int):
                addrs = self.check_host(what, host, port)
                if addrs and host.strip("[]").lower() != addrs[0]:
                    desc = {**desc, "host": addrs[0]}
        elif scheme == "s3":
            if upload:
                put = desc.get("put")
                self.check_url(what, put.get("base") if isinstance(put, dict) else None)
            else:
                self.check_url(what, desc.get("get"))
        elif scheme == "file":
            self.check_file(what, desc.get("path"))
        return desc


def default_policy() -> ClientPolicy:
    """The policy from the environment alone (what ``payload_mod`` uses)."""
    return ClientPolicy.build()

