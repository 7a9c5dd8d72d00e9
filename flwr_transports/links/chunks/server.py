"""Server side of the chunk engine: the threaded payload server, its published
objects and upload slots, admission and per-group connection accounting."""

from __future__ import annotations

import collections
import hmac
import ipaddress
import logging
import mmap
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ...codec import EncodedPayload, decode_hashed
from ..base import LinkError, PayloadSource
from .buffers import BufferPool, close_map, drop_pages, spill_pool
from .protocol import (
    BAD_CRC,
    BAD_REQUEST,
    BUSY,
    DENIED,
    EVICT_IDLE,
    EXT_OPS,
    F_OUT_OF_BAND,
    ID_RE,
    INCOMPLETE,
    MAGIC_REQ,
    MAGIC_RSP,
    MAX_CHUNK,
    MAX_ERR_BODY,
    MAX_ID,
    MIN_CHUNK,
    NOT_FOUND,
    OK,
    OP_INFO,
    OP_KIND,
    OP_NAMES,
    OP_PUT_DONE,
    OP_PUT_OPEN,
    PREAUTH_TIMEOUT,
    REQ,
    RSP,
    TOO_BIG,
    ProtocolError,
    SegmentView,
    build_table,
    chunk_len,
    drain,
    make_token,
    n_chunks,
    pack_table,
    recv_exact,
    recv_exact_into,
    send_views,
    tune_socket,
)

log = logging.getLogger("flwr_transports.links")

#: bytes of a chunk received into a spill buffer between two page drops (a connection
#: holds at most this much of an upload mapped: 32 connections, 8 MiB)
SPILL_STEP = 256 << 10


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
        #: the buffer is a spill file's mapping (SpillPool): received pages are
        #: dropped from the process as soon as they are written or read
        self.spilled = False
        self.lock = threading.Lock()

    def free(self, pool: BufferPool | None = None, spill: BufferPool | None = None) -> None:
        with self.lock:
            if self.mv is not None:
                self.mv.release()
                self.mv = None
            if self.spilled:
                pool = spill
            if self.buf is not None:
                if pool is not None and not self.claimed:  # no PUT is writing into it
                    pool.put(self.buf)
                else:
                    close_map(self.buf)
                self.buf = None


def peer_group(peer: str) -> str:
    """The download group of a connection from ``peer`` (``"ADDR:PORT"``): its IPv4
    address (/32), or its IPv6 /64 network. One host usually holds a whole IPv6 /64
    (SLAAC, privacy addresses, a delegated prefix), so grouping by address would let
    it open ``max_per_group`` connections from each of 2**64 addresses; an IPv4-mapped
    IPv6 address counts as its IPv4 address. A scope id (``%eth0``) is dropped."""
    host = peer.rsplit(":", 1)[0].strip("[]").split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host  # not an IP (a UNIX socket in a test): its own group
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class _Admission:
    """What the server knows about one accepted connection, for its accounting.

    A connection starts unauthenticated; its first request with a valid token charges
    it to a *group*: the upload slot (one node's) or, for downloads, the published
    object and the peer's network (:func:`peer_group`: IPv4 /32, IPv6 /64).
    ``idle_since`` is None while a request is served.
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
    (one node's), or to the downloaded object and peer network (IPv4 /32, IPv6 /64:
    :func:`peer_group`); a group may hold at
    most ``max_per_group`` connections (default ``max_conns // 4``, at least 8).
    """

    def __init__(self, bind: str, port: int, *, secret: bytes, timeout: float = 60.0,
                 max_conns: int = 256, ssl_ctx: ssl.SSLContext | None = None,
                 conn_cls: type[ServerConn] = ServerConn, name: str = "tcp",
                 pool_cap: int = 1 << 30, spill: bool = True, spill_dir: str | None = None):
        self.secret, self.timeout, self.max_conns = secret, timeout, max_conns
        self.max_per_group = max(8, max_conns // 4)
        self.preauth_timeout = min(PREAUTH_TIMEOUT, timeout)
        self.adm: dict[Any, _Admission] = {}  # raw socket -> accounting
        self.groups: collections.Counter = collections.Counter()
        self.pool = BufferPool(pool_cap)
        #: uploads with a landing hook (streaming aggregation folds them as they land)
        #: are received into spill files, so the process holds no per-node copy of the
        #: model while the round waits for the others (issue 24: flat in N)
        self.spill = spill_pool(pool_cap, spill_dir) if spill else None
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
        #: called (no arguments) right after last_landed changed: the link's notify_landed
        self.on_landed: Callable[[], None] | None = None
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
        """Discard an upload slot. Its connections are closed too: one stalled (or
        trickling) inside a chunk holds a view of the receive buffer, which would keep
        the buffer (a spill file's disk) until, if ever, its receive timed out."""
        with self.lock:
            slot = self.slots.pop(oid, None)
            conns = [a.raw for a in self.adm.values() if a.group == ("put", oid)]
        for raw in conns:
            try:
                raw.shutdown(socket.SHUT_RDWR)  # wakes its thread, which lets go of the view
            except OSError:
                pass
        if slot is not None and slot.readers == 0:
            slot.free(self.pool, self.spill)

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
        group = (kind, oid) if kind == "put" else (kind, oid, peer_group(conn.peer))
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
            tune_socket(raw)  # no Nagle; downloads: a send buffer for a long fat pipe
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
                    slot.buf = self._alloc(slot, size)
                    slot.size, slot.cs = size, cs
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
            if missing == 0 and self.on_landed is not None:
                self.on_landed()
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
            if dest is not None and slot.spilled:
                ok = self._recv_spilled(conn, slot.buf, i * slot.cs, dest, flags) == crc
            else:
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

    @staticmethod
    def _recv_spilled(conn: ServerConn, buf, off: int, dest: memoryview, flags: int) -> int:
        """Receive a chunk into a spill buffer ``SPILL_STEP`` bytes at a time, each
        piece's CRC taken and its pages dropped as soon as it is in: a connection keeps
        at most one piece of the upload mapped, however large the chunks (so N uploads
        in flight cost N x streams x 1 MiB, not N x streams x chunk size). Returns the
        chunk's CRC-32."""
        crc, pos, n = 0, 0, len(dest)
        while pos < n:
            k = min(SPILL_STEP, n - pos)
            with dest[pos:pos + k] as piece:
                conn.recv_chunk_into(piece, k, flags)
                crc = zlib.crc32(piece, crc)
            drop_pages(buf, off + pos, k)
            pos += k
        return crc

    def _alloc(self, slot: UploadSlot, size: int):
        """The receive buffer of an upload (called under ``slot.lock``): a spill
        file's mapping when the upload is folded on landing, else pooled memory. A
        spill file that cannot be made (full disk, no temp dir) falls back to memory,
        logged once per server."""
        spill = self.spill  # once: rdma:// may turn spilling off meanwhile (no lock)
        if spill is not None and slot.hook is not None:
            try:
                buf = spill.get(size)
            except OSError as exc:
                if not self.stats["spill_failed"]:
                    log.warning("flwr-transports: %s:// cannot make a spill file in %s "
                                "(%s); uploads are received into memory instead",
                                self.name, spill.directory or "the temp directory", exc)
                self.stats["spill_failed"] += 1
            else:
                slot.spilled = True
                self.stats["spilled"] += 1
                return buf
        return self.pool.get(size)

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
            self._release_reader(oid, slot)

    def _release_reader(self, oid: str, slot: UploadSlot) -> None:
        """One reader of a completed upload is done; the last one frees the buffer
        (back to the pool) once the slot was discarded."""
        with slot.lock:
            slot.readers -= 1
            gone = slot.readers == 0 and oid not in self.slots
        if gone:
            slot.free(self.pool, self.spill)

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
            if slot.spilled:  # folded: its pages go back to the page cache
                with slot.lock:
                    if slot.buf is not None:  # None: discarded while it landed
                        drop_pages(slot.buf, 0, slot.size or 0)
            self._release_reader(oid, slot)

    def open_slot(self, oid: str, size: int) -> PayloadSource:
        from ...refs import RefError

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

        spilled = slot.spilled

        def read(off: int, n: int) -> bytes:
            if off < 0 or n < 0 or off + n > size:
                raise ValueError(f"read({off}, {n}) outside a {size}-byte payload")
            out = bytes(mv[off:off + n])
            if spilled:  # a rebuild re-reads it from the spill file: keep no pages
                drop_pages(slot.buf, off, n)
            return out

        def close() -> None:
            self._release_reader(oid, slot)

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
        if self.spill is not None:
            self.spill.clear()

