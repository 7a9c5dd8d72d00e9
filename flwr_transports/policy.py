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
``max_wait``        ``FLWR_TRANSPORTS_MAX_WAIT``        900 s
==================  ==================================  ======================================

``max_wait`` caps how long a server may make this client wait for a payload to appear
(s3:// ``wait``: the fields each link declares in ``ClientLink.WAIT_FIELDS``): the
smaller of the server's value and the client's applies.

``hosts`` entries are host names (``store.example.org``), suffix patterns
(``*.example.org``), addresses or networks (``10.0.0.0/8``, ``fd00::/8``); a name
matches by name, or by every address it resolves to. Environment lists are comma
separated. Link-local and cloud metadata addresses (:data:`LINK_LOCAL`: 169.254.0.0/16,
fe80::/10, fd00:ec2::254, fd20:ce::254, 100.100.100.200, 168.63.129.16, also written
inside IPv6 as IPv4-mapped, IPv4-compatible or NAT64 ``64:ff9b::/96``) are refused
unless ``allow_link_local`` is set or the address is listed in ``hosts`` explicitly: by
its name, or by an address or network entry that lies inside those ranges (a
``*.suffix`` pattern or a wider network never counts). HTTP redirects are never
followed (by either side).

What is checked is what each link declares (:meth:`ClientLink.endpoints
<flwr_transports.links.base.ClientLink.endpoints>`): every URL, peer and file a
reference or slot makes the client contact, parsed once by
:class:`~flwr_transports.links.base.Endpoint` (a URL that the HTTP client would read
differently is refused); a link that declares nothing is refused.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Any

from .codec import parse_size
from .errors import ConfigError
from .links.base import Endpoint
from .options import parse_duration
from .refs import RefError

DEFAULT_MAX_PAYLOAD = 64 * 2**30
DEFAULT_MAX_WAIT = 900.0
ENV = {
    "schemes": "FLWR_TRANSPORTS_ALLOWED_SCHEMES",
    "hosts": "FLWR_TRANSPORTS_ALLOWED_HOSTS",
    "ports": "FLWR_TRANSPORTS_ALLOWED_PORTS",
    "file_roots": "FLWR_TRANSPORTS_FILE_ROOTS",
    "max_payload": "FLWR_TRANSPORTS_MAX_PAYLOAD",
    "allow_link_local": "FLWR_TRANSPORTS_ALLOW_LINK_LOCAL",
    "max_wait": "FLWR_TRANSPORTS_MAX_WAIT",
}
#: never a legitimate place for a payload, whatever file_roots says by default
SYSTEM_DIRS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc",
               "/root", "/run", "/sbin", "/sys", "/usr", "/var/lib", "/var/spool", "/var/run")
SHM_DIR = "/dev/shm"
#: link-local and cloud metadata addresses: refused unless allowed explicitly.
#: 169.254.0.0/16 holds the metadata service of AWS, GCP, Azure, OCI, DigitalOcean,
#: OpenStack (169.254.169.254) and Tencent (169.254.0.23); fd00:ec2::254: AWS over
#: IPv6; fd20:ce::254: GCP over IPv6; 100.100.100.200: Alibaba Cloud;
#: 168.63.129.16: Azure's WireServer (host agent, never a payload store)
LINK_LOCAL = tuple(ipaddress.ip_network(n) for n in (
    "169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128", "fd20:ce::254/128",
    "100.100.100.200/32", "168.63.129.16/32"))
#: IPv6 prefixes whose last 32 bits are an IPv4 address a connection reaches
#: (IPv4-compatible, NAT64 well-known and local-use /96 forms); ::ffff:0:0/96 is
#: ``ipv4_mapped``
_EMBEDS_V4 = tuple(ipaddress.ip_network(n) for n in ("::/96", "64:ff9b::/96",
                                                      "64:ff9b:1::/96"))


def _forms(a: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list:
    """The address and the IPv4 address an IPv6 form of it reaches, if any."""
    out = [a]
    if a.version == 6:
        if a.ipv4_mapped is not None:
            out.append(a.ipv4_mapped)
        elif any(a in n for n in _EMBEDS_V4) and int(a) & 0xFFFFFFFF > 1:
            out.append(ipaddress.IPv4Address(int(a) & 0xFFFFFFFF))  # not :: or ::1
    return out


def _refused_address(a) -> bool:
    return any(f in n for f in _forms(a) for n in LINK_LOCAL if f.version == n.version)


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
    max_wait: float = DEFAULT_MAX_WAIT

    @classmethod
    def build(cls, *, schemes=None, hosts=None, ports=None, file_roots=None, max_payload=None,
              allow_link_local=None, max_wait=None,
              environ: dict[str, str] | None = None) -> ClientPolicy:
        """Settings given here win; unset ones come from the environment, then defaults."""
        from .settings import raw

        def pick(name: str, value: Any) -> Any:
            return value if value is not None else raw(ENV[name], environ)

        schemes, hosts = pick("schemes", schemes), pick("hosts", hosts)
        ports, roots = pick("ports", ports), pick("file_roots", file_roots)
        cap, ll = pick("max_payload", max_payload), pick("allow_link_local", allow_link_local)
        wait = pick("max_wait", max_wait)
        try:
            wait_s = DEFAULT_MAX_WAIT if wait is None else float(parse_duration(wait))
        except ValueError as exc:
            raise ConfigError(f"client policy max_wait: {exc}") from None
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
            max_wait=wait_s,
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

    def _listed_by(self, host: str, addrs: list) -> list[str]:
        """The ``hosts`` entries that allow ``host`` (resolved to ``addrs``)."""
        out = []
        for entry in self.hosts or ():
            if entry.startswith("*."):
                if host.endswith(entry[1:]):
                    out.append(entry)
                continue
            try:
                net = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                if host == entry:
                    out.append(entry)
                continue
            if addrs and all(a in net for a in addrs):
                out.append(entry)
        return out

    def _host_listed(self, host: str, addrs: list) -> bool:
        return bool(self._listed_by(host, addrs))

    def _explicit(self, host: str, bad: list) -> bool:
        """Whether ``hosts`` names these link-local/metadata addresses explicitly: by
        the host's own name, or by address/network entries inside the refused ranges
        (never by a ``*.suffix`` pattern or a wider network such as 0.0.0.0/0)."""
        for entry in self.hosts or ():
            if entry.startswith("*."):
                continue
            try:
                net = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                if host == entry:
                    return True
                continue
            if all(a in net for a in bad) and any(
                    net.version == n.version and net.subnet_of(n) for n in LINK_LOCAL):
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
        bad = [a for a in addrs if _refused_address(a)]
        if bad and not (self.allow_link_local or self._explicit(host, bad)):
            raise PolicyError(
                f"{what}: host {host!r} is a link-local or cloud metadata address "
                f"({', '.join(map(str, bad))}); refused (allow it with "
                f"{_setting_hint('allow_link_local')}, or list it in hosts by name or "
                "address; a *.suffix pattern does not count)")
        if self.ports is not None and port is not None and port not in self.ports:
            raise PolicyError(
                f"{what}: port {port} of {host!r} is not allowed by this client's policy; "
                f"change it with {_setting_hint('ports')}")
        return [str(a) for a in addrs]

    def check_url(self, what: str, url: Any) -> Endpoint:
        """Check an http(s) URL; return the one parsed value (what to connect to)."""
        try:
            ep = Endpoint.http(what, url)
        except RefError as exc:
            raise PolicyError(str(exc)) from None
        self.check_host(what, ep.host, ep.port)
        return ep

    def check_file(self, what: str, path: Any) -> None:
        if not isinstance(path, str) or "\x00" in path or not os.path.isabs(path):
            return  # the link rejects it
        d = os.path.realpath(os.path.dirname(os.path.normpath(path)))
        if d == SHM_DIR:
            return  # the shm:// link's one directory (segment names are checked there)
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

    def check_endpoint(self, what: str, ep: Endpoint) -> list[str]:
        """Check one declared endpoint; return the addresses a host resolved to."""
        if not isinstance(ep, Endpoint):
            raise PolicyError(f"{what}: the link declared {type(ep).__name__}, not an "
                              "Endpoint; refused")
        w = f"{what} ({ep.field})"
        if ep.kind == "url":
            if ep.scheme not in ("http", "https"):
                raise PolicyError(f"{w}: only http(s) URLs are followed, got {ep.scheme!r}")
            return self.check_host(w, ep.host, ep.port)
        if ep.kind == "hostport":
            return self.check_host(w, ep.host, ep.port)
        if ep.kind == "file":
            self.check_file(w, ep.path)
            return []
        raise PolicyError(f"{w}: unknown endpoint kind {ep.kind!r}; refused")

    def check_location(self, scheme: str, desc: Any, *, upload: bool) -> Any:
        """Check a reference location (``upload=False``) or a ticket slot: every
        endpoint its link declares (:meth:`ClientLink.endpoints
        <flwr_transports.links.base.ClientLink.endpoints>`), the same way for every
        link. Returns the descriptor to hand to the link: a ``hostport`` endpoint's
        field is pinned to the address that was checked, so a second DNS answer cannot
        point elsewhere. A link that declares nothing is refused."""
        from .links import client_link

        self.check_scheme(scheme)
        what = f"{scheme}:// {'upload slot' if upload else 'payload location'}"
        eps = client_link(scheme).endpoints(desc, upload=upload)
        if eps is None:
            raise PolicyError(
                f"{what}: the {scheme}:// link does not declare what its references make "
                "this client contact (ClientLink.endpoints), so this client's policy cannot "
                "check it; refused (the link's author must implement endpoints())")
        pins: dict[str, Any] = {}
        for f in getattr(client_link(scheme), "WAIT_FIELDS", ()):  # the client's cap wins
            w = desc.get(f) if isinstance(desc, dict) else None
            if isinstance(w, int | float) and not isinstance(w, bool) and w > self.max_wait:
                pins[f] = self.max_wait
        seen: dict[tuple, list[str]] = {}
        urls: dict[str, str] = {}  # host name -> the address checked (URL endpoints)
        for ep in eps:
            k = (ep.kind, ep.field.split("[")[0], ep.host, ep.port, ep.path)
            addrs = seen[k] if k in seen else seen.setdefault(k, self.check_endpoint(what, ep))
            if (ep.kind == "hostport" and addrs and isinstance(desc, dict)
                    and isinstance(desc.get(ep.field), str) and ep.host != addrs[0]):
                pins[ep.field] = addrs[0]
            if ep.kind == "url" and addrs and ep.host != addrs[0]:
                urls[ep.host] = addrs[0]
        if isinstance(desc, dict) and (urls or "pinned" in desc):
            # what a URL's host name connects to (the link hands it to its HTTP client);
            # a server's own 'pinned' entry is never used
            pins["pinned"] = urls
        return {**desc, **pins} if pins else desc
