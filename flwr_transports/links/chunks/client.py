"""Client side of the chunk engine: connections, the parallel download and
upload loops, and the receive placements (zero-copy scatter into the arrays'
own bytes)."""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import random
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ... import _membuf
from ...codec import EncodedPayload
from ...codec import data_ranges as codec_data_ranges
from ..base import LinkError, PayloadSource
from .buffers import CLIENT_POOL, INFLIGHT, BufferPool, ChunkScheduler, alloc_buffer, close_map
from .protocol import (
    BAD_CRC,
    BAD_REQUEST,
    BUSY,
    BUSY_RETRY_FOR,
    DEFAULT_CHUNK,
    DENIED,
    F_OUT_OF_BAND,
    MAGIC_REQ,
    MAGIC_RSP,
    MAX_ERR_BODY,
    NOT_FOUND,
    OK,
    OP_GET,
    OP_INFO,
    OP_PUT,
    OP_PUT_DONE,
    OP_PUT_OPEN,
    REQ,
    RSP,
    STATUS_NAMES,
    TOO_BIG,
    ProtocolError,
    Refused,
    SegmentView,
    check_chunk_size,
    chunk_len,
    crc_views,
    n_chunks,
    recv_exact,
    recv_exact_into,
    send_buffer_request,
    send_views,
    table_limit,
    tune_socket,
    unpack_table,
)

log = logging.getLogger("flwr_transports.links")


# -- client side -----------------------------------------------------------------------
def pinned_client_context() -> ssl.SSLContext:
    """A TLS client context that trusts nothing by itself: the server's certificate is
    accepted only by :meth:`Endpoint.connect`, when its SHA-256 fingerprint equals the
    one pinned in the reference (no CA chain, no host name: the reference came over
    Flower's authenticated channel). The handshake still proves that the server holds
    the private key of the certificate it shows."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the fingerprint check below is the verification
    return ctx


class Endpoint:
    """Where and how a client connects (from a validated descriptor)."""

    def __init__(self, host: str, port: int, *, timeout: float = 60.0,
                 ssl_ctx: ssl.SSLContext | None = None, fingerprint: str | None = None):
        if ssl_ctx is not None and not fingerprint:
            raise ValueError("a TLS endpoint needs the server certificate's fingerprint")
        self.host, self.port, self.timeout = host, port, timeout
        self.ssl_ctx, self.fingerprint = ssl_ctx, fingerprint

    def connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        try:
            tune_socket(sock)  # no Nagle; a send buffer that fills a long fat pipe
            if self.ssl_ctx is not None:
                try:
                    sock = self.ssl_ctx.wrap_socket(sock, server_hostname=self.host)
                except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError) as exc:
                    # accepted, then closed before any handshake byte: what a TLS
                    # payload server does when it is full (it cannot send BUSY before a
                    # handshake). Back off like BUSY instead of using up ``retries``.
                    raise Busy(f"payload server closed the connection before the TLS "
                               f"handshake ({exc}); it is probably full") from None
                except ssl.SSLError as exc:
                    raise Refused(
                        f"TLS handshake with the payload server {self.host}:{self.port} "
                        f"failed ({exc.reason or exc}); the reference requires TLS, so a "
                        "server that does not speak it is refused (no downgrade)") from None
                der = sock.getpeercert(binary_form=True) or b""
                if not hmac.compare_digest(hashlib.sha256(der).hexdigest(), self.fingerprint):
                    raise Refused("payload server's TLS certificate does not match the "
                                  "one pinned in the reference; refused")
        except BaseException:
            sock.close()
            raise
        return sock


class ClientConn:
    """One client connection; the chunk-data hooks are what a wire overrides."""

    def __init__(self, ep: Endpoint):
        self.ep = ep
        self.sock = ep.connect()

    def request(self, op: int, oid: str, token: bytes, a: int = 0, b: int = 0, crc: int = 0,
                body: Sequence[memoryview] = (), flags: int = 0) -> None:
        oidb = oid.encode()
        send_views(self.sock, [REQ.pack(MAGIC_REQ, op, flags, len(oidb), token, a, b, crc),
                               oidb, *body])

    def response(self) -> tuple[int, int, int, int, int]:
        magic, status, flags, _, a, b, crc = RSP.unpack(recv_exact(self.sock, RSP.size))
        if magic != MAGIC_RSP:
            raise ProtocolError("not a flwr-transports payload server (bad magic)")
        return status, flags, a, b, crc

    def body(self, n: int, limit: int) -> bytes:
        if n > limit:
            raise ProtocolError(f"response body of {n} bytes exceeds {limit}")
        return recv_exact(self.sock, n)

    def error_text(self, status: int, n: int) -> str:
        msg = self.body(min(n, MAX_ERR_BODY), MAX_ERR_BODY).decode("utf-8", "replace")
        name = STATUS_NAMES[status] if status < len(STATUS_NAMES) else str(status)
        return f"{name}: {msg}"

    # hooks --------------------------------------------------------------------------
    def put_chunk(self, oid: str, token: bytes, i: int, crc: int, views: list[memoryview]) -> None:
        self.request(OP_PUT, oid, token, a=i, b=sum(len(v) for v in views), crc=crc, body=views)

    #: chunk data arrives inline, so one chunk can be received into several buffers
    scatter = True

    def recv_chunk_into(self, dest: memoryview, flags: int) -> None:
        if flags & F_OUT_OF_BAND:
            raise ProtocolError("server sent out-of-band chunk data on a tcp connection")
        recv_exact_into(self.sock, dest)

    def recv_chunk_views(self, views: list[memoryview], flags: int) -> None:
        if len(views) == 1:
            return self.recv_chunk_into(views[0], flags)
        if flags & F_OUT_OF_BAND or not self.scatter:
            raise ProtocolError("this wire cannot receive one chunk into several buffers")
        for v in views:
            recv_exact_into(self.sock, v)
        return None

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


ConnFactory = Callable[[], ClientConn]

# statuses after which retrying cannot help
_FATAL = {DENIED, NOT_FOUND, BAD_REQUEST, TOO_BIG}


def raise_status(conn: ClientConn, status: int, n: int, what: str) -> None:
    text = conn.error_text(status, n)
    if status == BUSY:
        raise Busy(f"payload server busy: {text}")
    if status in _FATAL:
        raise Refused(f"payload server refused {what}: {text}")
    raise ProtocolError(f"unexpected reply to {what}: {text}")


class Busy(ConnectionRefusedError):
    """The payload server is at its connection cap (retry after a pause)."""


def busy_pause(n_busy: int) -> float:
    """Jittered exponential back-off after the ``n_busy``-th BUSY answer in a row."""
    return random.uniform(0.5, 1.0) * min(0.05 * 2 ** min(n_busy, 8), 2.0)


def first_request(factory: ConnFactory, fn, retries: int, busy_for: float = BUSY_RETRY_FOR):
    """Open a connection and run ``fn`` on it, retrying transient failures.

    BUSY answers (the server is full, e.g. during a connection flood) do not use up
    ``retries``: the client backs off (jittered, up to 2 s) and keeps trying for
    ``busy_for`` seconds, which outlasts the server's pre-authentication deadline.
    """
    attempt, n_busy = 0, 0
    busy_until = time.monotonic() + busy_for
    while True:
        conn = None
        try:
            conn = factory()
            return conn, fn(conn)
        except Refused:
            if conn is not None:
                conn.close()
            raise
        except Busy as exc:
            if conn is not None:
                conn.close()
            n_busy += 1
            if time.monotonic() > busy_until:
                raise LinkError(f"payload server stayed busy for {busy_for:.0f}s: {exc}"
                                ) from exc
            time.sleep(busy_pause(n_busy))
        except (OSError, ProtocolError) as exc:
            if conn is not None:
                conn.close()
            if attempt >= retries:
                raise LinkError(f"cannot reach the payload server: {exc}") from exc
            time.sleep(min(0.05 * 2 ** attempt, 2.0))
            attempt += 1


class _Workers:
    """Run ``streams`` connection loops over one scheduler, with reconnects."""

    def __init__(self, sched: ChunkScheduler, factory: ConnFactory, first: ClientConn | None,
                 streams: int, retries: int, loop: Callable[[ClientConn], None], name: str):
        self.sched, self.factory, self.retries, self.loop = sched, factory, retries, loop
        self.conns: set[ClientConn] = set()
        self.lock = threading.Lock()
        self.threads = []
        for k in range(streams):
            t = threading.Thread(target=self._run, args=(first if k == 0 else None,),
                                 name=f"{name}-{k}", daemon=True)
            self.threads.append(t)
        for t in self.threads:
            t.start()

    def _run(self, conn: ClientConn | None) -> None:
        sched, failures, last = self.sched, 0, None
        n_busy, busy_until = 0, time.monotonic() + BUSY_RETRY_FOR
        try:
            while not (sched.finished or sched.error or sched.stopped):
                if conn is None:
                    try:
                        conn = self.factory()
                    except Refused as exc:
                        sched.fail(exc)
                        return
                    except OSError as exc:
                        failures, last = failures + 1, exc
                        if failures > self.retries:
                            return
                        time.sleep(min(0.05 * 2 ** failures, 2.0))
                        continue
                with self.lock:
                    self.conns.add(conn)
                done_before = sched.stats["chunks"]
                try:
                    self.loop(conn)
                    return
                except Refused as exc:
                    sched.fail(exc)
                    return
                except Busy as exc:
                    n_busy, last = n_busy + 1, exc
                    if sched.stopped or time.monotonic() > busy_until:
                        return
                    time.sleep(busy_pause(n_busy))
                except (OSError, ProtocolError, ValueError, struct.error) as exc:
                    if sched.stopped:
                        return
                    if sched.stats["chunks"] > done_before:
                        failures = 0  # progress since the last failure
                    failures, last = failures + 1, exc
                    with sched.cond:
                        sched.stats["reconnects"] += 1
                    log.info("payload connection lost (%s); resuming (%d/%d)", exc, failures,
                             self.retries)
                    if failures > self.retries:
                        return
                    time.sleep(min(0.02 * 2 ** failures, 2.0))
                finally:
                    with self.lock:
                        self.conns.discard(conn)
                    conn.close()
                    conn = None
        except BaseException as exc:  # noqa: BLE001 - never lose an error in a thread
            last = exc
            sched.fail(exc if isinstance(exc, LinkError) else LinkError(f"transfer failed: {exc!r}"))
        finally:
            if conn is not None:
                conn.close()
            sched.worker_exit(last)

    def stop(self, join: float = 5.0) -> None:
        self.sched.stop()
        with self.lock:
            for c in list(self.conns):
                try:
                    c.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for t in self.threads:
            t.join(join)


#: what ``streams=0`` (auto) sizes the parallel connections for, in bytes per second
AUTO_TARGET_RATE = 0.625e9  # 5 Gbit/s per transfer
AUTO_MIN_STREAMS, AUTO_MAX_STREAMS = 4, 32


def _sysctl_max(name: str, default: int) -> int:
    try:
        with open(f"/proc/sys/net/ipv4/{name}", encoding="ascii") as f:
            return int(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        return default


def conn_rtt(sock) -> float | None:
    """The kernel's smoothed RTT of a connected TCP socket, in seconds (Linux)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, "TCP_INFO", 11), 104)
        (rtt_us,) = struct.unpack_from("I", info, 68)  # struct tcp_info.tcpi_rtt
    except (OSError, struct.error, ValueError, AttributeError):
        return None
    return rtt_us / 1e6 if rtt_us else None


#: share of a TCP send buffer that is data in flight (the rest: the kernel's per-packet
#: bookkeeping); measured at 100 ms RTT: 25 MB/s with a 4 MiB buffer, 45 MB/s with 8 MiB
SEND_BUFFER_PAYLOAD = 0.55


def stream_window() -> int:
    """Bytes one TCP stream keeps in flight at most, on this host's settings: the
    usable part of the send buffer (what :func:`send_buffer_request` gets, else the
    autotuning cap ``tcp_wmem``), bounded by the receive window (half of ``tcp_rmem``'s
    maximum, with the default ``tcp_adv_win_scale``)."""
    req = send_buffer_request()
    send_cap = 2 * req if req else _sysctl_max("tcp_wmem", 4 << 20)
    return max(1 << 16, int(min(SEND_BUFFER_PAYLOAD * send_cap,
                                _sysctl_max("tcp_rmem", 6 << 20) / 2)))


def auto_streams(sock, n_chunks_left: int) -> int:
    """Parallel connections for a transfer when ``streams`` is 0 (auto).

    One TCP stream moves at most one :func:`stream_window` per round trip (about 25
    MB/s at 100 ms with Linux's default limits, 45 MB/s with the send buffer this
    package asks for), whatever the line. Size the stream count so that the streams
    together could carry :data:`AUTO_TARGET_RATE` at the RTT measured on the first
    connection: 4 on a LAN or loopback, ~14 at 100 ms; never more chunks than are left.
    """
    rtt = conn_rtt(sock)
    k = AUTO_MIN_STREAMS
    if rtt is not None:
        k = -(-int(AUTO_TARGET_RATE * rtt) // stream_window())
    return max(1, min(max(k, AUTO_MIN_STREAMS), AUTO_MAX_STREAMS, max(n_chunks_left, 1)))


class FlatDest:
    """Received bytes land in one buffer; reads copy out of it."""

    scatter = False

    def __init__(self, size: int, pool: BufferPool | None):
        self.pool = pool
        self.buf = pool.get(size) if pool is not None else alloc_buffer(size)
        self.mv = memoryview(self.buf)

    def views(self, off: int, n: int) -> list[memoryview]:
        return [self.mv[off:off + n]]

    def read(self, off: int, n: int) -> bytes:
        return self.buf[off:off + n]

    def release(self, writers_gone: bool, writers: list[threading.Thread] = ()) -> None:
        self.mv.release()
        if self.pool is not None and writers_gone:
            self.pool.put(self.buf)  # no thread can still write into it
        else:
            close_map(self.buf)


MAX_SNIFF_HEADER = 16 << 20  # a payload header above this is placed without zero copy

# Scatter targets that a stuck worker thread may still write into (the writable view
# does not keep its bytes object alive), held until those threads have ended: entries
# whose threads are all gone are dropped at the next insert, so this stays bounded by
# the number of transfers with live stuck threads.
_KEEP_ALIVE: list[tuple[list[threading.Thread], Any]] = []
_KEEP_FOREVER: list[Any] = []  # see keep_forever
_KEEP_LOCK = threading.Lock()


def keep_forever(obj: Any) -> None:
    """Never free ``obj``: a buffer an engine may still write into (an RDMA READ that
    could not be cancelled) must outlive every later allocation."""
    with _KEEP_LOCK:
        _KEEP_FOREVER.append(obj)


def _keep_alive(threads: list[threading.Thread], obj: Any) -> None:
    with _KEEP_LOCK:
        _KEEP_ALIVE[:] = [(ts, o) for ts, o in _KEEP_ALIVE if any(t.is_alive() for t in ts)]
        live = [t for t in threads if t.is_alive()]
        if live:
            _KEEP_ALIVE.append((live, obj))


class ScatterDest:
    """Received bytes land directly in the final objects: the payload header in a
    bytearray, each array's bytes in its own fresh ``bytes`` object
    (:func:`flwr_transports._membuf.alloc_bytes`) that ``read`` hands to the decoder
    as is, so the array data is never copied after the socket."""

    scatter = True

    def __init__(self, size: int, header_end: int, ranges: list[tuple[int, int]]):
        self.pieces: list[tuple[int, int, Any, memoryview | None]] = []
        hdr = bytearray(header_end)
        self.pieces.append((0, header_end, hdr, memoryview(hdr)))
        for a, b in ranges:
            if b > a:
                obj, view = _membuf.alloc_bytes(b - a)
                self.pieces.append((a, b, obj, view))
        self.exact = {(p[0], p[1] - p[0]): p[2] for p in self.pieces}
        self.sv = SegmentView([p[3] for p in self.pieces], [p[0] for p in self.pieces])

    def views(self, off: int, n: int) -> list[memoryview]:
        return self.sv.range(off, n)

    def read(self, off: int, n: int) -> bytes:
        obj = self.exact.get((off, n))
        if isinstance(obj, bytes):
            return obj  # the array's own bytes: no copy
        return b"".join(self.views(off, n))  # one copy (join takes buffers)

    def release(self, writers_gone: bool, writers: list[threading.Thread] = ()) -> None:
        if not writers_gone:  # a stuck thread may still write: keep its target alive
            _keep_alive(list(writers), self.pieces)
        self.pieces, self.exact, self.sv = [], {}, SegmentView([])


def download(factory: ConnFactory, oid: str, token: bytes, size: int, *, streams: int = 4,
             window: int = 4, retries: int = 5, timeout: float = 60.0,
             stats: dict | None = None, pool: BufferPool | None = CLIENT_POOL) -> PayloadSource:
    """Fetch a published payload in parallel chunks; return a streaming PayloadSource.

    The first connection asks for the chunk table and chunk 0 in one round trip, and
    the other connections start as soon as the table is in. Chunk 0 begins with the
    payload header, which says where each array lies: as soon as its first bytes are
    in, every chunk is received straight into one fresh ``bytes`` object per array,
    and ``read(off, n)`` of an array's exact range returns that object (no copy; the
    decoder hands it to Flower's ``Array``). Any placement is safe: the pieces always
    tile the payload exactly and reads of other ranges join them, so a damaged
    header (caught by chunk 0's CRC, which is then fetched again) can cost the
    zero-copy path, never correctness. When the header does not fit in chunk 0, or
    the wire cannot scatter a chunk, chunks land in one pooled buffer and
    reads copy out of it. Either way ``read`` waits only for the chunks it covers,
    so decoding overlaps the transfer.
    """
    scatter = [False]

    def info(c: ClientConn) -> tuple[int, list[int]]:
        scatter[0] = size > 0 and getattr(c, "scatter", False) and _membuf.zero_copy_available()
        c.request(OP_INFO, oid, token)
        if scatter[0]:  # pipelined: chunk 0 follows the table without a round trip
            c.request(OP_GET, oid, token, a=0)
        st, _, _, n, _ = c.response()
        if st != OK:
            raise_status(c, st, n, f"object {oid!r}")
        return unpack_table(c.body(n, table_limit(size)), size)

    conn, (cs, table) = first_request(factory, info, retries)
    n_total = len(table)
    sniff = scatter[0] and n_total > 0
    holder: list[FlatDest | ScatterDest | None] = [None]
    dest_lock = threading.Lock()
    ready = threading.Event()

    def set_dest(layout) -> FlatDest | ScatterDest:
        with dest_lock:  # the first placement decided wins; any placement is correct
            if holder[0] is None:
                holder[0] = (ScatterDest(size, *layout) if layout is not None
                             else FlatDest(size, pool))
                ready.set()
            return holder[0]

    if not sniff:
        set_dest(None)
    todo = range(1, n_total) if sniff else range(n_total)
    if streams <= 0:
        streams = auto_streams(conn.sock, n_total)
    sched = ChunkScheduler(n_total, todo, workers=max(1, min(streams, n_total or 1)))
    if sniff:  # chunk 0 is already requested on the first connection
        sched.state[0] = INFLIGHT
        sched.remaining += 1
    first_conn = [conn if sniff else None]

    def dest_for(c: ClientConn, i: int, n: int, fl: int) -> tuple[object, int]:
        """The placement to receive chunk ``i`` into, and how many of its bytes are
        already in it. Chunk 0 on a connection that can scatter sniffs the header."""
        if ready.is_set():
            return holder[0], 0
        if i == 0 and not fl & F_OUT_OF_BAND:
            head = bytearray(min(8, n))
            c.recv_chunk_into(memoryview(head), fl)
            layout = None
            if len(head) == 8:
                hlen = int.from_bytes(head, "little")
                if 8 + hlen <= n and hlen <= MAX_SNIFF_HEADER:
                    rest = bytearray(hlen)
                    c.recv_chunk_into(memoryview(rest), fl)
                    head += rest
                    layout = codec_data_ranges(head, size)
            d = set_dest(layout)
            off = 0
            for v in d.views(0, len(head)):
                v[:] = head[off:off + len(v)]
                off += len(v)
            return d, len(head)
        # another chunk arrived first: wait while chunk 0 is on its way, else decide
        deadline = time.monotonic() + timeout
        while not ready.wait(0.05):
            if sched.state[0] != INFLIGHT or time.monotonic() > deadline or sched.error:
                return set_dest(None), 0
        return holder[0], 0

    def loop(c: ClientConn) -> None:
        inflight: collections.deque[int] = collections.deque()
        if first_conn[0] is c:
            first_conn[0] = None
            inflight.append(0)
        try:
            while True:
                while len(inflight) < window:
                    i = sched.take(block=not inflight)
                    if i is None:
                        break
                    inflight.append(i)  # before sending: a failed send requeues it
                    c.request(OP_GET, oid, token, a=i)
                if not inflight:
                    return
                i = inflight[0]
                st, fl, a, n, _ = c.response()
                if st != OK:
                    raise_status(c, st, n, f"chunk {i} of {oid!r}")
                want = chunk_len(i, size, cs)
                if a != i or n != want:
                    raise ProtocolError(f"asked for chunk {i} ({want} bytes), got chunk {a} "
                                        f"({n} bytes)")
                dest, have = dest_for(c, i, n, fl)
                views = dest.views(i * cs, n)
                if dest.scatter:
                    for v in views:
                        _membuf.populate(v)  # one call instead of a fault per page
                c.recv_chunk_views(_skip(views, have), fl)
                inflight.popleft()
                if crc_views(views) != table[i]:
                    sched.corrupted(i, "CRC mismatch")
                else:
                    sched.done(i)
        finally:
            for i in inflight:
                sched.requeue(i)

    workers = (_Workers(sched, factory, conn, sched.alive, retries, loop, "ftx-get")
               if n_total else None)
    if workers is None:
        conn.close()

    def read(off: int, n: int) -> bytes:
        if off < 0 or n < 0 or off + n > size:
            raise ValueError(f"read({off}, {n}) outside a {size}-byte payload")
        if n == 0:
            return b""
        sched.wait_chunks(off // cs, (off + n - 1) // cs, timeout * (retries + 2))
        return holder[0].read(off, n)  # chunks are done: the placement exists

    def close() -> None:
        if workers is not None:
            workers.stop()
        d = holder[0] or set_dest(None)
        if stats is not None:
            stats.update(sched.stats)
            stats["zero_copy"] = int(d.scatter)
            stats["streams"] = streams
        threads = workers.threads if workers is not None else []
        d.release(not any(t.is_alive() for t in threads), threads)

    src = PayloadSource(read, size, close)
    src.scheduler = sched  # for tests and benchmarks
    src.placement = lambda: holder[0]
    return src


def _skip(views: list[memoryview], n: int) -> list[memoryview]:
    """``views`` without their first ``n`` bytes."""
    out = []
    for v in views:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:])
        n = 0
    return out


def upload(factory: ConnFactory, oid: str, token: bytes, payload: EncodedPayload, *,
           chunk_size: int = DEFAULT_CHUNK, streams: int = 4, window: int = 4,
           retries: int = 5, timeout: float = 60.0, stats: dict | None = None) -> None:
    """Push a payload into an upload slot in parallel chunks (resumable)."""
    sv = SegmentView(payload.segments)
    size = sv.size
    if size != payload.size:
        raise ValueError(f"payload segments hold {size} bytes, the payload says {payload.size}")
    cs = check_chunk_size(chunk_size)
    n = n_chunks(size, cs)
    def open_(c: ClientConn) -> bytes:
        c.request(OP_PUT_OPEN, oid, token, a=cs, b=size)
        st, _, _, blen, _ = c.response()
        if st != OK:
            raise_status(c, st, blen, f"an upload of {size} bytes")
        have = c.body(blen, n + 1)
        if len(have) != n:
            raise ProtocolError("upload bitmap does not match the chunk count")
        return have

    conn, have = first_request(factory, open_, retries)
    todo = [i for i in range(n) if not have[i]]
    if streams <= 0:
        streams = auto_streams(conn.sock, len(todo))
    sched = ChunkScheduler(n, todo, workers=max(1, min(streams, len(todo))))

    def loop(c: ClientConn) -> None:
        inflight: collections.deque[int] = collections.deque()
        try:
            while True:
                while len(inflight) < window:
                    i = sched.take(block=not inflight)
                    if i is None:
                        break
                    inflight.append(i)  # before sending: a failed send requeues it
                    views = sv.range(i * cs, chunk_len(i, size, cs))
                    c.put_chunk(oid, token, i, crc_views(views), views)
                if not inflight:
                    return
                i = inflight[0]
                st, _, a, blen, _ = c.response()
                if a != i:
                    raise ProtocolError(f"reply for chunk {a}, expected {i}")
                inflight.popleft()
                if st == OK:
                    sched.done(i)
                elif st == BAD_CRC:
                    c.body(blen, MAX_ERR_BODY)
                    sched.corrupted(i, "server saw a CRC mismatch")
                else:
                    inflight.appendleft(i)
                    raise_status(c, st, blen, f"chunk {i} upload")
        finally:
            for i in inflight:
                sched.requeue(i)

    if todo:
        workers = _Workers(sched, factory, conn, sched.alive, retries, loop, "ftx-put")
        try:
            for t in workers.threads:  # every socket operation has a timeout
                t.join()
        finally:
            workers.stop()
        if sched.error is not None:
            raise sched.error
        if not sched.finished:
            raise LinkError("upload did not complete")
    else:
        conn.close()
    if stats is not None:
        stats.update(sched.stats)
        stats["streams"] = streams
    # commit (on a fresh connection: the transfer ones are closed)
    def commit(c: ClientConn) -> None:
        c.request(OP_PUT_DONE, oid, token)
        st, _, _, blen, _ = c.response()
        if st != OK:
            raise_status(c, st, blen, "upload commit")

    c, _ = first_request(factory, commit, retries)
    c.close()


