"""The link interface: one small class per side, one module per URL scheme.

A **ServerLink** lives in the ServerApp for one run. It publishes encoded payloads
(the global model, once per round and distinct record), prepares upload *slots* for
replies, opens what clients uploaded (after the wrapper validated the reference) and
removes everything it created on ``close()``.

A **ClientLink** lives in a ClientApp process. It needs no configuration: everything
it needs is in the reference / ticket slot the server sent. It must still validate
those (a reference is network input).

Descriptors (``loc`` and slots) are small JSON-able dicts; their content is private
to each link.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from ..codec import EncodedPayload
from ..errors import FlwrTransportsError
from ..options import (  # noqa: F401 - Option, parse_bool, parse_options re-exported
    Option,
    Options,
    TransportSpec,
    parse_bool,
    parse_options,
    parse_transport,
    split_transport,
)
from ..refs import RefError

NAME_PREFIX = "ftx-"  # every object a link creates starts with this (cleanup looks for it)


class LinkError(FlwrTransportsError, RuntimeError):
    """A link could not do its job (with a message that says what to do)."""


# -- what a client contacts: one parser, one value ------------------------------------
_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]{0,15})://([^/?#]*)([^#]*)$")
#: path and query: RFC 3986 pchar / "/" / "?" only (no space, quote, backslash, ...)
_PATH_RE = re.compile(r"^(?:/[A-Za-z0-9\-._~!$&'()*+,;=:@%/?]*)?(?:\?[A-Za-z0-9\-._~!$&'()*+,;=:@%/?]*)?$")
_AUTH_RE = re.compile(r"^(?:\[([0-9A-Fa-f:.]{2,45})\]|([A-Za-z0-9._-]{1,253}))(?::([0-9]{1,5}))?$")
_LABEL_RE = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_NUMERIC_LABEL = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")
DEFAULT_PORTS = {"http": 80, "https": 443}


def parse_host(host: Any) -> str:
    """A host (name or address, IPv6 with or without brackets) in its one canonical
    form: lower case, addresses compressed, no brackets. Raises ``RefError`` for
    anything else: userinfo, percent-encoding, a zone id, IPv4 in a form other than
    four decimal numbers (``0x7f.1``, ``2130706433``: resolvers read those as
    addresses, humans do not), labels outside letters, digits, ``-`` and ``_``."""
    if not isinstance(host, str) or not 0 < len(host) <= 255:
        raise RefError(f"invalid host {str(host)[:100]!r}")
    h = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if ":" in h:
        try:
            return str(ipaddress.IPv6Address(h))  # no zone id: '%' is refused here
        except ValueError:
            raise RefError(f"invalid IPv6 address {host[:100]!r}") from None
    if h != host:
        raise RefError(f"invalid host {host[:100]!r} (brackets around a non-IPv6 address)")
    h = h.lower()
    labels = h[:-1].split(".") if h.endswith(".") else h.split(".")
    if len(h) > 253 or not all(_LABEL_RE.match(x) for x in labels):
        raise RefError(f"invalid host name {host[:100]!r}")
    if _NUMERIC_LABEL.match(labels[-1]):
        try:
            return str(ipaddress.IPv4Address(h))  # strict: dotted decimal only
        except ValueError:
            raise RefError(f"host {host[:100]!r} is an address in an ambiguous form; "
                           "write it as four decimal numbers") from None
    return h


@dataclass(frozen=True)
class Endpoint:
    """One thing a reference or slot makes a client contact (declared by its link,
    checked by the client policy, :class:`~flwr_transports.policy.ClientPolicy`).

    ``kind``: ``"url"`` (an http(s) request: ``scheme``, ``host``, ``port``, ``path``
    and the exact ``url`` the link requests), ``"hostport"`` (a TCP peer: ``host``,
    ``port``) or ``"file"`` (a local ``path``). ``field``: where in the descriptor it
    came from (``"get"``, ``"put.base"``, ``"host"``, ...); for a ``hostport`` whose
    ``field`` is a top-level key, the policy may pin that key to the checked address.
    Build them with :meth:`http`, :meth:`peer`, :meth:`file`: they parse once, and
    what they parse is what the link uses."""

    kind: str
    field: str
    host: str = ""
    port: int | None = None
    scheme: str = ""
    path: str = ""
    url: str = ""

    @classmethod
    def http(cls, field: str, url: Any, *, max_len: int = 16384) -> Endpoint:
        """Parse an http(s) URL strictly (RFC 3986, no userinfo, no backslash, no
        fragment, printable ASCII only) and refuse it unless the HTTP client's own
        parser (``urllib3.util.parse_url``) reads the same scheme, host and port."""
        if not isinstance(url, str) or not 0 < len(url) <= max_len:
            raise RefError(f"{field}: not a URL")
        if not url.isascii() or not url.isprintable() or " " in url or "\\" in url:
            raise RefError(f"{field}: URL {url[:200]!r} has a character outside RFC 3986 "
                           "(space, control, backslash or non-ASCII)")
        m = _URL_RE.match(url)
        if not m:
            raise RefError(f"{field}: {url[:200]!r} is not an absolute URL without fragment")
        scheme, auth, rest = m.group(1).lower(), m.group(2), m.group(3)
        if scheme not in DEFAULT_PORTS:
            raise RefError(f"{field}: only http(s) URLs are followed, got {scheme!r}")
        am = _AUTH_RE.match(auth)
        if not am or not _PATH_RE.match(rest):
            raise RefError(f"{field}: URL {url[:200]!r} has an invalid authority or path "
                           "(userinfo, percent-encoding and other characters outside RFC "
                           "3986 are refused)")
        host = parse_host(f"[{am.group(1)}]" if am.group(1) is not None else am.group(2))
        port = int(am.group(3)) if am.group(3) else DEFAULT_PORTS[scheme]
        if not 0 < port < 65536:
            raise RefError(f"{field}: URL {url[:200]!r} has an invalid port")
        _same_as_urllib3(field, url, scheme, host, port)
        path, _, _ = rest.partition("?")
        return cls("url", field, host, port, scheme, path or "/", url)

    @classmethod
    def peer(cls, field: str, host: Any, port: Any) -> Endpoint:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise RefError(f"{field}: invalid port {port!r}")
        return cls("hostport", field, parse_host(host), port)

    @classmethod
    def file(cls, field: str, path: Any) -> Endpoint:
        if not isinstance(path, str) or "\x00" in path or not os.path.isabs(path):
            raise RefError(f"{field}: not an absolute path")
        return cls("file", field, path=path)


def _same_as_urllib3(field: str, url: str, scheme: str, host: str, port: int) -> None:
    """Refuse a URL that urllib3 (what requests connects with) reads differently."""
    try:
        from urllib3.util import parse_url
    except ImportError:  # nothing in this process can connect through urllib3
        return
    try:
        u = parse_url(url)
        theirs = (u.scheme, parse_host(u.host or ""),
                  u.port or DEFAULT_PORTS.get(u.scheme or "", 0), u.auth)
    except (ValueError, RefError):
        theirs = None
    if theirs != (scheme, host, port, None):
        raise RefError(f"{field}: URL {url[:200]!r} is read differently by the HTTP client "
                       f"({theirs!r}); refused")


class PayloadSource:
    """A fetched (or fetchable) payload: ``read(offset, n) -> bytes`` and ``close()``.

    Optional hooks a link may set (the wrapper reads only these, declared here):
    ``predecoded``: ``(timeout=None) -> (ArrayRecord, digest)`` when the link already
    decoded the payload while it landed (the caller still checks the digest);
    ``wire_digest``: the digest of the bytes read, when the link computed it;
    ``peek``: ``(offset, n) -> bytes`` for a few scattered bytes (a planner's header
    reads) that must not start the read-ahead ``read`` does (a store's ranged reads:
    what ``read`` fetched ahead would be dropped and fetched again by the fold)."""

    predecoded: Callable[..., Any] | None = None
    wire_digest: str | None = None
    peek: Callable[[int, int], bytes] | None = None

    def __init__(self, read: Callable[[int, int], bytes], size: int, close=None):
        self.read = read
        self.size = size
        self._close = close

    def close(self) -> None:
        if self._close is not None:
            c, self._close = self._close, None
            c()

    def __enter__(self) -> PayloadSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def split_url(url: str) -> tuple[str, str, str, dict[str, str]]:
    """Return (scheme, netloc, path, query options) of a transport URL (a view of
    :func:`~flwr_transports.options.split_transport`, the one URL parser)."""
    t = split_transport(url)
    return t.scheme or "", t.netloc, t.path, dict(t.query)


def as_spec(url: TransportSpec | str) -> TransportSpec:
    """The parsed transport (options not parsed) of ``url``; a spec is returned as is."""
    return url if isinstance(url, TransportSpec) else split_transport(url)


def new_run_prefix(run_id: int | str) -> str:
    """A name prefix unique to this run and process: ftx-<pid>-<run>-<nonce>."""
    run = str(run_id).replace("-", "")[:20] or "0"
    return f"{NAME_PREFIX}{os.getpid()}-{run}-{secrets.token_hex(4)}"


class ServerLink(ABC):
    """Server (ServerApp) side of a link, for one run."""

    scheme: ClassVar[str]
    #: the options this link accepts (URL query or offload keywords), declared once
    OPTIONS: ClassVar[tuple[Option, ...]] = ()
    #: time.perf_counter() when the link last saw an upload complete (None: unknown)
    last_landed: float | None = None
    #: seconds a published payload may be handed out again (kept from an evaluate phase
    #: for the next train round); None: the wrapper's default. s3: half the URLs' life
    reuse_max_age: float | None = None
    #: how often :meth:`wait_landed` looks at ``last_landed`` when no
    #: :meth:`notify_landed` wakes it (links that only set ``last_landed``)
    LANDED_CHECK_S: ClassVar[float] = 0.02

    def notify_landed(self) -> None:
        """Wake :meth:`wait_landed` now: a link calls it right after it updated
        ``last_landed`` (an upload completed). Optional: without it a landing is seen
        within ``LANDED_CHECK_S``."""
        cond = self._landed_cond()
        with cond:
            cond.notify_all()

    def wait_landed(self, since: float | None, timeout: float) -> float | None:
        """Wait until an upload lands after ``since`` (a ``last_landed`` value; None:
        any landing), at most ``timeout`` seconds; return ``last_landed`` (unchanged
        when nothing landed). The receive loop pulls Flower's reply right after a
        landing instead of on a fixed timer. A link that cannot tell when uploads
        land (``last_landed`` stays None) just waits out the timeout."""
        import time

        end = time.monotonic() + max(timeout, 0.0)
        cond = self._landed_cond()
        with cond:
            while True:
                cur = self.last_landed
                if cur is not None and (since is None or cur > since):
                    return cur
                left = end - time.monotonic()
                if left <= 0:
                    return cur
                cond.wait(min(left, self.LANDED_CHECK_S))

    def _landed_cond(self):
        import threading

        cond = self.__dict__.get("_ftx_landed_cond")
        if cond is None:  # setdefault: one Condition even when two threads race here
            cond = self.__dict__.setdefault("_ftx_landed_cond", threading.Condition())
        return cond

    def __init__(self, transport: TransportSpec | str, run_id: int | str,
                 options: Options | dict[str, Any] | None = None):
        """``transport``: the :class:`~flwr_transports.options.TransportSpec` parsed once
        by ``offload()`` (its link options used as given), or a URL string with raw
        keyword ``options``, merged over the URL's query and parsed here, once.
        ``self.spec`` holds the parsed value (``netloc``, ``host``, ``port``, ``path``):
        a link reads its location from there, never from the string again."""
        if isinstance(transport, TransportSpec):
            spec = transport
        elif isinstance(options, Options):  # already parsed (by an older caller)
            spec = replace(split_transport(transport), link=options)
        else:
            spec = parse_transport(transport, link_spec=self.OPTIONS, keywords=options or {})
        self.spec = spec
        self.options = spec.link
        self.url = spec.url
        self.run_id = run_id
        self.prefix = new_run_prefix(run_id)

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(o.name for o in cls.OPTIONS)

    @abstractmethod
    def publish(self, name: str, payload: EncodedPayload) -> dict[str, Any]:
        """Store a payload readable by clients; return its location descriptor."""

    def publish_failed(self, name: str) -> BaseException | None:
        """The error of a publish of ``name`` that failed after :meth:`publish`
        returned (a background upload; waits for one still running), else None. The
        offload wrapper asks before handing a published payload out again, and
        publishes it anew on an error. Links that publish synchronously: None."""
        return None

    @abstractmethod
    def release(self, name: str) -> None:
        """Remove a published payload (idempotent)."""

    @abstractmethod
    def issue_slot(self, name: str, max_size: int) -> dict[str, Any]:
        """Prepare a place a client may upload one reply payload to."""

    @abstractmethod
    def open_upload(self, slot: dict[str, Any], loc: dict[str, Any], size: int) -> PayloadSource:
        """Open what a client uploaded into ``slot``; ``loc`` is what the client claims.

        Must raise ``refs.RefError`` if ``loc`` is not exactly the slot's location (e.g.
        a path outside the link's root), and check the stored size equals ``size``.
        """

    def on_upload(self, slot: dict[str, Any], fn: Callable[[PayloadSource], None]) -> bool:
        """Ask to be told when an upload into ``slot`` is complete: the link then calls
        ``fn(source)`` once, in a background thread, with the payload open for reading
        from the link's own buffers (closed after ``fn`` returns). Nothing is checked
        yet (no reference has arrived): ``fn`` must treat the bytes as untrusted.
        Returns False when the link cannot (the caller reads the upload later with
        ``open_upload``). Streaming aggregation folds uploads this way as they land."""
        return False

    @abstractmethod
    def discard_slot(self, slot: dict[str, Any]) -> None:
        """Remove whatever was uploaded into ``slot`` (idempotent)."""

    @abstractmethod
    def close(self) -> None:
        """Remove everything this link created for the run."""

    @classmethod
    def cleanup(cls, url: TransportSpec | str, *, dry_run: bool = False,
                all_: bool = False) -> list[str]:
        """Find (and unless dry_run remove) leftovers of crashed runs under ``url``
        (``flwr-transports cleanup`` passes the parsed :class:`TransportSpec`; read its
        ``netloc``/``path``/``query``, or :func:`as_spec` it when given a string)."""
        return []

    #: URL ``flwr-transports cleanup`` scans when called without URLs (None: needs one)
    default_cleanup_url: ClassVar[str | None] = None

    @classmethod
    def local_url(cls, workdir: str, host: str = "127.0.0.1") -> str | None:
        """A URL on which this link runs on this machine with nothing else started
        (demo, bench, contract tests); None when it needs an external service."""
        return None

    @classmethod
    def check_here(cls) -> tuple[bool, str]:
        """``flwr-transports doctor``'s check: can this link run on this machine?"""
        return True, f"{cls.__module__}.{cls.__name__} importable"


class ClientLink(ABC):
    """Client (ClientApp) side of a link. Stateless; built from the scheme alone."""

    scheme: ClassVar[str]
    #: descriptor fields holding seconds a server may make the client wait (the
    #: client policy caps them at its ``max_wait``)
    WAIT_FIELDS: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def open(self, loc: dict[str, Any], size: int) -> PayloadSource:
        """Open a published payload for reading."""

    @abstractmethod
    def upload(self, slot: dict[str, Any], payload: EncodedPayload) -> dict[str, Any]:
        """Write a reply payload into a server-issued slot; return its location."""

    def endpoints(self, desc: dict[str, Any], *, upload: bool) -> list[Endpoint] | None:
        """Every :class:`Endpoint` that ``open(desc)`` (``upload=False``) or
        ``upload(desc)`` (``upload=True``) makes this client contact; ``[]`` when it
        contacts nothing outside this process. Build each with ``Endpoint.http`` /
        ``peer`` / ``file`` from exactly the values the link then uses, and raise
        ``RefError`` for a malformed descriptor. The client policy checks exactly this
        list before the link runs; a link that does not say (``None``, the default)
        is refused: implement it in a third-party link."""
        return None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host. A zombie (exited, not yet reaped:
    Flower's SuperExec never waits on the ServerApp it started) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not pid_zombie(pid)


def pid_zombie(pid: int) -> bool:
    """True if ``/proc/<pid>/stat`` says the process is a zombie (state ``Z``) or dead
    (``X``); False where /proc is unavailable."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            raw = f.read(4096)
    except OSError:
        return False
    # "pid (comm) S ...": comm may hold spaces and parentheses; the state follows the
    # LAST closing parenthesis
    _, _, rest = raw.rpartition(b")")
    fields = rest.split()
    return bool(fields) and fields[0] in (b"Z", b"X")


def owner_pid(name: str) -> int | None:
    """The server pid encoded in an ``ftx-<pid>-...`` name, if any."""
    base = name.lstrip(".")
    if not base.startswith(NAME_PREFIX):
        return None
    head = base[len(NAME_PREFIX):].split("-", 1)[0]
    return int(head) if head.isdigit() else None
