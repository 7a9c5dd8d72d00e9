"""Wire format of the chunk engine: constants, request/response headers, tokens,
chunk tables and CRCs, socket helpers, the byte-range view of a payload."""

from __future__ import annotations

import bisect
import hashlib
import hmac
import logging
import re
import ssl
import struct
import zlib
from collections.abc import Sequence

from ...refs import RefError
from ..base import LinkError

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


#: environment variable: bytes to ask for with SO_SNDBUF on every chunk connection,
#: ``auto`` (default) or ``0`` (leave the kernel's send-buffer autotuning alone)
SNDBUF_ENV = "FLWR_TRANSPORTS_SNDBUF"


def _proc_int(path: str, field: int, default: int) -> int:
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().split()[field])
    except (OSError, ValueError, IndexError):
        return default


def send_buffer_request() -> int:
    """Bytes to request with SO_SNDBUF on a chunk connection (0: do not set it).

    A TCP sender keeps every unacknowledged byte in its send buffer, so one stream moves
    at most about one send buffer per round trip. Autotuning stops at ``tcp_wmem``'s
    maximum (4 MiB by default: ~25 MB/s per stream at 100 ms RTT, measured), while an
    explicit SO_SNDBUF may go up to ``net.core.wmem_max``, which the kernel doubles for
    its bookkeeping (8 MiB with the defaults: ~45 MB/s per stream at 100 ms, 1.8x).
    ``auto`` asks for ``wmem_max`` when that beats autotuning's cap, else leaves the
    socket alone (a host tuned for WANs keeps its own setting). Override with
    ``FLWR_TRANSPORTS_SNDBUF`` (bytes, e.g. ``16MiB``, or ``0``)."""
    from ...codec import parse_size
    from ...settings import text as setting

    text = setting(SNDBUF_ENV).strip().lower()
    if text != "auto":
        try:
            return max(0, parse_size(text))
        except ValueError:
            log.warning("ignoring %s=%r: give bytes (e.g. 16MiB), 0 or auto", SNDBUF_ENV, text)
    wmem_max = _proc_int("/proc/sys/net/core/wmem_max", 0, 0)
    autotune_cap = _proc_int("/proc/sys/net/ipv4/tcp_wmem", 2, 4 << 20)
    return wmem_max if 2 * wmem_max > autotune_cap else 0


def tune_socket(sock) -> int:
    """TCP_NODELAY and the send buffer of :func:`send_buffer_request` on a chunk
    connection; returns the send buffer the kernel granted (0 if unknown)."""
    import socket

    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    want = send_buffer_request()
    try:
        if want:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, want)
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    except OSError:
        return 0


_TLS_JOIN = 4096  # bytes: buffers up to this size are joined before a TLS send


def send_views(sock, bufs: Sequence[bytes | memoryview]) -> None:
    """Send buffers back to back without joining them (``sendmsg`` gather I/O)."""
    if isinstance(sock, ssl.SSLSocket):
        # no sendmsg (gather I/O) on TLS sockets: OpenSSL encrypts each buffer into its
        # own records, from the caller's memory (no copy besides the ciphertext). Small
        # pieces (headers, ids) are joined first: one record and one segment, not three.
        small: list[bytes | memoryview] = []
        for b in bufs:
            if len(b) <= _TLS_JOIN:
                small.append(b)
                continue
            if small:
                sock.sendall(b"".join(small))
                small = []
            sock.sendall(b)
        if small:
            sock.sendall(b"".join(small))
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
    """Byte ranges of a list of segments, as memoryviews (never copied).

    The one byte-range slicer of the project: the chunk engine's published objects and
    receive placements, and the s3:// link's part builder, all cut ranges with it.
    ``starts`` gives each segment's offset when the segments do not simply follow each
    other from 0 (they must still be in order and must not overlap)."""

    def __init__(self, segments: Sequence[bytes | memoryview],
                 starts: Sequence[int] | None = None):
        self.views, self.starts = [], []
        pos = 0
        for k, s in enumerate(segments):
            v = memoryview(s)
            if v.format != "B" or v.ndim != 1:
                v = v.cast("B")
            at = pos if starts is None else starts[k]
            if len(v):
                self.views.append(v)
                self.starts.append(at)
            pos = at + len(v)
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


