"""``tcp://HOST:PORT``: a payload server inside the ServerApp process.

The server link starts a threaded payload server when it is created (by the
``offload`` wrapper, at the first round) and stops it in ``close()`` (when the run
ends or fails). ``HOST`` is the name or address clients dial; ``PORT`` 0 picks a free
port, which then goes into every descriptor. Clients GET the published global payload
and PUT their replies into upload slots, in parallel chunks, pipelined, each chunk
checked by CRC-32 (see :mod:`flwr_transports.links.chunks` for the protocol).

URL options (query string or ``offload(...)`` keywords):

``bind``        address to listen on, ``ADDR`` or ``ADDR:PORT`` (default: HOST, PORT);
                e.g. ``bind=0.0.0.0`` behind NAT, ``bind=0.0.0.0:9000`` behind a port
                forward that clients reach as HOST:PORT
``chunk_size``  bytes per chunk, 64KiB..256MiB, or ``auto`` (default): 1/32 of the
                payload rounded down to a power of two, between 1 MiB and 8 MiB (small
                payloads spread over more parallel streams, which matters when each
                new stream starts in TCP slow start on a long RTT)
``streams``     parallel connections per transfer, or ``auto`` (default): each client
                measures the RTT on its first connection and opens enough streams
                to carry 5 Gbit/s through per-stream TCP window limits (4 on a LAN
                or loopback, ~15 at 100 ms; at most 32)
``window``      chunk requests in flight per connection (default 4)
``timeout``     seconds any single socket operation may wait (default 60)
``retries``     reconnect attempts per connection without progress (default 5)
``max_conns``   concurrent connections the server accepts; beyond it clients are told
                to back off and retry (default 256)
``buffer_pool`` bytes of upload buffers kept for reuse by the next round's replies
                (default 1GiB; 0 disables; clients: env FLWR_TRANSPORTS_BUFFER_POOL)
``tls_cert``, ``tls_key``
                PEM files: serve over TLS. The certificate is pinned in every
                descriptor (clients verify the chain against it AND its SHA-256
                fingerprint, so a self-signed certificate works and no other does).

Access control: every descriptor carries an HMAC-SHA256 token (secret random per
run) for exactly one object: the published payload of one (run, round, record), or
the upload slot of one (run, round, node, slot). It is checked on every request;
anything else is refused, logged and disconnected.

Copies: the server sends straight from the arrays' memory (``sendmsg`` gather I/O,
zero copy in user space) and receives uploads straight into one buffer per slot.
The client gets the chunk table and chunk 0 in one round trip; chunk 0's payload
header says where each array lies, so every other chunk is received straight into
one fresh ``bytes`` object per array, which the decoder hands to Flower's ``Array``
(no copy after the socket; ``read`` waits only for the chunks it covers). Uploads
are decoded in the background as soon as they complete.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import ssl
from typing import Any
from urllib.parse import urlsplit

from ..codec import EncodedPayload, parse_size
from ..refs import RefError
from . import chunks
from .base import ClientLink, LinkError, PayloadSource, ServerLink

_HOST_RE = re.compile(r"^[A-Za-z0-9._:-]{1,253}$")
_TOKEN_RE = re.compile(r"^[0-9a-f]{64}$")
_FP_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_PEM = 16 * 1024


def _int_opt(options: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    v = options.get(key, default)
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise ValueError(f"option {key}={v!r} is not an integer") from None
    if not lo <= n <= hi:
        raise ValueError(f"option {key}={n} must be between {lo} and {hi}")
    return n


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
    options = ("bind", "chunk_size", "streams", "window", "timeout", "retries", "max_conns",
               "tls_cert", "tls_key", "buffer_pool")
    conn_cls: type[chunks.ServerConn] = chunks.ServerConn

    def __init__(self, url: str, run_id, options: dict[str, Any]):
        super().__init__(url, run_id, options)
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
        if options.get("bind"):
            bind_host, bp = _split_hostport(str(options["bind"]), "bind")
            if bp is not None:
                bind_port = bp
        cs_opt = str(options.get("chunk_size", "auto")).strip().lower()
        # None = auto: sized per payload (see chunks.auto_chunk_size)
        self.chunk_size: int | None = (
            None if cs_opt == "auto" else chunks.check_chunk_size(parse_size(cs_opt)))
        self._last_cs = chunks.DEFAULT_CHUNK  # upload slots follow the last model's size
        auto = str(options.get("streams", "auto")).strip().lower() == "auto"
        # 0 in descriptors = auto: each client sizes it from the RTT it measures
        self.streams = 0 if auto else _int_opt(options, "streams", 4, 1, 64)
        self.window = _int_opt(options, "window", 4, 1, 64)
        self.timeout = float(options.get("timeout", 60))
        if not 0.05 <= self.timeout <= 86400:
            raise ValueError("timeout must be between 0.05 and 86400 seconds")
        self.retries = _int_opt(options, "retries", 5, 0, 100)
        max_conns = _int_opt(options, "max_conns", 256, 1, 65536)
        self.tls: dict[str, str] | None = None
        ssl_ctx = None
        if options.get("tls_cert") or options.get("tls_key"):
            ssl_ctx, self.tls = _server_tls(options.get("tls_cert"), options.get("tls_key"))
        pool_cap = parse_size(options.get("buffer_pool", "1GiB"))
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
