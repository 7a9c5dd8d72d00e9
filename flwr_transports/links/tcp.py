"""``tcp://HOST:PORT``: a payload server inside the ServerApp process.

The server link starts a threaded payload server when it is created (by the
``offload`` wrapper, at the first round) and stops it in ``close()`` (when the run
ends or fails). ``HOST`` is the name or address clients dial; ``PORT`` 0 picks a free
port, which then goes into every descriptor. Clients GET the published global payload
and PUT their replies into upload slots, in parallel chunks, pipelined, each chunk
checked by CRC-32 (see :mod:`flwr_transports.links.chunks` for the protocol).

URL options (query string or ``offload(...)`` keywords) are declared once, with their
defaults and meaning, in :attr:`TcpServerLink.OPTIONS` (rendered in docs/links/tcp.md).

TLS (option ``tls``, default ``auto``): on whenever ``HOST``, the address clients are
told to dial, is not loopback. The server makes an ephemeral self-signed certificate
(or loads ``tls_cert``/``tls_key``) and puts its SHA-256 fingerprint in every
descriptor (``"tls": {"fp": ...}``); the descriptor travels over Flower's own
authenticated channel, so no PKI is needed. A client then accepts exactly that
certificate (no CA chain, no host name) and refuses a server that does not speak TLS.
Plaintext only for a loopback ``HOST`` or with ``tls=off`` (logged).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import re
import secrets
import ssl
from typing import Any
from urllib.parse import urlsplit

from ..codec import EncodedPayload
from ..options import Option, choice, duration, integer, optional, parse_size, size, text
from ..refs import RefError
from ..settings import raw as raw_setting
from . import chunks
from .base import ClientLink, Endpoint, LinkError, PayloadSource, ServerLink

_HOST_RE = re.compile(r"^[A-Za-z0-9._:-]{1,253}$")
_TOKEN_RE = re.compile(r"^[0-9a-f]{64}$")
_FP_RE = re.compile(r"^[0-9a-f]{64}$")

log = logging.getLogger("flwr_transports.links")


def is_loopback(host: str) -> bool:
    """True when ``host`` (the address clients dial) surely stays on this machine: a
    loopback address (127.0.0.0/8, ::1, ::ffff:127.x) or the name ``localhost``. Names
    are not resolved: any other name may reach another host, so it counts as network."""
    h = host.strip("[]").lower().rstrip(".")
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(h.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


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
        Option("tls", choice("auto", "on", "off"), "auto", "auto: TLS unless HOST (the "
               "address clients dial) is loopback; on: always (loopback too); off: plaintext, "
               "logged. The certificate is ephemeral (made per run) unless tls_cert is given; "
               "clients pin its SHA-256 fingerprint from the reference"),
        Option("tls_cert", optional(text), None, "PEM certificate: serve TLS (clients pin its "
               "fingerprint from the reference)"),
        Option("tls_key", optional(text), None, "PEM private key for tls_cert"),
        Option("buffer_pool", size(0), 2**30, "bytes of upload buffers kept for reuse by the "
               "next round's replies (0 disables; clients: env FLWR_TRANSPORTS_BUFFER_POOL)", shown="1GiB"),
        Option("spill", choice("auto", "off"), "auto", "auto: an upload that streaming "
               "aggregation folds as it lands is received into an unlinked file in spill_dir "
               "(pages dropped from the ServerApp as they arrive: its memory stays flat in "
               "the number of nodes; a rebuild re-reads the file); off: into memory"),
        Option("spill_dir", optional(text), None, "directory of the spill files (default: "
               "the system's temporary directory; put it on a disk, not a tmpfs, for the "
               "memory to be reclaimable)", shown="$TMPDIR"),
    )
    conn_cls: type[chunks.ServerConn] = chunks.ServerConn

    @classmethod
    def local_url(cls, workdir: str, host: str = "127.0.0.1") -> str | None:
        return f"{cls.scheme}://{host}:0"

    def __init__(self, url, run_id, options=None):
        super().__init__(url, run_id, options)
        options, t = self.options, self.spec
        url = t.url
        if t.path.strip("/") or t.fragment:
            raise ValueError(f"{self.scheme}:// takes HOST:PORT only, got {url!r}")
        port, host = t.port, t.host
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
        ssl_ctx = self._tls_setup(options)
        pool_cap = options.buffer_pool
        self.secret = secrets.token_bytes(32)
        self.server = chunks.ChunkServer(
            bind_host, bind_port, secret=self.secret, timeout=self.timeout,
            max_conns=max_conns, ssl_ctx=ssl_ctx, conn_cls=self.conn_cls, name=self.scheme,
            pool_cap=pool_cap, spill=options.spill == "auto", spill_dir=options.spill_dir)
        self.server.on_landed = self.notify_landed  # wakes the receive loop at once
        # the advertised port: the URL's, or the one we got if the URL said 0
        self.port = port or self.server.port
        self._published: dict[str, str] = {}
        self.setup()

    def setup(self) -> None:
        """Hook for wires that need more than the TCP server (rdma://)."""

    def _tls_setup(self, options) -> ssl.SSLContext | None:
        """Decide TLS from the ``tls`` option and the advertised host; set ``self.tls``
        (what descriptors carry) and return the server context (None: plaintext)."""
        mode = options.get("tls", "auto")
        given = bool(options.tls_cert or options.tls_key)
        loopback = is_loopback(self.host)
        if mode == "off":
            if given:
                raise ValueError(f"{self.scheme}:// tls=off contradicts tls_cert/tls_key: "
                                 "drop one of them")
            if loopback:
                log.info("%s:// payload server on loopback %s: plaintext (tls=off)",
                         self.scheme, self.host)
            else:
                log.warning("%s:// payload server %s: tls=off, model bytes cross the network "
                            "in the clear (drop tls=off to encrypt them)", self.scheme,
                            self.host)
            return None
        if mode == "auto" and loopback and not given:
            log.info("%s:// payload server on loopback %s: plaintext (nothing leaves this "
                     "machine; tls=on forces TLS)", self.scheme, self.host)
            return None
        if given:
            ctx, self.tls = _server_tls(options.tls_cert, options.tls_key)
            what = f"certificate {options.tls_cert}"
        else:
            ctx, self.tls = _ephemeral_tls(self.host)
            what = "an ephemeral self-signed certificate"
        log.info("%s:// payload server %s: TLS with %s, SHA-256 %s... pinned in every "
                 "reference", self.scheme, self.host, what, self.tls["fp"][:16])
        return ctx

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


def _server_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _server_tls(cert: str | None, key: str | None) -> tuple[ssl.SSLContext, dict[str, str]]:
    if not cert:
        raise ValueError("tls_key needs tls_cert (a PEM certificate file)")
    try:
        with open(cert, encoding="ascii") as f:
            text = f.read()
        ctx = _server_context()
        ctx.load_cert_chain(cert, key or None)
    except (OSError, ssl.SSLError, UnicodeDecodeError) as exc:
        raise LinkError(f"cannot load TLS certificate/key ({cert!r}, {key!r}): {exc}") from None
    m = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", text, re.DOTALL)
    if not m:
        raise LinkError(f"{cert!r} holds no PEM certificate")
    pem = m.group(0) + "\n"
    return ctx, {"fp": hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()}


def _ephemeral_tls(host: str) -> tuple[ssl.SSLContext, dict[str, str]]:
    """A fresh self-signed certificate (EC P-256, valid 30 days) and a server context
    serving it. The private key never reaches a file system: it is handed to OpenSSL
    through an anonymous memory file (``memfd``) where the platform has one, else
    through a private temporary directory removed at once."""
    import datetime

    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:  # a core dependency (and Flower's): only a broken install
        raise LinkError("tcp:// TLS needs the 'cryptography' package to make its "
                        "certificate: pip install cryptography (or give tls_cert/tls_key, "
                        "or tls=off on a trusted network)") from None
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flwr-transports payload server")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(key, hashes.SHA256()))
    pem = (cert.public_bytes(serialization.Encoding.PEM)
           + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption()))
    ctx = _server_context()
    _load_pem_chain(ctx, pem)
    der = cert.public_bytes(serialization.Encoding.DER)
    return ctx, {"fp": hashlib.sha256(der).hexdigest()}


def _load_pem_chain(ctx: ssl.SSLContext, pem: bytes) -> None:
    """``ctx.load_cert_chain`` from bytes (OpenSSL's Python API takes only paths)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("ftx-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
            return
        except OSError:
            pass  # no /proc: fall through
        finally:
            os.close(fd)
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="ftx-tls-")  # mode 0700
    try:
        path = os.path.join(d, "chain.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        ctx.load_cert_chain(path)
    finally:
        shutil.rmtree(d, ignore_errors=True)


_CLIENT_CTX: list[ssl.SSLContext] = []


def _client_context() -> ssl.SSLContext:
    """The pinned-fingerprint client context, made once per process (reusable: it holds
    no trust anchors, each connection checks its own fingerprint)."""
    if not _CLIENT_CTX:
        _CLIENT_CTX.append(chunks.pinned_client_context())
    return _CLIENT_CTX[0]


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
    cap = raw_setting("FLWR_TRANSPORTS_TCP_TIMEOUT")  # a client-side cap: the smaller wins
    if cap is not None:
        try:
            timeout = min(timeout, max(0.05, float(cap)))
        except ValueError:
            log.warning("ignoring FLWR_TRANSPORTS_TCP_TIMEOUT=%r: give seconds", cap)
    # TLS: a "tls" entry makes it required, with exactly the pinned certificate. A
    # descriptor without one is plaintext: the server's decision (tls=off, or a loopback
    # HOST), and the server is the party that sent this descriptor over Flower's channel.
    ssl_ctx, fp = None, None
    tls = loc.get("tls")
    if tls is not None:
        fp = tls.get("fp") if isinstance(tls, dict) else None
        if not (isinstance(fp, str) and _FP_RE.match(fp)):
            raise RefError("tcp:// location requires TLS but has no valid pinned certificate "
                           "fingerprint (tls.fp: 64 lowercase hex digits)")
        ssl_ctx = _client_context()
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

    def endpoints(self, desc: dict[str, Any], *, upload: bool) -> list[Endpoint]:
        """The peer ``host``:``port`` (the client policy pins ``host`` to the address
        it checked; the link connects to exactly that)."""
        if not isinstance(desc, dict):
            raise RefError(f"{self.scheme}:// descriptor is not an object")
        return [Endpoint.peer("host", desc.get("host"), desc.get("port"))]

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
