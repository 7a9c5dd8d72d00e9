"""The chunk scheduler (which chunk goes where, retries) and the receive buffers
(memory-mapped, pooled between transfers)."""

from __future__ import annotations

import collections
import logging
import mmap
import os
import threading
import time
from collections.abc import Sequence

from ..base import LinkError

log = logging.getLogger("flwr_transports.links")


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


def close_map(m: mmap.mmap) -> None:
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

    def __init__(self, cap: int, *, alloc=None, spill: bool = False):
        self.cap = cap
        self.free: list[mmap.mmap] = []
        self.lock = threading.Lock()
        self.hits = 0
        #: fn(size) -> a new buffer (whole MiBs from 1 MiB on); default: anonymous memory
        self.alloc = alloc or alloc_buffer
        #: spill buffers (file-backed): their pages are dropped before they are pooled
        self.spill = spill
        self.directory: str | None = None

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
        return self.alloc(-(-size // POOL_GRAIN) * POOL_GRAIN if size >= POOL_GRAIN else size)

    def put(self, m: mmap.mmap) -> None:
        if m.closed:
            return
        if self.spill:
            drop_pages(m, 0, len(m))
        if len(m) > self.cap:
            close_map(m)
            return
        with self.lock:
            self.free.append(m)
            while sum(len(x) for x in self.free) > self.cap:
                close_map(self.free.pop(0))

    def clear(self) -> None:
        with self.lock:
            free, self.free = self.free, []
        for m in free:
            close_map(m)


def alloc_spill(size: int, directory: str | None) -> mmap.mmap:
    """A receive buffer backed by an unlinked file in ``directory`` (the system's
    temporary directory when None) instead of anonymous memory.

    Used for uploads that streaming aggregation folds as they land: the received
    pages live in the page cache (reclaimable, written back to disk under memory
    pressure), not in the process, once :func:`drop_pages` released them, so N uploads
    in flight cost the receiving process O(chunk), not N x the model. The file's
    blocks are reserved up front (``posix_fallocate``): a full disk is an OSError
    here, never a SIGBUS in the middle of a transfer. The file has no name (it is
    removed right after it is created), so nothing is left behind, even after a crash.
    """
    import tempfile

    n = max(size, 1)
    with tempfile.TemporaryFile(dir=directory, prefix="ftx-spill-") as f:
        os.posix_fallocate(f.fileno(), 0, n)
        return mmap.mmap(f.fileno(), n, flags=mmap.MAP_SHARED,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE)


def drop_pages(m: mmap.mmap, off: int, n: int) -> None:
    """Unmap the pages of ``m[off:off+n]`` from this process (a spill buffer's: the
    data stays in the file; the next access faults it back from the page cache).
    The range is widened to whole pages: on a shared file mapping that only costs a
    neighbour's page a cheap refault, never its data."""
    if n <= 0 or m.closed:
        return
    start = off - off % mmap.PAGESIZE
    end = min(len(m), off + n)
    try:
        m.madvise(mmap.MADV_DONTNEED, start, end - start)
    except (OSError, ValueError):  # best effort: the pages stay mapped
        pass


class ByteBudget:
    """Bytes in flight shared by every transfer of a server (the pages of chunks being
    written into spill buffers, not yet checked and dropped): bounds what N uploads at
    once cost, whatever N is. ``take(n)`` never blocks a transfer that holds nothing
    (each one can always move one chunk), so a chunk larger than the budget still goes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.cond = threading.Condition()

    def take(self, n: int, holding: int) -> bool:
        """Reserve ``n`` bytes for a transfer holding ``holding`` bytes already; False
        (nothing reserved) when over budget and the transfer holds some."""
        with self.cond:
            if holding and self.used + n > self.limit:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()


def spill_pool(cap: int, directory: str | None = None) -> BufferPool:
    """A pool of spill buffers (:func:`alloc_spill`): up to ``cap`` bytes of reserved
    disk kept for the next round's uploads, their pages left in the page cache."""
    pool = BufferPool(cap, alloc=lambda n: alloc_spill(n, directory), spill=True)
    pool.directory = directory
    return pool


def _env_pool_cap() -> int:
    from ...codec import parse_size
    from ...settings import text

    try:
        return parse_size(text("FLWR_TRANSPORTS_BUFFER_POOL"))
    except ValueError:
        return 0


#: client-side pool of download buffers (FLWR_TRANSPORTS_BUFFER_POOL bytes, default 1GiB)
CLIENT_POOL = BufferPool(_env_pool_cap())


