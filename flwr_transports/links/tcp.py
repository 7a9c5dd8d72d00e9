"""``tcp://HOST:PORT``: a payload server inside the ServerApp process.

The server link starts a threaded payload server when it is created (by the
``offload`` wrapper, at the first round) and stops it in ``close()`` (when the run
ends or fails). ``HOST`` is the name or address clients dial; ``PORT`` 0 picks a free
port, which then goes into every descriptor. Clients GET the published global payload
and PUT their replies into upload slots, in parallel chunks, pipelined, each chunk
checked by CRC-32 (see :mod:`flwr_transports.links.chunks` for the protocol).

URL options (query string or ``offload(...)`` keywords) are declared once, with their
defaults and meaning, in :attr:`TcpServerLink.OPTIONS` (rendered in docs/links/tcp.md).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import ssl
from typing import Any
from urllib.parse import urlsplit

from ..codec import EncodedPayload
from ..options import Option, duration, integer, optional, parse_size, size, text
from ..refs import RefError
from . import chunks
from .base import ClientLink, LinkError, PayloadSource, ServerLink

_HOST_RE = re.compile(r"^[A-Za-z0-9._:-]{1,253}$")
_TOKEN_RE = re.compile(r"^[0-9a-f]{64}$")
_FP_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_PEM = 16 * 1024


def _chunk_size_opt(v: Any) -> int | None:
    if str(v).strip().lower() == "auto":
        return None
    return chunks.check_chunk_size(parse_size(v))


def _streams_opt(v: Any) -> int:
    """auto -> 0 (each client decides), else 1-64."""
    return 0 if str(v).strip().lower() == "auto" else integer(1, 64)(v)


def _split_hostport(s: str, what: str) -> tuple[str, int | None]:
    u = urlsplit(f"//{s}")
    try:
        port = u.port
    except ValueError:
        raise ValueError(f"{what} {s!r} has an invalid port") from None
    host = u.hostname or ""
    if not host:
        raise ValueError(f"{what} {s!r} has no host")
    return host, port


class TcpServerLink(ServerLink):
    """Server side of ``tcp://``: owns the payload server for the run."""

    scheme = "tcp"
    OPTIONS = (
        Option("bind", optional(text), None, "ADDR or ADDR:PORT to listen on (default: the "
               "URL's HOST:PORT); e.g. 0.0.0.0 behind NAT"),
        Option("chunk_size", _chunk_size_opt, None, "bytes per chunk (64KiB-256MiB), or auto: "
               "1/32 of the payload, rounded down to a power of two, 1-8 MiB", shown="auto"),
        Option("streams", _streams_opt, 0, "parallel connections per transfer (1-64), or "
               "auto: each client opens enough to carry 5 Gbit/s at the RTT it measures (4 on "
               "a LAN, ~15 at 100 ms, at most 32)", shown="auto"),
        Option("window", integer(1, 64), 4, "chunks in flight per connection"),
        Option("timeout", duration(0.05, 86400), 60.0, "seconds any single socket operation may wait"),
        Option("retries", integer(0, 100), 5, "reconnect attempts per connection without "
               "progress"),
        Option("max_conns", integer(1, 65536), 256, "concurrent connections the server accepts; "
               "beyond it clients are told to back off and retry"),
        Option("tls_cert", optional(text), None, "PEM certificate: serve TLS (clients pin its "
               "fingerprint from the reference)"),
        Option("tls_key", optional(text), None, "PEM private key for tls_cert"),
        Option("buffer_pool", size(0), 2**30, "bytes of upload buffers kept for reuse by the "
               "next round's replies (0 disables; clients: env FLWR_TRANSPORTS_BUFFER_POOL)", shown="1GiB"),
    )
    conn_cls: type[chunks.ServerConn] = chunks.ServerConn

    @classmethod
    def local_url(cls, workdir: str, host: str = "127.0.0.1") -> str | None:
        return f"{cls.scheme}://{host}:0"

    def __init__(self, url: str, run_id, options):
        super().__init__(url, run_id, options)
        options = self.options
        u = urlsplit(url)
        if u.path.strip("/") or u.fragment:
            raise ValueError(f"{self.scheme}:// takes HOST:PORT only, got {url!r}")
        try:
            port = u.port
        except ValueError:
            raise ValueError(f"{url!r} has an invalid port") from None
        host = u.hostname
        if not host or port is None:
            raise ValueError(f"{self.scheme}:// needs HOST:PORT, e.g. {self.scheme}://"
                             f"server.example.org:0 (PORT 0 picks a free port), got {url!r}")
        if host in {"0.0.0.0", "::"}:
            raise ValueError(f"{self.scheme}:// HOST is the address clients dial, not {host!r}; "
                             f"put a reachable name in the URL and use bind={host} to listen "
                             "on every interface")
        self.host = host
        bind_host, bind_port = host, port
        if options.bind:
            bind_host, bp = _split_hostport(options.bind, "bind")
            if bp is not None:
                bind_port = bp
        # None = auto: sized per payload (see chunks.auto_chunk_size)
        self.chunk_size: int | None = options.chunk_size
        self._last_cs = chunks.DEFAULT_CHUNK  # upload slots follow the last model's size
        # 0 in descriptors = auto: each client sizes it from the RTT it measures
        self.streams = options.get("streams", 0)  # rdma:// has no streams option
        self.window = options.window
        self.timeout = options.timeout
        self.retries = options.retries
        max_conns = options.max_conns
        self.tls: dict[str, str] | None = None
        ssl_ctx = None
        if options.tls_cert or options.tls_key:
            ssl_ctx, self.tls = _server_tls(options.tls_cert, options.tls_key)
        pool_cap = options.buffer_pool
        self.secret = secrets.token_bytes(32)
        self.server = chunks.ChunkServer(
            bind_host, bind_port, secret=self.secret, timeout=self.timeout,
            max_conns=max_conns, ssl_ctx=ssl_ctx, conn_cls=self.conn_cls, name=self.scheme,
            pool_cap=pool_cap)
        # the advertised port: the URL's, or the one we got if the URL said 0
        self.port = port or self.server.port
        self._published: dict[str, str] = {}
        self.setup()

    def setup(self) -> None:
        """Hook for wires that need more than the TCP server (rdma://)."""

    # ids and descriptors
    def _oid(self, kind: str, name: str) -> str:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:150]
        return f"{kind}.{self.prefix}.{safe}"

    def _desc(self, kind: str, oid: str) -> dict[str, Any]:
        d: dict[str, Any] = {
            "host": self.host, "port": self.port, "id": oid,
            "token": self.server.token(kind, oid).hex(),
            "streams": self.streams, "window": self.window, "timeout": self.timeout,
            "retries": self.retries,
        }
        if self.tls:
            d["tls"] = dict(self.tls)
        return d

    def publish(self, name: str, payload: EncodedPayload) -> dict[str, Any]:
        oid = self._oid("g", name)
        cs = self.chunk_size or chunks.auto_chunk_size(payload.size)
        self._last_cs = cs
        self.server.add_object(oid, payload, cs)
        self._published[name] = oid
        return self._desc("get", oid)

    def release(self, name: str) -> None:
        oid = self._published.pop(name, None)
        if oid:
            self.server.remove_object(oid)

    def issue_slot(self, name: str, max_size: int) -> dict[str, Any]:
        oid = self._oid("p", name)
        self.server.add_slot(oid, max_size)
        cs = self.chunk_size or self._last_cs
        return {**self._desc("put", oid), "chunk_size": cs, "max_size": max_size}

    def _slot_id(self, slot: dict[str, Any], loc: dict[str, Any]) -> str:
        oid = slot.get("id")
        if not isinstance(loc, dict) or loc.get("id") != oid or (
            loc.get("host"), loc.get("port")) != (slot.get("host"), slot.get("port")):
            raise RefError("reply location is not the upload slot issued for it")
        return oid

    def open_upload(self, slot: dict[str, Any], loc: dict[str, Any], size: int) -> PayloadSource:
        return self.server.open_slot(self._slot_id(slot, loc), size)

    def on_upload(self, slot: dict[str, Any], fn) -> bool:
        """See ServerLink.on_upload: called when the upload is complete, with a source
        that views the receive buffer (no copy), instead of the eager decode."""
        oid = slot.get("id")
        return isinstance(oid, str) and self.server.set_hook(oid, fn)

    @property
    def last_landed(self) -> float | None:
        return self.server.last_landed

    def discard_slot(self, slot: dict[str, Any]) -> None:
        oid = slot.get("id")
        if isinstance(oid, str):
            self.server.remove_slot(oid)

    def close(self) -> None:
        self._published.clear()
        self.server.close()


def _server_tls(cert: str | None, key: str | None) -> tuple[ssl.SSLContext, dict[str, str]]:
    if not cert:
        raise ValueError("tls_key needs tls_cert (a PEM certificate file)")
    try:
        with open(cert, encoding="ascii") as f:
            text = f.read()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(cert, key or None)
    except (OSError, ssl.SSLError, UnicodeDecodeError) as exc:
        raise LinkError(f"cannot load TLS certificate/key ({cert!r}, {key!r}): {exc}") from None
    m = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", text, re.DOTALL)
    if not m:
        raise LinkError(f"{cert!r} holds no PEM certificate")
    pem = m.group(0) + "\n"
    fp = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()
    return ctx, {"cert": pem, "fp": fp}


def endpoint_from(loc: dict[str, Any]) -> tuple[chunks.Endpoint, str, bytes, dict[str, int]]:
    """Validate a descriptor (network input) and build the client endpoint."""
    if not isinstance(loc, dict):
        raise RefError("tcp:// location is not an object")
    host, port, oid, token = loc.get("host"), loc.get("port"), loc.get("id"), loc.get("token")
    if not (isinstance(host, str) and _HOST_RE.match(host)):
        raise RefError(f"tcp:// location has an invalid host {host!r}")
    if not (isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536):
        raise RefError(f"tcp:// location has an invalid port {port!r}")
    if not (isinstance(oid, str) and chunks.ID_RE.match(oid)):
        raise RefError("tcp:// location has an invalid object id")
    if not (isinstance(token, str) and _TOKEN_RE.match(token)):
        raise RefError("tcp:// location has an invalid token")
    knobs = {}
    for k, default, hi in (("streams", 4, 64), ("window", 4, 64), ("retries", 5, 100)):
        v = loc.get(k, default)
        if not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= hi):
            raise RefError(f"tcp:// location has an invalid {k} {v!r}")
        knobs[k] = v
    knobs["window"] = max(1, knobs["window"])
    timeout = loc.get("timeout", 60)
    if not (isinstance(timeout, int | float) and 0.05 <= timeout <= 86400):
        raise RefError(f"tcp:// location has an invalid timeout {timeout!r}")
    env_timeout = os.environ.get("FLWR_TRANSPORTS_TCP_TIMEOUT")
    if env_timeout:
        timeout = float(env_timeout)
    ssl_ctx, fp = None, None
    tls = loc.get("tls")
    if tls is not None:
        if not isinstance(tls, dict):
            raise RefError("tcp:// location has an invalid tls entry")
        pem, fp = tls.get("cert"), tls.get("fp")
        if not (isinstance(pem, str) and len(pem) <= MAX_PEM and isinstance(fp, str)
                and _FP_RE.match(fp)):
            raise RefError("tcp:// location has an invalid pinned certificate")
        ssl_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ssl_ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ssl_ctx.check_hostname = False  # pinned: chain to THIS cert + fingerprint match
        ssl_ctx.verify_mode = ssl.CERT_REQUIRED
        ssl_ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        try:
            ssl_ctx.load_verify_locations(cadata=pem)
        except (ssl.SSLError, ValueError) as exc:
            raise RefError(f"tcp:// location has an unusable pinned certificate: {exc}") from None
    ep = chunks.Endpoint(host, port, timeout=float(timeout), ssl_ctx=ssl_ctx, fingerprint=fp)
    return ep, oid, bytes.fromhex(token), knobs


class TcpClientLink(ClientLink):
    """Client side of ``tcp://`` (stateless; everything comes in the descriptor)."""

    scheme = "tcp"
    conn_cls: type[chunks.ClientConn] = chunks.ClientConn

    def __init__(self) -> None:
        self.last_stats: dict[str, int] = {}

    def factory(self, ep: chunks.Endpoint, loc: dict[str, Any]):
        return lambda: self.conn_cls(ep)

    def open(self, loc: dict[str, Any], size: int) -> PayloadSource:
        ep, oid, token, k = endpoint_from(loc)
        self.last_stats = {}
        return chunks.download(
            self.factory(ep, loc), oid, token, size, streams=k["streams"], window=k["window"],
            retries=k["retries"], timeout=ep.timeout, stats=self.last_stats)

    def upload(self, slot: dict[str, Any], payload: EncodedPayload) -> dict[str, Any]:
        ep, oid, token, k = endpoint_from(slot)
        cs = slot.get("chunk_size", chunks.DEFAULT_CHUNK)
        if not (isinstance(cs, int) and chunks.MIN_CHUNK <= cs <= chunks.MAX_CHUNK):
            raise RefError(f"{self.scheme}:// slot has an invalid chunk_size {cs!r}")
        self.last_stats = {}
        chunks.upload(self.factory(ep, slot), oid, token, payload, chunk_size=cs,
                      streams=k["streams"], window=k["window"], retries=k["retries"],
                      timeout=ep.timeout, stats=self.last_stats)
        return {"host": slot["host"], "port": slot["port"], "id": oid}
