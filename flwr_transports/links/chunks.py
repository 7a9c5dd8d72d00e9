"""The chunk engine shared by the ``tcp://`` and ``rdma://`` links.

A payload is cut into fixed-size chunks (the last one shorter). Each chunk has a
CRC-32 in a *chunk table* that the server computes once when it publishes the payload
(uploads: the client sends each chunk's CRC with it). Transfers run over ``streams``
parallel connections; each connection keeps up to ``window`` chunk requests in
flight (pipelining). A shared :class:`ChunkScheduler` hands chunk indices to the
connections, takes back the ones that failed (a CRC mismatch re-requests that chunk
only; a dropped connection puts its in-flight chunks back and the connection is
re-opened, so the transfer resumes from the chunks already received) and gives up
with a clear error after too many failures.

Wire format (all integers big-endian). Every request starts with::

    REQ  = magic "FTXQ" | op u8 | flags u8 | id_len u16 | token 32s | a u64 | b u64 | crc u32
    then id_len bytes of object id (ASCII), then for PUT a body of b bytes

and every response with::

    RSP  = magic "FTXR" | status u8 | flags u8 | 0 u16 | a u64 | b u64 | crc u32
    then b bytes of body (chunk data, chunk table, bitmap or an error message)

The token is ``HMAC-SHA256(server secret, kind + "\\0" + object id)`` (kind ``get``
or ``put``), checked on EVERY request in constant time: a request for another
object, or a download token used to upload, is refused, logged, and the connection
closed. Nothing in a request is trusted: ids are matched against a strict pattern,
indices and lengths against the object's table, declared upload sizes against the
slot's cap before anything is allocated.

The data of a chunk normally travels inline after its header (``tcp://``). ``rdma://``
moves it by one-sided RDMA reads instead and uses this server only for its control
exchange: the extension ops ``RDMA_GET`` / ``RDMA_PUT`` (token-checked like every
other op) are served by :meth:`ServerConn.extension`, and the transfers reuse
:class:`ChunkScheduler`, the chunk table and the receive placements defined here.
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import hmac
import logging
import mmap
import random
import re
import socket
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .. import _membuf
from ..codec import EncodedPayload, decode_hashed
from ..codec import data_ranges as codec_data_ranges
from ..refs import RefError
from .base import LinkError, PayloadSource

log = logging.getLogger("flwr_transports.links")

MAGIC_REQ = b"FTXQ"
MAGIC_RSP = b"FTXR"
REQ = struct.Struct("!4sBBH32sQQI")
RSP = struct.Struct("!4sBBHQQI")
TABLE_HEAD = struct.Struct("!QQI")  # size, chunk_size, n

# ops
OP_INFO, OP_GET, OP_PUT_OPEN, OP_PUT, OP_PUT_DONE, OP_HELLO = 1, 2, 3, 4, 5, 6
# extension ops (rdma://): token-checked like the others, served by ServerConn.extension
OP_RDMA_GET, OP_RDMA_PUT = 7, 8
EXT_OPS = frozenset({OP_RDMA_GET, OP_RDMA_PUT})
OP_NAMES = {OP_INFO: "INFO", OP_GET: "GET", OP_PUT_OPEN: "PUT_OPEN", OP_PUT: "PUT",
            OP_PUT_DONE: "PUT_DONE", OP_HELLO: "HELLO", OP_RDMA_GET: "RDMA_GET",
            OP_RDMA_PUT: "RDMA_PUT"}
OP_KIND = {OP_INFO: "get", OP_GET: "get", OP_PUT_OPEN: "put", OP_PUT: "put",
           OP_PUT_DONE: "put", OP_HELLO: "hello", OP_RDMA_GET: "get", OP_RDMA_PUT: "put"}
# statuses
OK, DENIED, NOT_FOUND, BAD_REQUEST, BAD_CRC, BUSY, INCOMPLETE, TOO_BIG = range(8)
STATUS_NAMES = ["OK", "DENIED", "NOT_FOUND", "BAD_REQUEST", "BAD_CRC", "BUSY", "INCOMPLETE",
                "TOO_BIG"]
# flags
F_OUT_OF_BAND = 1  # chunk data moved by the wire's side channel (RDMA), not inline

MIN_CHUNK = 64 * 1024
MAX_CHUNK = 256 * 1024 * 1024
DEFAULT_CHUNK = 8 * 1024 * 1024
AUTO_CHUNK_MIN = 1 << 20


def auto_chunk_size(size: int) -> int:
    """Chunk size for a payload of ``size`` bytes when none is configured: about 32
    chunks (a power of two between 1 MiB and 8 MiB), so that small payloads still
    spread over several streams; big ones use 8 MiB chunks (fewer requests)."""
    target = max(size // 32, 1)
    cs = 1 << (target.bit_length() - 1)
    return max(AUTO_CHUNK_MIN, min(DEFAULT_CHUNK, cs))
MAX_ID = 200
MAX_ERR_BODY = 1024
#: seconds a new connection may take to present a valid token (TLS handshake included)
PREAUTH_TIMEOUT = 5.0
#: a connection idle at least this long may be closed to admit a new one when full
EVICT_IDLE = 0.5
#: how long a client keeps retrying while the payload server answers BUSY (seconds)
BUSY_RETRY_FOR = 60.0
ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")
_IOV_MAX = 512
_DRAIN = 1024 * 1024


class ProtocolError(ConnectionError):
    """The peer broke the protocol (the connection is closed and, client side, retried)."""


class Refused(LinkError):
    """The payload server refused a request (bad token, unknown object, too big...)."""


# -- small helpers ---------------------------------------------------------------------
def make_token(secret: bytes, kind: str, oid: str) -> bytes:
    return hmac.new(secret, kind.encode() + b"\0" + oid.encode(), hashlib.sha256).digest()


def n_chunks(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


def chunk_len(i: int, size: int, chunk_size: int) -> int:
    return min(chunk_size, size - i * chunk_size)


def check_chunk_size(cs: int) -> int:
    if not MIN_CHUNK <= cs <= MAX_CHUNK:
        raise ValueError(f"chunk_size must be between {MIN_CHUNK} and {MAX_CHUNK} bytes, got {cs}")
    return cs


def crc_views(views: Sequence[memoryview]) -> int:
    c = 0
    for v in views:
        c = zlib.crc32(v, c)
    return c


def recv_exact_into(sock, mv: memoryview) -> None:
    """Fill ``mv`` from ``sock`` (every recv under the socket's timeout)."""
    while len(mv):
        n = sock.recv_into(mv)
        if n == 0:
            raise ConnectionResetError("connection closed by peer")
        mv = mv[n:]


def recv_exact(sock, n: int) -> bytes:
    buf = bytearray(n)
    recv_exact_into(sock, memoryview(buf))
    return bytes(buf)


def drain(sock, n: int) -> None:
    buf = memoryview(bytearray(min(n, _DRAIN)))
    while n:
        k = min(n, len(buf))
        recv_exact_into(sock, buf[:k])
        n -= k


def send_views(sock, bufs: Sequence[bytes | memoryview]) -> None:
    """Send buffers back to back without joining them (``sendmsg`` gather I/O)."""
    if isinstance(sock, ssl.SSLSocket):  # no sendmsg on TLS sockets
        for b in bufs:
            sock.sendall(b)
        return
    pending = [memoryview(b).cast("B") for b in bufs if len(b)]
    while pending:
        n = sock.sendmsg(pending[:_IOV_MAX])
        while n:
            if n >= len(pending[0]):
                n -= len(pending[0])
                pending.pop(0)
            else:
                pending[0] = pending[0][n:]
                n = 0


class SegmentView:
    """Byte ranges of a list of segments, as memoryviews (never copied)."""

    def __init__(self, segments: Sequence[bytes | memoryview]):
        self.views = []
        for s in segments:
            v = memoryview(s)
            if v.format != "B" or v.ndim != 1:
                v = v.cast("B")
            if len(v):
                self.views.append(v)
        self.starts = []
        pos = 0
        for v in self.views:
            self.starts.append(pos)
            pos += len(v)
        self.size = pos

    def range(self, off: int, n: int) -> list[memoryview]:
        out = []
        k = max(0, bisect.bisect_right(self.starts, off) - 1)
        end = off + n
        while off < end and k < len(self.views):
            v, s = self.views[k], self.starts[k]
            lo, hi = off - s, min(len(v), end - s)
            if hi > lo:
                out.append(v[lo:hi])
                off = s + hi
            k += 1
        return out


def build_table(sv: SegmentView, chunk_size: int) -> list[int]:
    return [crc_views(sv.range(i * chunk_size, chunk_len(i, sv.size, chunk_size)))
            for i in range(n_chunks(sv.size, chunk_size))]


def pack_table(size: int, chunk_size: int, crcs: list[int]) -> bytes:
    return TABLE_HEAD.pack(size, chunk_size, len(crcs)) + struct.pack(f"!{len(crcs)}I", *crcs)


def unpack_table(body: bytes, size: int) -> tuple[int, list[int]]:
    if len(body) < TABLE_HEAD.size:
        raise ProtocolError("chunk table too short")
    tsize, cs, n = TABLE_HEAD.unpack_from(body)
    if tsize != size:
        raise RefError(f"payload server has {tsize} bytes for this object, the reference "
                        f"says {size}")
    if not MIN_CHUNK <= cs <= MAX_CHUNK:
        raise ProtocolError(f"chunk table has a chunk size of {cs} bytes")
    if n != n_chunks(size, cs) or len(body) != TABLE_HEAD.size + 4 * n:
        raise ProtocolError("chunk table does not match the payload size")
    return cs, list(struct.unpack_from(f"!{n}I", body, TABLE_HEAD.size))


def table_limit(size: int) -> int:
    return TABLE_HEAD.size + 4 * n_chunks(size, MIN_CHUNK)


# -- the scheduler ---------------------------------------------------------------------
PENDING, INFLIGHT, DONE = 0, 1, 2


class ChunkScheduler:
    """Thread-safe chunk work queue shared by the connections of one transfer."""

    def __init__(self, n: int, todo: Sequence[int] | None = None, *, max_chunk_retries: int = 5,
                 workers: int = 1):
        self.n = n
        self.state = bytearray(n)
        todo = range(n) if todo is None else todo
        for i in range(n):
            self.state[i] = DONE
        for i in todo:
            self.state[i] = PENDING
        self.pending = collections.deque(todo)
        self.remaining = len(self.pending)
        self.tries = collections.Counter()
        self.max_chunk_retries = max_chunk_retries
        self.cond = threading.Condition()
        self.error: BaseException | None = None
        self.stopped = False
        self.alive = workers
        self.stats = {"chunks": 0, "crc_errors": 0, "requeued": 0, "reconnects": 0}

    @property
    def finished(self) -> bool:
        return self.remaining == 0

    def take(self, block: bool = True) -> int | None:
        """Next chunk to transfer; None when there is none (now, or ever if block)."""
        with self.cond:
            while True:
                if self.error is not None or self.stopped or self.remaining == 0:
                    return None
                if self.pending:
                    i = self.pending.popleft()
                    self.state[i] = INFLIGHT
                    return i
                if not block:
                    return None
                self.cond.wait()

    def done(self, i: int) -> None:
        with self.cond:
            if self.state[i] != DONE:
                self.state[i] = DONE
                self.remaining -= 1
                self.stats["chunks"] += 1
            self.cond.notify_all()

    def requeue(self, i: int) -> None:
        """Give back a chunk whose transfer was interrupted (connection lost)."""
        with self.cond:
            if self.state[i] == INFLIGHT:
                self.state[i] = PENDING
                self.pending.appendleft(i)
                self.stats["requeued"] += 1
                self.cond.notify_all()

    def corrupted(self, i: int, why: str) -> None:
        """A chunk arrived damaged: transfer it again, up to max_chunk_retries times."""
        with self.cond:
            self.stats["crc_errors"] += 1
            self.tries[i] += 1
            if self.tries[i] > self.max_chunk_retries:
                self._fail(LinkError(f"chunk {i} failed its check {self.tries[i]} times "
                                     f"({why}); giving up"))
                return
            log.warning("chunk %d: %s; fetching it again", i, why)
            self.state[i] = PENDING
            self.pending.appendleft(i)
            self.cond.notify_all()

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self.cond:
            self._fail(exc)

    def worker_exit(self, exc: BaseException | None) -> None:
        with self.cond:
            self.alive -= 1
            if self.alive <= 0 and self.remaining and self.error is None and not self.stopped:
                self._fail(exc if isinstance(exc, LinkError) else LinkError(
                    f"payload transfer failed: every connection gave up ({exc})"))
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()

    def wait_chunks(self, first: int, last: int, timeout: float) -> None:
        """Block until chunks first..last are done; raise the transfer's error if any."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                if self.error is not None:
                    raise self.error
                if self.state[first:last + 1].count(DONE) == last + 1 - first:
                    return
                if self.stopped:
                    raise LinkError("payload source is closed")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LinkError(f"timed out waiting for chunks {first}..{last}")
                self.cond.wait(min(left, 1.0))

    def wait_all(self, timeout: float) -> None:
        if self.n:
            self.wait_chunks(0, self.n - 1, timeout)
        elif self.error is not None:
            raise self.error


def alloc_buffer(size: int) -> mmap.mmap:
    """An anonymous buffer for ``size`` received bytes, its pages faulted in up front.

    Receiving into fresh memory pays one page fault per 4 KiB page inside ``recv_into``;
    ``MAP_POPULATE`` lets the kernel map them all in one call, which costs about half
    the CPU (measured here) and keeps the faults out of the transfer loop.
    """
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    try:
        return mmap.mmap(-1, max(size, 1), flags=flags)
    except OSError:
        return mmap.mmap(-1, max(size, 1))


def _close_map(m: mmap.mmap) -> None:
    try:
        m.close()
    except BufferError:  # a view is still alive (a stuck thread): the GC unmaps it later
        pass


POOL_GRAIN = 1 << 20


class BufferPool:
    """Receive buffers kept for reuse: FL moves same-size payloads every round.

    Fresh memory is expensive to receive into (page faults: about 0.5-1 CPU-second per
    GiB on the test VM, more than the copy itself); a reused buffer is already mapped.
    At most ``cap`` bytes are kept; ``cap`` 0 disables reuse. A buffer is reused only
    for a payload between half its size and its size.
    """

    def __init__(self, cap: int):
        self.cap = cap
        self.free: list[mmap.mmap] = []
        self.lock = threading.Lock()
        self.hits = 0

    def get(self, size: int) -> mmap.mmap:
        with self.lock:
            best = None
            for k, m in enumerate(self.free):
                if size <= len(m) <= max(2 * size, 1 << 20) and (
                        best is None or len(m) < len(self.free[best])):
                    best = k
            if best is not None:
                self.hits += 1
                return self.free.pop(best)
        # whole MiBs: next round's payload is often a few bytes larger (a dtype name in
        # the header, e.g. int64 -> float64 after FedAvg) and must still fit this buffer
        return alloc_buffer(-(-size // POOL_GRAIN) * POOL_GRAIN if size >= POOL_GRAIN else size)

    def put(self, m: mmap.mmap) -> None:
        if m.closed:
            return
        if len(m) > self.cap:
            _close_map(m)
            return
        with self.lock:
            self.free.append(m)
            while sum(len(x) for x in self.free) > self.cap:
                _close_map(self.free.pop(0))

    def clear(self) -> None:
        with self.lock:
            free, self.free = self.free, []
        for m in free:
            _close_map(m)


def _env_pool_cap() -> int:
    import os

    from ..codec import parse_size

    try:
        return parse_size(os.environ.get("FLWR_TRANSPORTS_BUFFER_POOL", "1GiB"))
    except ValueError:
        return 0


#: client-side pool of download buffers (FLWR_TRANSPORTS_BUFFER_POOL bytes, default 1GiB)
CLIENT_POOL = BufferPool(_env_pool_cap())


# -- client side -----------------------------------------------------------------------
class Endpoint:
    """Where and how a client connects (from a validated descriptor)."""

    def __init__(self, host: str, port: int, *, timeout: float = 60.0,
                 ssl_ctx: ssl.SSLContext | None = None, fingerprint: str | None = None):
        self.host, self.port, self.timeout = host, port, timeout
        self.ssl_ctx, self.fingerprint = ssl_ctx, fingerprint

    def connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_ctx is not None:
                sock = self.ssl_ctx.wrap_socket(sock, server_hostname=self.host)
                if self.fingerprint:
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


def _raise_status(conn: ClientConn, status: int, n: int, what: str) -> None:
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


def _first_request(factory: ConnFactory, fn, retries: int, busy_for: float = BUSY_RETRY_FOR):
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


def auto_streams(sock, n_chunks_left: int) -> int:
    """Parallel connections for a transfer when ``streams`` is 0 (auto).

    One TCP stream moves at most about one socket buffer per round trip: with Linux's
    default limits (``tcp_wmem``/``tcp_rmem`` max 4-6 MiB) ~40 MB/s at 100 ms RTT,
    whatever the line. Size the stream count so that the streams together could carry
    :data:`AUTO_TARGET_RATE` at the RTT measured on the first connection: 4 on a LAN or
    loopback, ~15 at 100 ms; never more chunks than are left.
    """
    rtt = conn_rtt(sock)
    k = AUTO_MIN_STREAMS
    if rtt is not None:
        window = min(_sysctl_max("tcp_wmem", 4 << 20), _sysctl_max("tcp_rmem", 6 << 20))
        k = -(-int(AUTO_TARGET_RATE * rtt) // max(window, 1 << 16))
    return max(1, min(max(k, AUTO_MIN_STREAMS), AUTO_MAX_STREAMS, max(n_chunks_left, 1)))


class _FlatDest:
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
            _close_map(self.buf)


MAX_SNIFF_HEADER = 16 << 20  # a payload header above this is placed without zero copy

# Scatter targets that a stuck worker thread may still write into (the writable view
# does not keep its bytes object alive), held until those threads have ended: entries
# whose threads are all gone are dropped at the next insert, so this stays bounded by
# the number of transfers with live stuck threads.
_KEEP_ALIVE: list[tuple[list[threading.Thread], Any]] = []
_KEEP_LOCK = threading.Lock()


def _keep_alive(threads: list[threading.Thread], obj: Any) -> None:
    with _KEEP_LOCK:
        _KEEP_ALIVE[:] = [(ts, o) for ts, o in _KEEP_ALIVE if any(t.is_alive() for t in ts)]
        live = [t for t in threads if t.is_alive()]
        if live:
            _KEEP_ALIVE.append((live, obj))


class _ScatterDest:
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
        self.starts = [p[0] for p in self.pieces]
        self.exact = {(p[0], p[1] - p[0]): p[2] for p in self.pieces}

    def views(self, off: int, n: int) -> list[memoryview]:
        out, end = [], off + n
        k = max(0, bisect.bisect_right(self.starts, off) - 1)
        while off < end and k < len(self.pieces):
            a, b, _, v = self.pieces[k]
            lo, hi = off - a, min(b, end) - a
            if hi > lo:
                out.append(v[lo:hi])
                off = a + hi
            k += 1
        return out

    def read(self, off: int, n: int) -> bytes:
        obj = self.exact.get((off, n))
        if isinstance(obj, bytes):
            return obj  # the array's own bytes: no copy
        return b"".join(self.views(off, n))  # one copy (join takes buffers)

    def release(self, writers_gone: bool, writers: list[threading.Thread] = ()) -> None:
        if not writers_gone:  # a stuck thread may still write: keep its target alive
            _keep_alive(list(writers), self.pieces)
        self.pieces, self.exact = [], {}


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
            _raise_status(c, st, n, f"object {oid!r}")
        return unpack_table(c.body(n, table_limit(size)), size)

    conn, (cs, table) = _first_request(factory, info, retries)
    n_total = len(table)
    sniff = scatter[0] and n_total > 0
    holder: list[_FlatDest | _ScatterDest | None] = [None]
    dest_lock = threading.Lock()
    ready = threading.Event()

    def set_dest(layout) -> _FlatDest | _ScatterDest:
        with dest_lock:  # the first placement decided wins; any placement is correct
            if holder[0] is None:
                holder[0] = (_ScatterDest(size, *layout) if layout is not None
                             else _FlatDest(size, pool))
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
                    _raise_status(c, st, n, f"chunk {i} of {oid!r}")
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
            _raise_status(c, st, blen, f"an upload of {size} bytes")
        have = c.body(blen, n + 1)
        if len(have) != n:
            raise ProtocolError("upload bitmap does not match the chunk count")
        return have

    conn, have = _first_request(factory, open_, retries)
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
                    _raise_status(c, st, blen, f"chunk {i} upload")
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
            _raise_status(c, st, blen, "upload commit")

    c, _ = _first_request(factory, commit, retries)
    c.close()


# -- server side -----------------------------------------------------------------------
class PublishedObject:
    def __init__(self, payload: EncodedPayload, chunk_size: int):
        self.sv = SegmentView(payload.segments)
        self.size = self.sv.size
        self.cs = chunk_size
        self.crcs = build_table(self.sv, chunk_size)
        self.table = pack_table(self.size, chunk_size, self.crcs)


class UploadSlot:
    def __init__(self, max_size: int):
        self.max_size = max_size
        self.size: int | None = None
        self.cs = 0
        self.buf: mmap.mmap | None = None
        self.mv: memoryview | None = None
        self.have = bytearray()
        self.claimed: set[int] = set()
        self.complete = False
        self.readers = 0
        self.pre = None  # Future of (ArrayRecord, digest): decoded as soon as complete
        self.hook = None  # fn(source), called when complete instead of decoding
        self.lock = threading.Lock()

    def free(self, pool: BufferPool | None = None) -> None:
        with self.lock:
            if self.mv is not None:
                self.mv.release()
                self.mv = None
            if self.buf is not None:
                if pool is not None and not self.claimed:  # no PUT is writing into it
                    pool.put(self.buf)
                else:
                    _close_map(self.buf)
                self.buf = None


class _Admission:
    """What the server knows about one accepted connection, for its accounting.

    A connection starts unauthenticated; its first request with a valid token charges
    it to a *group*: the upload slot (one node's) or, for downloads, the published
    object and the peer's address. ``idle_since`` is None while a request is served.
    """

    __slots__ = ("evicted", "group", "idle_since", "raw")

    def __init__(self, raw) -> None:
        self.raw = raw
        self.group: tuple | None = None
        self.idle_since: float | None = time.monotonic()
        self.evicted = False


class ServerConn:
    """Server side of one connection; the chunk-data hooks are what a wire overrides."""

    def __init__(self, server: ChunkServer, sock, peer: str):
        self.server, self.sock, self.peer = server, sock, peer
        self.adm: _Admission | None = None

    def reply(self, status: int, a: int = 0, body: Sequence[bytes | memoryview] = (),
              crc: int = 0, flags: int = 0, length: int | None = None) -> None:
        n = sum(len(b) for b in body) if length is None else length
        send_views(self.sock, [RSP.pack(MAGIC_RSP, status, flags, 0, a, n, crc), *body])

    def error(self, status: int, msg: str, a: int = 0) -> None:
        self.reply(status, a, [msg.encode()[:MAX_ERR_BODY]])

    # hooks --------------------------------------------------------------------------
    def send_chunk(self, i: int, crc: int, views: list[memoryview]) -> None:
        self.reply(OK, i, views, crc)

    def recv_chunk_into(self, dest: memoryview | None, n: int, flags: int) -> None:
        if flags & F_OUT_OF_BAND:
            raise ProtocolError("out-of-band chunk data on a tcp connection")
        if dest is None:
            drain(self.sock, n)
        else:
            recv_exact_into(self.sock, dest)

    def hello(self, flags: int, a: int, b: int, oid: str) -> None:
        self.error(BAD_REQUEST, "this server has no extensions")
        raise ProtocolError("unsupported HELLO")

    def extension(self, op: int, oid: str, flags: int, a: int, b: int, crc: int) -> bool:
        """Serve a token-checked extension op (rdma://); False closes the connection."""
        self.server.refuse(self, op, oid, "extension op on a server without extensions")
        self.error(BAD_REQUEST, "this server has no extensions")
        return False

    def close(self) -> None:
        pass


class ChunkServer:
    """A threaded payload server: one acceptor, one thread per connection (capped).

    Connection accounting (so that no client can starve the others): a connection
    must present a valid token within ``PREAUTH_TIMEOUT`` seconds, else it is closed.
    When ``max_conns`` connections are open, a new one is admitted by closing the
    connection idle the longest (unauthenticated ones first; an authenticated one
    only after ``EVICT_IDLE`` s without a request), and only answered BUSY when every
    connection is busy. Authenticated connections are charged to their upload slot
    (one node's), or to the downloaded object and peer address; a group may hold at
    most ``max_per_group`` connections (default ``max_conns // 4``, at least 8).
    """

    def __init__(self, bind: str, port: int, *, secret: bytes, timeout: float = 60.0,
                 max_conns: int = 256, ssl_ctx: ssl.SSLContext | None = None,
                 conn_cls: type[ServerConn] = ServerConn, name: str = "tcp",
                 pool_cap: int = 1 << 30):
        self.secret, self.timeout, self.max_conns = secret, timeout, max_conns
        self.max_per_group = max(8, max_conns // 4)
        self.preauth_timeout = min(PREAUTH_TIMEOUT, timeout)
        self.adm: dict[Any, _Admission] = {}  # raw socket -> accounting
        self.groups: collections.Counter = collections.Counter()
        self.pool = BufferPool(pool_cap)
        self.ssl_ctx, self.conn_cls, self.name = ssl_ctx, conn_cls, name
        self.objects: dict[str, PublishedObject] = {}
        self.slots: dict[str, UploadSlot] = {}
        self.lock = threading.Lock()
        self.active: dict[socket.socket, threading.Thread] = {}
        self.stopping = threading.Event()
        self.stats = collections.Counter()
        #: decode each upload in the background as soon as it is complete
        self.eager = True
        self._eager: ThreadPoolExecutor | None = None
        self.last_landed: float | None = None  # perf_counter() of the last complete upload
        #: test hook: fault(op, oid, index, views) -> views (may raise to drop the connection)
        self.fault: Callable[[int, str, int, list[memoryview]], list[memoryview]] | None = None
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        try:
            self.sock = socket.create_server((bind, port), family=family, backlog=128,
                                             reuse_port=False)
        except OSError as exc:
            raise LinkError(f"{name}:// payload server cannot listen on {bind!r} port {port}: "
                            f"{exc.strerror or exc} (set bind=0.0.0.0 to listen on every "
                            f"interface, or pick another port; port 0 picks a free one)"
                            ) from None
        self.sock.settimeout(0.25)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, name=f"ftx-{name}-accept",
                                       daemon=True)
        self.thread.start()

    # objects ------------------------------------------------------------------------
    def token(self, kind: str, oid: str) -> bytes:
        return make_token(self.secret, kind, oid)

    def add_object(self, oid: str, payload: EncodedPayload, chunk_size: int) -> None:
        obj = PublishedObject(payload, chunk_size)
        with self.lock:
            self.objects[oid] = obj

    def remove_object(self, oid: str) -> None:
        with self.lock:
            self.objects.pop(oid, None)

    def add_slot(self, oid: str, max_size: int) -> None:
        with self.lock:
            self.slots.setdefault(oid, UploadSlot(max_size))

    def set_hook(self, oid: str, fn) -> bool:
        """Call ``fn(source)`` (in the background) when the upload into ``oid`` is
        complete, instead of decoding it; the source views the receive buffer."""
        with self.lock:
            slot = self.slots.get(oid)
        if slot is None:
            return False
        slot.hook = fn
        return True

    def remove_slot(self, oid: str) -> None:
        with self.lock:
            slot = self.slots.pop(oid, None)
        if slot is not None and slot.readers == 0:
            slot.free(self.pool)

    # serving ------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self.stopping.is_set():
            self._close_late_preauth()
            try:
                sock, addr = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self.stopping.is_set():
                    return
                time.sleep(0.05)
                continue
            peer = f"{addr[0]}:{addr[1]}"
            with self.lock:
                busy = len(self.active) >= self.max_conns and not self._evict_locked()
                if not busy:
                    t = threading.Thread(target=self._serve, args=(sock, peer),
                                         name=f"ftx-{self.name}-conn", daemon=True)
                    self.active[sock] = t
                    self.adm[sock] = _Admission(sock)
            if busy:
                self.stats["busy"] += 1
                self._busy(sock)
                continue
            t.start()

    def _close_late_preauth(self) -> None:
        """Close connections that did not present a valid token within the pre-auth
        deadline (an absolute one: trickling a request header byte by byte does not
        extend it)."""
        limit = time.monotonic() - self.preauth_timeout
        with self.lock:
            late = [a for a in self.adm.values()
                    if a.group is None and not a.evicted and a.idle_since is not None
                    and a.idle_since < limit]
            for a in late:
                a.evicted = True
                self.stats["preauth_timeouts"] += 1
        for a in late:
            try:
                a.raw.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _evict_locked(self, group: tuple | None = None) -> bool:
        """Close the connection idle the longest to make room (caller holds the lock):
        an unauthenticated one if any, else an authenticated one idle for at least
        ``EVICT_IDLE`` s (only members of ``group`` if given). False when none is."""
        now = time.monotonic()
        victim, best = None, None
        for a in self.adm.values():
            if a.evicted or a.idle_since is None or (group is not None and a.group != group):
                continue
            idle = now - a.idle_since
            if a.group is not None and idle < EVICT_IDLE:
                continue
            key = (a.group is None, idle)
            if best is None or key > best:
                victim, best = a, key
        if victim is None:
            return False
        victim.evicted = True
        self.stats["evicted"] += 1
        try:
            victim.raw.shutdown(socket.SHUT_RDWR)  # wakes its thread, which exits
        except OSError:
            pass
        return True

    def _charge(self, conn: ServerConn, kind: str, oid: str) -> bool:
        """Charge an authenticated connection to its group; False if the group is full."""
        adm = conn.adm
        if adm is None or adm.group is not None:
            return True
        group = (kind, oid) if kind == "put" else (kind, oid, conn.peer.rsplit(":", 1)[0])
        with self.lock:
            if self.groups[group] >= self.max_per_group and not self._evict_locked(group):
                return False
            self.groups[group] += 1
            adm.group, adm.idle_since = group, None
        conn.sock.settimeout(self.timeout)
        return True

    def _busy(self, sock) -> None:
        try:
            sock.settimeout(1.0)
            if self.ssl_ctx is None:  # a TLS client would need a handshake first: just close
                msg = b"too many connections; retry later"
                sock.sendall(RSP.pack(MAGIC_RSP, BUSY, 0, 0, 0, len(msg), 0) + msg)
        except OSError:
            pass
        finally:
            sock.close()

    def refuse(self, conn: ServerConn, op: int, oid: str, why: str) -> None:
        self.stats["refused"] += 1
        log.warning("%s:// payload server refused %s %r from %s: %s", self.name,
                    OP_NAMES.get(op, op), oid[:64], conn.peer, why)

    def _serve(self, raw, peer: str) -> None:
        conn = None
        sock = raw
        with self.lock:
            adm = self.adm.get(raw)
        try:
            # until a valid token: a short deadline for everything (TLS handshake too)
            raw.settimeout(self.preauth_timeout)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_ctx is not None:
                sock = self.ssl_ctx.wrap_socket(raw, server_side=True)
            conn = self.conn_cls(self, sock, peer)
            conn.adm = adm
            while not self.stopping.is_set():
                try:
                    head = sock.recv(REQ.size)
                except TimeoutError:  # idle connection, or no valid token in time
                    if adm is not None and adm.group is None and not adm.evicted:
                        self.stats["preauth_timeouts"] += 1
                    return
                if not head:
                    return
                if adm is not None and adm.group is not None:
                    adm.idle_since = None  # serving (an unauthenticated one stays evictable)
                if len(head) < REQ.size:
                    head += recv_exact(sock, REQ.size - len(head))
                if not self._handle(conn, head):
                    return
                if adm is not None and adm.group is not None:
                    adm.idle_since = time.monotonic()
        except (OSError, ProtocolError, ssl.SSLError, ValueError) as exc:
            self.stats["dropped"] += 1
            log.debug("%s:// connection from %s closed: %s", self.name, peer, exc)
        finally:
            if conn is not None:
                conn.close()
            with self.lock:
                self.active.pop(raw, None)
                gone = self.adm.pop(raw, None)
                if gone is not None and gone.group is not None:
                    self.groups[gone.group] -= 1
                    if self.groups[gone.group] <= 0:
                        del self.groups[gone.group]
            try:
                sock.close()
            except OSError:
                pass

    def _handle(self, conn: ServerConn, head: bytes) -> bool:
        """Serve one request; False closes the connection."""
        magic, op, flags, idlen, token, a, b, crc = REQ.unpack(head)
        if magic != MAGIC_REQ or not 0 < idlen <= MAX_ID or op not in OP_KIND:
            self.refuse(conn, op, "", "malformed request header")
            conn.error(BAD_REQUEST, "malformed request")
            return False
        raw_id = recv_exact(conn.sock, idlen)
        oid = raw_id.decode("ascii", "replace")
        if not ID_RE.match(oid):
            self.refuse(conn, op, oid, "malformed object id")
            conn.error(BAD_REQUEST, "malformed object id")
            return False
        kind = OP_KIND[op]
        if kind == "hello":
            conn.hello(flags, a, b, oid)
            return True
        if not hmac.compare_digest(token, self.token(kind, oid)):
            self.refuse(conn, op, oid, "invalid token")
            conn.error(DENIED, "invalid token for this object")
            return False
        if not self._charge(conn, kind, oid):
            self.stats["busy_group"] += 1
            conn.error(BUSY, f"too many connections for this {'upload' if kind == 'put' else 'download'}; "
                       "retry later")
            return False
        if op in EXT_OPS:
            return conn.extension(op, oid, flags, a, b, crc)
        if kind == "get":
            return self._handle_get(conn, op, oid, a)
        return self._handle_put(conn, op, oid, flags, a, b, crc)

    def _handle_get(self, conn: ServerConn, op: int, oid: str, i: int) -> bool:
        obj = self.objects.get(oid)
        if obj is None:
            self.refuse(conn, op, oid, "object released or never published")
            conn.error(NOT_FOUND, "payload expired (released by the server) or unknown")
            return False
        if op == OP_INFO:
            conn.reply(OK, 0, [obj.table])
            return True
        if i >= len(obj.crcs):
            self.refuse(conn, op, oid, f"chunk index {i} out of range")
            conn.error(BAD_REQUEST, "chunk index out of range", i)
            return False
        views = obj.sv.range(i * obj.cs, chunk_len(i, obj.size, obj.cs))
        if self.fault is not None:
            views = self.fault(op, oid, i, views)
        conn.send_chunk(i, obj.crcs[i], views)
        self.stats["chunks_sent"] += 1
        return True

    def _handle_put(self, conn: ServerConn, op: int, oid: str, flags: int, a: int, b: int,
                    crc: int) -> bool:
        slot = self.slots.get(oid)
        if slot is None:
            self.refuse(conn, op, oid, "slot discarded or never issued")
            conn.error(NOT_FOUND, "upload slot expired or unknown")
            return False
        if op == OP_PUT_OPEN:
            size, cs = b, a
            if size > slot.max_size:
                self.refuse(conn, op, oid, f"declared {size} bytes > cap {slot.max_size}")
                conn.error(TOO_BIG, f"upload of {size} bytes exceeds the cap of {slot.max_size}")
                return False
            if not MIN_CHUNK <= cs <= MAX_CHUNK:
                conn.error(BAD_REQUEST, "chunk size out of range")
                return False
            with slot.lock:
                if slot.size is None:
                    slot.size, slot.cs = size, cs
                    slot.buf = self.pool.get(size)
                    slot.mv = memoryview(slot.buf)
                    slot.have = bytearray(n_chunks(size, cs))
                elif (slot.size, slot.cs) != (size, cs):
                    conn.error(BAD_REQUEST, "upload already opened with another size")
                    return False
                have = bytes(slot.have)
            conn.reply(OK, 0, [have])
            return True
        if slot.size is None:
            conn.error(BAD_REQUEST, "upload not opened")
            return False
        if op == OP_PUT_DONE:
            with slot.lock:
                missing = slot.have.count(0)
                start = missing == 0 and not slot.complete and self.eager
                if missing == 0:
                    slot.complete = True
                    self.last_landed = time.perf_counter()
                if start:
                    slot.readers += 1  # the decoder reads the buffer: keep it
            if start and slot.hook is not None:
                self._eager_pool().submit(self._run_hook, oid, slot)
            elif start:
                slot.pre = self._eager_pool().submit(self._predecode, oid, slot)
            if missing:
                conn.error(INCOMPLETE, f"{missing} chunks missing")
            else:
                conn.reply(OK)
            return True
        # OP_PUT
        i, n = a, b
        if i >= len(slot.have) or n != chunk_len(i, slot.size, slot.cs):
            self.refuse(conn, op, oid, f"chunk {i} of {n} bytes does not fit the upload")
            conn.error(BAD_REQUEST, "chunk index or length does not fit the upload", i)
            return False
        with slot.lock:
            write = not slot.have[i] and i not in slot.claimed and not slot.complete
            if write:
                slot.claimed.add(i)
            dest = slot.mv[i * slot.cs: i * slot.cs + n] if write else None
        ok = False
        try:
            conn.recv_chunk_into(dest, n, flags)
            ok = dest is None or zlib.crc32(dest) == crc
        finally:
            with slot.lock:
                if write:
                    slot.claimed.discard(i)
                    if ok:
                        slot.have[i] = 1
                if dest is not None:
                    dest.release()
        if ok:
            conn.reply(OK, i)
            self.stats["chunks_received"] += 1
        else:
            self.stats["crc_errors"] += 1
            conn.error(BAD_CRC, "chunk CRC mismatch", i)
        return True

    # upload results -----------------------------------------------------------------
    def _eager_pool(self) -> ThreadPoolExecutor:
        with self.lock:
            if self._eager is None:
                self._eager = ThreadPoolExecutor(1, thread_name_prefix="ftx-eager")
            return self._eager

    def _predecode(self, oid: str, slot: UploadSlot):
        """Decode a completed upload right away, in the background, while the round
        still waits for other nodes and for Flower to deliver the replies: the
        wrapper then only compares digests (``open_slot`` hands the result over). The
        bytes decoded are exactly the bytes hashed, and a complete slot takes no more
        writes, so the digest the reply later claims is checked against what was
        decoded. Errors are kept and raised to the wrapper as a normal decode would."""
        try:
            mv = slot.mv
            return decode_hashed(lambda off, n: bytes(mv[off:off + n]), slot.size)
        finally:
            with slot.lock:
                slot.readers -= 1
                gone = slot.readers == 0 and oid not in self.slots
            if gone:
                slot.free(self.pool)

    def _run_hook(self, oid: str, slot: UploadSlot) -> None:
        """Hand a completed upload's receive buffer (read-only from now on: a complete
        slot takes no more writes) to the slot's hook."""
        try:
            mv = slot.mv.toreadonly()
            src = PayloadSource(lambda off, n: bytes(mv[off:off + n]), slot.size)
            src.view = lambda off, n: mv[off:off + n]
            slot.hook(src)
        except Exception as exc:  # noqa: BLE001 - untrusted upload; the wrapper re-reads it
            log.debug("flwr-transports: landing hook for %s failed: %s", oid, exc)
        finally:
            with slot.lock:
                slot.readers -= 1
                gone = slot.readers == 0 and oid not in self.slots
            if gone:
                slot.free(self.pool)

    def open_slot(self, oid: str, size: int) -> PayloadSource:
        from ..refs import RefError

        with self.lock:
            slot = self.slots.get(oid)
        if slot is None:
            raise LinkError(f"upload slot {oid!r} was discarded")
        with slot.lock:
            if not slot.complete or (slot.mv is None and slot.pre is None):
                raise LinkError(f"the client did not finish its upload into {oid!r}")
            if slot.size != size:
                raise RefError(f"uploaded {slot.size} bytes, the reference says {size}")
            slot.readers += 1
            mv = slot.mv
            pre = slot.pre

        def read(off: int, n: int) -> bytes:
            if off < 0 or n < 0 or off + n > size:
                raise ValueError(f"read({off}, {n}) outside a {size}-byte payload")
            return bytes(mv[off:off + n])

        def close() -> None:
            with slot.lock:
                slot.readers -= 1
                gone = slot.readers == 0 and oid not in self.slots
            if gone:
                slot.free(self.pool)

        src = PayloadSource(read, size, close)
        if pre is not None:
            src.predecoded = lambda timeout=None: pre.result(timeout)
        return src

    def close(self) -> None:
        self.stopping.set()
        try:
            self.sock.close()
        except OSError:
            pass
        self.thread.join(2.0)
        with self.lock:
            active = list(self.active.items())
        for s, _ in active:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _, t in active:
            t.join(2.0)
        if self._eager is not None:
            self._eager.shutdown(wait=True, cancel_futures=True)
        with self.lock:
            self.objects.clear()
            slots, self.slots = list(self.slots.values()), {}
        for s in slots:
            if s.pre is not None and s.pre.cancelled():
                s.readers -= 1  # its decoder never ran
            if s.readers == 0:
                s.free()
        self.pool.clear()
