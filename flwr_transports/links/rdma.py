"""``rdma://HOST:PORT``: chunked, pipelined one-sided RDMA transfers on NVIDIA NIXL (UCX).

The engine is NVIDIA NIXL (``pip install --no-deps nixl-cu12``) with its bundled UCX:
the same calls run over UCX's ``cma`` (same host: ``process_vm_readv``), ``tcp``
(UCX emulates RDMA READ in software) and, on a fabric, ``rc``/``ud``/``dc``
(InfiniBand/RoCE) or EFA. Which one is chosen is UCX's business, steered by the link
options ``ucx_tls`` and ``ucx_net_devices`` (UCX's ``UCX_TLS``/``UCX_NET_DEVICES``).

Control: the link IS the tcp:// payload server (same tokens, tickets, timeouts,
refusals), with two extra token-checked ops on its control connection:

* ``RDMA_GET`` (download token): the server answers with the chunk table, the NIXL
  metadata of its agent *for this object only* (``get_partial_agent_metadata``:
  connection info + the object's registrations, no other region) and the object's
  memory segments (address, length). The client then READs the chunks itself.
* ``RDMA_PUT`` (upload token): the client sends its agent's metadata for the reply's
  registered segments, their addresses and a CRC-32 per chunk; the server READs the
  chunks into the slot's buffer, checks each CRC, re-reads damaged chunks, commits the
  slot and answers once the whole reply is in.

Data: every transfer is cut into chunks (the chunk table of tcp://, CRC-32 each);
``window`` chunk READs are in flight at once (FedRDMA's pipelining); a chunk whose
CRC does not match, or whose READ failed, is read again (up to 5 times), so the
receiver always verifies and repairs by itself, with no round trip to the sender.

Memory registration is amortised:

* the published global model is registered ONCE per round (at ``publish``), in place
  (no copy of the encoded arrays), and read by every client;
* a client registers its receive placement once per download: the payload header
  goes into a bytearray and each array's bytes into a fresh ``bytes`` object that
  becomes Flower's ``Array.data`` as is (no copy after the transfer, as tcp:// does);
* replies are registered in place by the client (the encoded reply's own segments)
  and read by the server into upload buffers that are registered once and reused
  round after round (a pool, like tcp://'s ``buffer_pool``).

Why the server READs replies instead of the client WRITing them: the server never
hands any client write access to its memory (on a fabric an rkey with remote write
is a standing capability until deregistered), the side that verifies the chunks also
re-reads the damaged ones, the server paces its own memory and link (it reads at
most ``window`` chunks per reply at once), and both directions share one tested
reader. The price: the server parses the client's NIXL metadata (size-capped) and
spends its CPU polling the reads.
"""

from __future__ import annotations

import atexit
import bisect
import collections
import importlib
import logging
import os
import re
import secrets
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .. import _membuf
from ..codec import EncodedPayload
from ..codec import data_ranges as codec_data_ranges
from ..options import Option
from ..refs import RefError
from . import chunks
from .base import LinkError, PayloadSource
from .tcp import TcpClientLink, TcpServerLink, endpoint_from, is_loopback

log = logging.getLogger("flwr_transports.links")

INSTALL_LINE = "pip install --no-deps 'nixl-cu12==1.5.1'"
INSTALL_HINT = (f"install NVIDIA NIXL with `{INSTALL_LINE}` (its package metadata requires "
                "torch; --no-deps keeps your torch instead of pulling a CUDA build of several "
                "GB; NIXL itself imports only numpy) or `pip install 'flwr-transports[rdma]'` "
                "after installing torch")
_NIXL_MODULES = ("nixl_cu12", "nixl_cu13", "nixl")

MAX_MD = 1 << 20  # bytes of NIXL agent metadata accepted from a peer
MAX_SEGS = 1 << 17  # memory segments per payload (arrays + header; the codec allows 100k arrays)
PUT_HEAD = struct.Struct("!QII")  # size, metadata length, segment count
GET_HEAD = struct.Struct("!II")  # metadata length, segment count
SEG = struct.Struct("!QQ")  # address, length
SNIFF = 64 * 1024  # first bytes of a download read to learn where the arrays lie
MAX_CHUNK_RETRIES = 5

_TLS_RE = re.compile(r"^\^?[A-Za-z0-9_:]+(,[A-Za-z0-9_:]+)*$")
_DEV_RE = re.compile(r"^[A-Za-z0-9_.:-]+(,[A-Za-z0-9_.:-]+)*$")


# -- the engine ------------------------------------------------------------------------
def load_nixl():
    """Import NIXL's Python API lazily; a LinkError with the install line if missing."""
    errors = []
    for name in _NIXL_MODULES:
        try:
            mod = importlib.import_module(name)
            mod.nixl_agent  # noqa: B018 - a namespace without the API does not count
        except (ImportError, AttributeError) as exc:
            errors.append(f"{name}: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 - a broken binary fails in many ways
            raise LinkError(f"rdma:// cannot load NIXL ({name}): {exc}; {INSTALL_HINT}") from None
        if not os.environ.get("NIXL_LOG_LEVEL"):
            logging.getLogger("nixl").setLevel(logging.WARNING)  # it logs every agent at INFO
        return mod
    raise LinkError(f"rdma:// needs NVIDIA NIXL, which is not installed here "
                    f"({'; '.join(errors[:1])}); {INSTALL_HINT}")


def parse_rdma_options(options: dict[str, Any]) -> dict[str, str | None]:
    """rdma://'s own options (beyond tcp://'s): UCX transport selection.

    ``ucx_tls``          UCX_TLS for the link's agents, e.g. ``tcp``, ``rc,tcp``,
                         ``^cma`` (default: UCX's own choice). Sent to clients in every
                         descriptor; a client whose environment sets UCX_TLS keeps its own.
    ``ucx_net_devices``  UCX_NET_DEVICES for the server's agent, e.g. ``mlx5_0:1``
                         (host-specific: clients use their own environment).
    """
    out: dict[str, str | None] = {}
    for key, rx in (("ucx_tls", _TLS_RE), ("ucx_net_devices", _DEV_RE)):
        v = options.get(key)
        v = None if v is None else str(v).strip()
        if v and (len(v) > 200 or not rx.match(v)):
            raise ValueError(f"option {key}={v!r} is not a UCX list (e.g. 'tcp' or 'rc,tcp')")
        out[key] = v or None
    return out


def _ucx_opt(key: str):
    def parse(v: Any) -> str | None:
        return parse_rdma_options({key: v})[key]
    return parse


def _addr(v: memoryview) -> int:
    import numpy as np

    return int(np.frombuffer(v, dtype=np.uint8).ctypes.data)


_ENV_LOCK = threading.Lock()
#: microseconds the NIXL progress thread sleeps between polls. NIXL's Python API sets 0,
#: a busy loop that costs a CPU core per process (measured here: 0.24-0.5 core while
#: idle); 100 us costs ~2% and adds at most that much latency to a software-emulated
#: (UCX tcp) READ served by this process.
def _progress_delay_us() -> int:
    from ..settings import text

    try:
        return int(text("FLWR_TRANSPORTS_NIXL_PROGRESS_US"))
    except ValueError:
        return 100


PROGRESS_DELAY_US = _progress_delay_us()


def _new_nixl_agent(nixl, name: str, cfg):
    """``nixl.nixl_agent(name, cfg)`` with the progress thread's delay set to
    :data:`PROGRESS_DELAY_US` (the Python API has no knob for it: the binding's agent
    constructor is wrapped for this one call, under ``_ENV_LOCK``)."""
    api = importlib.import_module(nixl.nixl_agent.__module__)
    bind = getattr(api, "nixlBind", None)
    real = getattr(bind, "nixlAgent", None)
    if real is None or PROGRESS_DELAY_US <= 0:
        return nixl.nixl_agent(name, cfg)

    def make(agent_name, agent_cfg):
        agent_cfg.pthrDelay = PROGRESS_DELAY_US
        return real(agent_name, agent_cfg)

    bind.nixlAgent = make
    try:
        return nixl.nixl_agent(name, cfg)
    finally:
        bind.nixlAgent = real


def _nvidia_gpu_present() -> bool:
    """An NVIDIA GPU is visible to this process (driver node or /dev entry)."""
    try:
        if os.listdir("/proc/driver/nvidia/gpus"):
            return True
    except OSError:
        pass
    return any(re.fullmatch(r"nvidia\d+", n) for n in _listdir("/dev"))


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def with_gpu_tls(tls: str | None) -> str | None:
    """``tls`` plus ``cuda_copy`` on a host with an NVIDIA GPU.

    NIXL refuses to start a UCX backend whose UCX_TLS lists no CUDA transport when it
    sees a GPU ("NVIDIA GPU(s) are present, but this setting does not enable CUDA memory
    support"; seen on an H200 host with NIXL 1.5.1), even though rdma:// registers host
    memory only. ``cuda_copy`` moves nothing here; it only lets the agent start."""
    if not tls or not _nvidia_gpu_present():
        return tls
    names = tls.split(",")
    if any(n == "cuda" or n.startswith("cuda_") for n in names) or names[0].startswith("^"):
        return tls
    return tls + ",cuda_copy"


class Agent:
    """One NIXL agent with the UCX backend and its progress thread (needed by UCX's
    tcp transport, which serves one-sided READs in software on the target side)."""

    def __init__(self, name: str, ucx_tls: str | None = None,
                 ucx_net_devices: str | None = None, *, keep_env_tls: bool = False):
        nixl = load_nixl()
        env = {"UCX_TLS": with_gpu_tls(ucx_tls), "UCX_NET_DEVICES": ucx_net_devices}
        if keep_env_tls and os.environ.get("UCX_TLS"):
            env["UCX_TLS"] = None  # this process's own UCX settings win
        self.name, self.tls = name, ucx_tls
        with _ENV_LOCK:  # UCX reads its settings from the environment at context creation
            saved = {k: os.environ.get(k) for k in env}
            try:
                for k, v in env.items():
                    if v:
                        os.environ[k] = v
                cfg = nixl.nixl_agent_config(
                    enable_prog_thread=True, backends=["UCX"],
                    sync_mode=nixl.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
                try:
                    self.a = _new_nixl_agent(nixl, name, cfg)
                except Exception as exc:  # noqa: BLE001 - nixlBackendError and friends
                    shown = ", ".join(f"{k}={os.environ.get(k) or '(default)'}" for k in env)
                    raise LinkError(
                        f"rdma:// cannot start a NIXL/UCX agent with {shown}: {exc}; run "
                        "`flwr-transports doctor` to see which UCX transports work here") from None
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        if "UCX" not in self.a.backends:
            self.a = None
            raise LinkError("rdma:// needs NIXL's UCX backend plugin, which this NIXL lacks; "
                            + INSTALL_HINT)
        self.lock = threading.Lock()
        self.upload_lock = threading.Lock()

    # memory ------------------------------------------------------------------------
    def register(self, views: Sequence[memoryview]):
        """Register buffers with UCX (in place); returns a handle for ``deregister``."""
        descs = [(_addr(v), len(v), 0, "") for v in views if len(v)]
        if not descs:
            return None
        return self.a.register_memory(descs, "DRAM")

    def deregister(self, reg) -> None:
        if reg is not None and self.a is not None:
            try:
                self.a.deregister_memory(reg)
            except Exception as exc:  # noqa: BLE001 - best effort at teardown
                log.debug("rdma:// deregister: %s", exc)

    def metadata(self, reg) -> bytes:
        """Connection info + the registrations in ``reg`` only (nothing else of ours)."""
        if reg is None:
            return bytes(self.a.get_agent_metadata())
        return bytes(self.a.get_partial_agent_metadata(reg, True))

    def load(self, md: bytes) -> str:
        try:
            name = self.a.add_remote_agent(md)
        except Exception as exc:  # noqa: BLE001
            raise RefError(f"rdma:// peer metadata was rejected by NIXL: {exc}") from None
        return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)

    def unload(self, name: str) -> None:
        try:
            self.a.remove_remote_agent(name)
        except Exception as exc:  # noqa: BLE001
            log.debug("rdma:// remove_remote_agent(%s): %s", name, exc)

    # transfers ---------------------------------------------------------------------
    def post_read(self, local: list[tuple[int, int, int]], remote: list[tuple[int, int, int]],
                  peer: str):
        """Start one one-sided READ of ``remote`` into ``local`` (pairwise equal lengths)."""
        a = self.a
        h = a.initialize_xfer("READ", a.get_xfer_descs(local, "DRAM"),
                              a.get_xfer_descs(remote, "DRAM"), peer)
        if a.transfer(h) == "ERR":
            self.release(h)
            raise ConnectionError("RDMA read could not be posted")
        return h

    def state(self, h) -> str:
        return self.a.check_xfer_state(h)

    def release(self, h) -> bool:
        """Free a transfer handle (cancelling it if active); False if it could not be."""
        try:
            h.release()
            return True
        except Exception as exc:  # noqa: BLE001
            log.debug("rdma:// release of an active read failed: %s", exc)
            return False

    def close(self) -> None:
        self.a = None  # the agent (UCX workers, progress thread) goes with its last reference


class RemoteLayout:
    """Where a payload lies in a peer's memory: segments (address, length) in order."""

    def __init__(self, segs: list[tuple[int, int]], size: int):
        if sum(n for _, n in segs) != size:
            raise RefError("rdma:// peer memory segments do not add up to the payload size")
        self.segs = [(a, n) for a, n in segs if n]
        self.starts = []
        pos = 0
        for _, n in self.segs:
            self.starts.append(pos)
            pos += n

    def range(self, off: int, n: int) -> list[tuple[int, int]]:
        out, end = [], off + n
        k = max(0, bisect.bisect_right(self.starts, off) - 1)
        while off < end and k < len(self.segs):
            a, ln = self.segs[k]
            s = self.starts[k]
            lo, hi = off - s, min(ln, end - s)
            if hi > lo:
                out.append((a + lo, hi - lo))
                off = s + hi
            k += 1
        return out


def pair_descs(local: list[tuple[int, int]], remote: list[tuple[int, int]]):
    """Split two tilings of the same byte range into pairwise equal descriptors."""
    lo_d, re_d = [], []
    li = ri = lo = ro = 0
    while li < len(local) and ri < len(remote):
        la, ln = local[li]
        ra, rn = remote[ri]
        k = min(ln - lo, rn - ro)
        lo_d.append((la + lo, k, 0))
        re_d.append((ra + ro, k, 0))
        lo += k
        ro += k
        if lo == ln:
            li, lo = li + 1, 0
        if ro == rn:
            ri, ro = ri + 1, 0
    if li != len(local) or ri != len(remote):
        raise ValueError("local and remote ranges differ in length")
    return lo_d, re_d


def read_chunks(agent: Agent, peer: str, sched: chunks.ChunkScheduler, *, size: int, cs: int,
                table: list[int], local: Callable[[int, int], list[memoryview]],
                remote: RemoteLayout, window: int, timeout: float,
                fault: Callable[[int, list[memoryview]], Any] | None = None,
                landed: Callable[[int], Any] | None = None,
                budget: chunks.ByteBudget | None = None) -> bool:
    """Drive the chunk READs of one transfer until ``sched`` has no more work.

    ``landed(i)`` is called once chunk ``i`` is read and its CRC checked (a spill
    buffer then drops its pages). ``budget``: the bytes of READs in flight are also
    bounded by this server-wide budget (shared by every upload; at least one READ per
    transfer always goes).

    Keeps ``window`` READs in flight; each completed chunk's CRC is checked against
    ``table`` (a mismatch or a failed READ re-queues the chunk, up to the scheduler's
    retry limit). A READ that makes no progress for ``timeout`` seconds fails the
    transfer. Returns False if an in-flight READ could not be cancelled (its target
    buffer must then never be reused).
    """
    inflight: collections.OrderedDict[int, tuple[Any, list[memoryview], float]] = (
        collections.OrderedDict())
    clean = True
    nap = 0.0
    held = 0  # bytes of this transfer's READs in flight, charged to the budget

    def charged(i: int) -> int:
        return chunks.chunk_len(i, size, cs) if budget is not None else 0

    try:
        while True:
            while len(inflight) < window:
                if budget is not None and held and budget.used + cs > budget.limit:
                    break  # the server's other uploads hold the budget: later
                i = sched.take(block=False)
                if i is None:
                    break
                off, n = i * cs, chunks.chunk_len(i, size, cs)
                if budget is not None:
                    if not budget.take(n, held):
                        sched.requeue(i)
                        break
                    held += n
                try:
                    views = local(off, n)  # LinkError: the buffer is gone (slot discarded)
                    for v in views:
                        _membuf.populate(v)  # fault the target pages in one call, not per page
                    ld, rd = pair_descs([(_addr(v), len(v)) for v in views],
                                        remote.range(off, n))
                    h = agent.post_read(ld, rd, peer)
                except Exception as exc:  # NIXL errors are not OSErrors
                    sched.requeue(i)
                    if budget is not None:  # never started: its bytes go back
                        budget.give(n)
                        held -= n
                    if isinstance(exc, LinkError):
                        raise
                    raise LinkError(f"rdma:// cannot start a READ from {peer}: {exc}") from None
                inflight[i] = (h, views, time.monotonic())
            if not inflight:
                return clean  # finished, failed or stopped: nothing more to start
            progressed = False
            for i, (h, views, t0) in list(inflight.items()):
                st = agent.state(h)
                if st == "PROC":
                    if time.monotonic() - t0 > timeout:
                        raise LinkError(f"rdma:// READ of chunk {i} from {peer} made no "
                                        f"progress in {timeout:g}s")
                    continue
                del inflight[i]
                progressed = True
                agent.release(h)
                if budget is not None:
                    budget.give(charged(i))
                    held -= charged(i)
                if st != "DONE":
                    sched.corrupted(i, "RDMA read failed")
                    continue
                if fault is not None:
                    fault(i, views)
                if chunks.crc_views(views) != table[i]:
                    sched.corrupted(i, "CRC mismatch")
                else:
                    sched.done(i)
                    if landed is not None:
                        landed(i)
            if progressed:
                nap = 0.0
            else:
                nap = min(max(nap * 2, 2e-5), 1e-3)
                time.sleep(nap)
    finally:
        for i, (h, _, _) in inflight.items():
            if not agent.release(h):  # cancels an active READ where UCX can
                clean = False
            sched.requeue(i)
            if budget is not None:
                budget.give(charged(i))


# -- client agents (one per process and UCX_TLS choice, reused for every transfer) ---------
_CLIENT_AGENTS: dict[tuple[int, str | None], Agent] = {}
_CLIENT_LOCK = threading.Lock()


def client_agent(ucx_tls: str | None) -> Agent:
    key = (os.getpid(), ucx_tls)
    with _CLIENT_LOCK:
        ag = _CLIENT_AGENTS.get(key)
        if ag is None:
            ag = Agent(f"ftx-c-{os.getpid()}-{secrets.token_hex(6)}", ucx_tls, keep_env_tls=True)
            _CLIENT_AGENTS[key] = ag
        return ag


@atexit.register
def _close_client_agents() -> None:
    with _CLIENT_LOCK:
        agents = [a for (pid, _), a in _CLIENT_AGENTS.items() if pid == os.getpid()]
        _CLIENT_AGENTS.clear()
    for a in agents:
        a.close()


# -- server ----------------------------------------------------------------------------
#: bytes of READs into spill buffers in flight on one server, every upload together
SPILL_INFLIGHT = 32 << 20


class RegisteredPool(chunks.BufferPool):
    """The upload buffer pool, each buffer registered once and kept registered while
    pooled (reused for the next round's replies: no registration cost again)."""

    def __init__(self, cap: int, agent: Agent, **kw: Any):
        super().__init__(cap, **kw)
        self.agent = agent
        self.regs: dict[int, tuple[Any, Any]] = {}  # id(buffer) -> (buffer, registration)
        self.registrations = 0

    def registered(self, buf) -> None:
        with self.lock:
            if id(buf) in self.regs:
                return
        reg = self.agent.register([memoryview(buf)])
        with self.lock:
            self.regs[id(buf)] = (buf, reg)
            self.registrations += 1

    def _drop(self, m) -> None:
        with self.lock:
            entry = self.regs.pop(id(m), None)
        if entry is not None:
            self.agent.deregister(entry[1])
        chunks.close_map(m)

    def put(self, m) -> None:
        if m.closed:
            return
        if len(m) > self.cap:
            self._drop(m)
            return
        if self.spill:
            chunks.drop_pages(m, 0, len(m))
        with self.lock:
            self.free.append(m)
            evicted = []
            while sum(len(x) for x in self.free) > self.cap:
                evicted.append(self.free.pop(0))
        for e in evicted:
            self._drop(e)

    def clear(self) -> None:
        with self.lock:
            free, self.free = self.free, []
        for m in free:
            self._drop(m)
        with self.lock:  # buffers closed by their slot (never pooled) are still registered
            rest, self.regs = list(self.regs.values()), {}
        for _, reg in rest:
            self.agent.deregister(reg)


class _ServerRdma:
    """The server's NIXL side: its agent, registrations, peers in use."""

    def __init__(self, name: str, opts: dict[str, str | None], pool_cap: int, window: int,
                 timeout: float, spill_dir: str | None = None):
        self.agent = Agent(name, opts["ucx_tls"], opts["ucx_net_devices"])
        self.pool = RegisteredPool(pool_cap, self.agent)
        #: spill buffers (file-backed), registered once like the pool's
        self.spill = RegisteredPool(pool_cap, self.agent, spill=True,
                                    alloc=lambda n: chunks.alloc_spill(n, spill_dir))
        self.spill.directory = spill_dir
        #: bytes of spilled READs in flight, all uploads together (their pages are mapped
        #: until the chunk's CRC is checked): what N uploads at once cost stays flat
        self.inflight = chunks.ByteBudget(SPILL_INFLIGHT)
        self.window, self.timeout = window, timeout
        self.peers: dict[str, str] = {}  # client agent name -> slot being read
        self.lock = threading.Lock()
        self.unclean = 0

    def close(self) -> None:
        self.pool.clear()
        self.spill.clear()
        self.agent.close()


class RdmaServerConn(chunks.ServerConn):
    """Control connection of the rdma:// payload server: the two RDMA extension ops."""

    def extension(self, op: int, oid: str, flags: int, a: int, b: int, crc: int) -> bool:
        rd: _ServerRdma | None = getattr(self.server, "rdma", None)
        if rd is None:
            return super().extension(op, oid, flags, a, b, crc)
        if op == chunks.OP_RDMA_GET:
            return self._get(rd, oid)
        return self._put(rd, oid, a, b)

    def _get(self, rd: _ServerRdma, oid: str) -> bool:
        obj = self.server.objects.get(oid)
        body = getattr(obj, "rdma_body", None)
        if body is None:
            self.server.refuse(self, chunks.OP_RDMA_GET, oid, "object released or never published")
            self.error(chunks.NOT_FOUND, "payload expired (released by the server) or unknown")
            return False
        self.reply(chunks.OK, 0, body)
        self.server.stats["rdma_gets"] += 1
        return True

    def _put(self, rd: _ServerRdma, oid: str, cs: int, blen: int) -> bool:
        srv = self.server
        slot = srv.slots.get(oid)
        if slot is None:
            srv.refuse(self, chunks.OP_RDMA_PUT, oid, "slot discarded or never issued")
            self.error(chunks.NOT_FOUND, "upload slot expired or unknown")
            return False
        limit = (PUT_HEAD.size + MAX_MD + SEG.size * MAX_SEGS
                 + chunks.table_limit(max(slot.max_size, 1)))
        if blen > limit:
            srv.refuse(self, chunks.OP_RDMA_PUT, oid, f"request body of {blen} bytes")
            self.error(chunks.TOO_BIG, "upload request too large")
            return False
        body = chunks.recv_exact(self.sock, blen)
        try:
            size, md, layout, table = _parse_put(body, cs, slot.max_size)
        except chunks.Refused as exc:
            srv.refuse(self, chunks.OP_RDMA_PUT, oid, str(exc))
            self.error(chunks.TOO_BIG, str(exc))
            return False
        except (RefError, ValueError, struct.error) as exc:
            srv.refuse(self, chunks.OP_RDMA_PUT, oid, f"malformed upload request: {exc}")
            self.error(chunks.BAD_REQUEST, f"malformed upload request: {exc}")
            return False
        n = chunks.n_chunks(size, cs)
        with slot.lock:
            if slot.complete:
                if (slot.size, slot.cs) == (size, cs):
                    self.reply(chunks.OK)  # a retried request after success
                    return True
                self.error(chunks.BAD_REQUEST, "upload already committed with another size")
                return False
            if slot.size is None:
                slot.buf = srv._alloc(slot, size)
                slot.size, slot.cs = size, cs
                slot.mv = memoryview(slot.buf)
                slot.have = bytearray(n)
            elif (slot.size, slot.cs) != (size, cs):
                self.error(chunks.BAD_REQUEST, "upload already opened with another size")
                return False
            if slot.claimed:
                self.error(chunks.BUSY, "another transfer is filling this slot; retry later")
                return True
            slot.claimed.add(-1)  # an RDMA read is landing in this buffer
            todo = [i for i in range(n) if not slot.have[i]]
            buf, mv = slot.buf, slot.mv
        peer = None
        clean, err = True, None
        spilled = slot.spilled
        try:
            if todo:
                buf, mv = self._register(rd, slot, buf, mv)
                spilled = slot.spilled
                peer = rd.agent.load(md)
                with rd.lock:
                    owner = rd.peers.get(peer)
                    if owner is None:
                        rd.peers[peer] = oid
                if owner is not None:
                    peer = None  # not ours to unload
                    raise chunks.Refused("this client agent is already uploading another reply")
                sched = chunks.ChunkScheduler(n, todo, max_chunk_retries=MAX_CHUNK_RETRIES)
                fault = srv.fault

                def hook(i: int, views: list[memoryview]) -> None:
                    if fault is not None:
                        fault(chunks.OP_RDMA_PUT, oid, i, views)

                landed = None
                if slot.spilled:  # a checked chunk's pages go back to the page cache
                    def landed(i: int) -> None:
                        chunks.drop_pages(buf, i * cs, chunks.chunk_len(i, size, cs))

                def local(off: int, k: int) -> list[memoryview]:
                    if slot.buf is not buf:  # freed (mv released): the round discarded it
                        raise LinkError(f"upload slot {oid[:64]!r} was discarded")
                    return [mv[off:off + k]]

                try:
                    clean = read_chunks(rd.agent, peer, sched, size=size, cs=cs, table=table,
                                        local=local, remote=layout,
                                        window=rd.window, timeout=rd.timeout, fault=hook,
                                        landed=landed,
                                        budget=rd.inflight if slot.spilled else None)
                finally:
                    with slot.lock:
                        for i in range(n):
                            if sched.state[i] == chunks.DONE:
                                slot.have[i] = 1
                srv.stats["chunks_received"] += sched.stats["chunks"]
                srv.stats["crc_errors"] += sched.stats["crc_errors"]
                err = sched.error
        except (LinkError, RefError) as exc:
            # its frames (read_chunks': views of the buffer) must go before the drop below
            err = exc.with_traceback(None)
            err.__context__ = err.__cause__ = None
        finally:
            with slot.lock:
                if clean:
                    slot.claimed.discard(-1)  # else the buffer is never pooled again
                # discarded while we read (slot.free closes, never pools, a claimed
                # buffer): nobody else holds it, drop it with its registration now
                orphan = clean and slot.buf is not buf
                missing = slot.have.count(0)
                start = not missing and not slot.complete and srv.eager
                if not missing:
                    slot.complete = True
                    srv.last_landed = time.perf_counter()
                if start:
                    slot.readers += 1
            if peer is not None:
                with rd.lock:
                    rd.peers.pop(peer, None)
                rd.agent.unload(peer)
            if not clean:
                rd.unclean += 1
            if orphan:
                (rd.spill if spilled else rd.pool)._drop(buf)
        if not missing and srv.on_landed is not None:
            srv.on_landed()  # the receive loop pulls the reply now
        if start and slot.hook is not None:  # streaming aggregation folds it now
            srv._eager_pool().submit(srv._run_hook, oid, slot)
        elif start:
            slot.pre = srv._eager_pool().submit(srv._predecode, oid, slot)
        if missing:
            why = f"{missing} of {n} chunks could not be read" + (f": {err}" if err else "")
            log.warning("rdma:// upload into %s from %s failed: %s", oid[:64], self.peer, why)
            status = chunks.DENIED if isinstance(err, chunks.Refused) else chunks.INCOMPLETE
            self.error(status, why)
            return True
        self.reply(chunks.OK)
        return True


    def _register(self, rd: _ServerRdma, slot, buf, mv):
        """Register the slot's buffer with NIXL (once per pooled buffer). A spill
        buffer the memory registration refuses (a kernel that will not pin a file's
        page cache for a NIC: Linux 6.5+ refuses long-term writable pins of
        file-backed mappings) is swapped for pooled memory, and spilling is turned
        off for this server, logged once."""
        if not slot.spilled:
            rd.pool.registered(buf)
            return buf, mv
        try:
            rd.spill.registered(buf)
            return buf, mv
        except Exception as exc:  # noqa: BLE001 - NIXL errors are not OSErrors
            log.warning("rdma:// cannot register a spill file's pages for RDMA (%s); "
                        "uploads are received into memory from now on (spill=off)", exc)
        srv = self.server
        srv.spill = None  # one store: _alloc reads it once (no lock needed)
        with slot.lock:
            new = rd.pool.get(slot.size)
            with memoryview(new) as dst:  # chunks already in (tcp:// PUTs): keep them
                for i in (k for k, got in enumerate(slot.have) if got):
                    off = i * slot.cs
                    end = off + chunks.chunk_len(i, slot.size, slot.cs)
                    dst[off:end] = slot.mv[off:end]
            slot.mv.release()
            chunks.close_map(slot.buf)
            slot.buf, slot.spilled = new, False
            slot.mv = memoryview(slot.buf)
            buf, mv = slot.buf, slot.mv
        rd.pool.registered(buf)
        return buf, mv


def _parse_put(body: bytes, cs: int, max_size: int):
    """Validate an RDMA_PUT request body (network input): sizes before anything else."""
    size, md_len, nseg = PUT_HEAD.unpack_from(body)
    if size > max_size:
        raise chunks.Refused(f"upload of {size} bytes exceeds the cap of {max_size}")
    chunks.check_chunk_size(cs)
    if md_len > MAX_MD or nseg > MAX_SEGS:
        raise ValueError("metadata or segment list too large")
    pos = PUT_HEAD.size
    md = body[pos:pos + md_len]
    pos += md_len
    segs = [SEG.unpack_from(body, pos + k * SEG.size) for k in range(nseg)]
    pos += nseg * SEG.size
    n = chunks.n_chunks(size, cs)
    if len(body) != pos + 4 * n or len(md) != md_len:
        raise ValueError("request body does not match its declared lengths")
    table = list(struct.unpack_from(f"!{n}I", body, pos))
    return size, md, RemoteLayout(segs, size), table


class RdmaServerLink(TcpServerLink):
    """Server side of ``rdma://``: the tcp:// payload server for control, a NIXL agent
    for data (the published model registered once per round, pooled reply buffers)."""

    scheme = "rdma"
    # tcp://'s options minus ``streams`` (one-sided reads need no parallel sockets)
    OPTIONS = (
        *(o for o in TcpServerLink.OPTIONS if o.name != "streams"),
        Option("ucx_tls", _ucx_opt("ucx_tls"), None, "UCX_TLS for the link's NIXL agents, e.g. "
               "tcp, rc,tcp, ^cma (default: UCX's own choice); sent to clients in every "
               "descriptor, a client whose environment sets UCX_TLS keeps its own"),
        Option("ucx_net_devices", _ucx_opt("ucx_net_devices"), None, "UCX_NET_DEVICES for "
               "the server's agent, e.g. mlx5_0:1 (host-specific: clients use their own "
               "environment)"),
    )
    conn_cls = RdmaServerConn

    def __init__(self, url, run_id, options=None):
        load_nixl()  # fail at offload(), with the install line, before anything starts
        super().__init__(url, run_id, options)

    def setup(self) -> None:
        self.rdma_opts = {k: self.options[k] for k in ("ucx_tls", "ucx_net_devices")}
        try:
            rd = _ServerRdma(f"{self.prefix}-srv", self.rdma_opts, self.server.pool.cap,
                             self.window, self.timeout, self.options.spill_dir)
        except BaseException:
            self.server.close()
            raise
        self.server.rdma = rd
        self.server.pool = rd.pool  # upload buffers: registered once, reused
        if self.server.spill is not None:
            self.server.spill = rd.spill
        self._regs: dict[str, Any] = {}
        # the control connection follows tcp://'s TLS rule; UCX moves the data itself
        (log.info if is_loopback(self.host) else log.warning)(
            "rdma:// %s: control connection %s; the model bytes move over UCX (NIXL) "
            "UNENCRYPTED (ucx_tls=%s): across a network, run it on a trusted fabric or "
            "use tcp:// (TLS by default)", self.host,
            "TLS (pinned certificate)" if self.tls else "plaintext",
            self.rdma_opts["ucx_tls"] or "UCX's choice")

    def _desc(self, kind: str, oid: str) -> dict[str, Any]:
        d = super()._desc(kind, oid)
        d.pop("streams", None)
        if self.rdma_opts["ucx_tls"]:
            d["ucx_tls"] = self.rdma_opts["ucx_tls"]
        return d

    def publish(self, name: str, payload: EncodedPayload) -> dict[str, Any]:
        self.release(name)
        loc = super().publish(name, payload)
        oid = loc["id"]
        obj = self.server.objects[oid]
        rd: _ServerRdma = self.server.rdma
        try:
            reg = rd.agent.register(obj.sv.views)  # once per round, read by every client
            md = rd.agent.metadata(reg)
        except LinkError:
            self.server.remove_object(oid)
            raise
        except Exception as exc:  # noqa: BLE001
            self.server.remove_object(oid)
            raise LinkError(f"rdma:// cannot register the payload: {exc}") from None
        self._regs[oid] = reg
        segs = b"".join(SEG.pack(_addr(v), len(v)) for v in obj.sv.views)
        obj.rdma_body = [GET_HEAD.pack(len(md), len(obj.sv.views)), md, segs, obj.table]
        return loc

    def release(self, name: str) -> None:
        oid = self._published.get(name)
        super().release(name)
        reg = self._regs.pop(oid, None) if oid else None
        if reg is not None:
            self.server.rdma.agent.deregister(reg)

    def close(self) -> None:
        rd = getattr(self.server, "rdma", None)
        super().close()  # stops the control server (and its reads), frees the slots
        if rd is not None:
            for reg in self._regs.values():
                rd.agent.deregister(reg)
            self._regs.clear()
            rd.close()
            self.server.rdma = None


# -- client ----------------------------------------------------------------------------
def _client_opts(loc: dict[str, Any]) -> str | None:
    tls = loc.get("ucx_tls")
    if tls is None:
        return None
    if not (isinstance(tls, str) and len(tls) <= 200 and _TLS_RE.match(tls)):
        raise RefError(f"rdma:// location has an invalid ucx_tls {tls!r}")
    return tls


def _control(ep: chunks.Endpoint, retries: int, fn):
    """Run ``fn(conn)`` on a fresh control connection, retrying transient failures."""
    conn, out = chunks.first_request(lambda: chunks.ClientConn(ep), fn, retries)
    conn.close()
    return out


class RdmaClientLink(TcpClientLink):
    """Client side of ``rdma://``: one NIXL agent per process, reused for every transfer."""

    scheme = "rdma"

    def __init__(self) -> None:
        super().__init__()
        #: test hook: fault(index, views) on each downloaded chunk before its CRC check
        self.fault: Callable[[int, list[memoryview]], Any] | None = None

    def open(self, loc: dict[str, Any], size: int) -> PayloadSource:
        ep, oid, token, k = endpoint_from(loc)
        agent = client_agent(_client_opts(loc))
        self.last_stats = {}

        def rdma_get(c: chunks.ClientConn):
            c.request(chunks.OP_RDMA_GET, oid, token)
            st, _, _, n, _ = c.response()
            if st != chunks.OK:
                chunks.raise_status(c, st, n, f"object {oid!r}")
            return c.body(n, GET_HEAD.size + MAX_MD + SEG.size * MAX_SEGS + chunks.table_limit(
                max(size, 1)))

        body = _control(ep, k["retries"], rdma_get)
        try:
            md_len, nseg = GET_HEAD.unpack_from(body)
            if md_len > MAX_MD or nseg > MAX_SEGS:
                raise ValueError("metadata or segment list too large")
            pos = GET_HEAD.size
            md = body[pos:pos + md_len]
            pos += md_len
            segs = [SEG.unpack_from(body, pos + j * SEG.size) for j in range(nseg)]
            pos += nseg * SEG.size
            cs, table = chunks.unpack_table(body[pos:], size)
            layout = RemoteLayout(segs, size)
        except RefError:
            raise  # the object is not what the reference says: a rejection
        except (ValueError, struct.error, chunks.ProtocolError) as exc:
            raise LinkError(f"rdma:// payload server sent a malformed answer: {exc}") from None
        peer = agent.load(md)
        return self._download(agent, peer, layout, cs, table, size, k["window"], ep.timeout)

    def _sniff(self, agent: Agent, peer: str, layout: RemoteLayout, size: int, timeout: float):
        """Read the payload header (not trusted: it only decides where bytes land)."""
        if size < 8 or not _membuf.zero_copy_available():
            return None
        head = bytearray(min(size, SNIFF))
        if not self._read_small(agent, peer, layout, head, timeout):
            return None
        hlen = int.from_bytes(head[:8], "little")
        if 8 + hlen > size or hlen > chunks.MAX_SNIFF_HEADER:
            return None
        if 8 + hlen > len(head):
            head = bytearray(8 + hlen)
            if not self._read_small(agent, peer, layout, head, timeout):
                return None
        return codec_data_ranges(head, size)

    @staticmethod
    def _read_small(agent: Agent, peer: str, layout: RemoteLayout, buf: bytearray,
                    timeout: float) -> bool:
        mv = memoryview(buf)
        reg = agent.register([mv])
        try:
            ld, rd = pair_descs([(_addr(mv), len(mv))], layout.range(0, len(mv)))
            h = agent.post_read(ld, rd, peer)
            deadline = time.monotonic() + timeout
            while (st := agent.state(h)) == "PROC" and time.monotonic() < deadline:
                time.sleep(2e-5)
            if st == "PROC" and not agent.release(h):
                chunks.keep_forever(buf)  # may still be written: never reuse it
                return False
            agent.release(h)
            return st == "DONE"
        except (ConnectionError, ValueError):
            return False
        finally:
            mv.release()
            agent.deregister(reg)

    def _download(self, agent: Agent, peer: str, layout: RemoteLayout, cs: int,
                  table: list[int], size: int, window: int, timeout: float) -> PayloadSource:
        placement = self._sniff(agent, peer, layout, size, timeout)
        dest = (chunks.ScatterDest(size, *placement) if placement is not None
                else chunks.FlatDest(size, None))
        views = ([p[3] for p in dest.pieces] if isinstance(dest, chunks.ScatterDest)
                 else [dest.mv])
        reg = agent.register(views)  # the placement, registered once for all its chunks
        n = len(table)
        sched = chunks.ChunkScheduler(n, max_chunk_retries=MAX_CHUNK_RETRIES)
        clean = [True]
        fault = self.fault

        def run() -> None:
            try:
                clean[0] = read_chunks(agent, peer, sched, size=size, cs=cs, table=table,
                                       local=dest.views, remote=layout, window=window,
                                       timeout=timeout, fault=fault)
                if not sched.finished and sched.error is None and not sched.stopped:
                    sched.fail(LinkError("rdma:// download stopped before completing"))
            except BaseException as exc:  # noqa: BLE001 - never lose an error in a thread
                sched.fail(exc if isinstance(exc, LinkError) else LinkError(
                    f"rdma:// download failed: {exc!r}"))
            finally:
                if clean[0]:
                    agent.deregister(reg)

        t = threading.Thread(target=run, name="ftx-rdma-get", daemon=True)
        t.start()

        def read(off: int, k: int) -> bytes:
            if off < 0 or k < 0 or off + k > size:
                raise ValueError(f"read({off}, {k}) outside a {size}-byte payload")
            if k == 0:
                return b""
            sched.wait_chunks(off // cs, (off + k - 1) // cs, timeout * (MAX_CHUNK_RETRIES + 2))
            return dest.read(off, k)

        def close() -> None:
            sched.stop()
            t.join(timeout + 5)
            self.last_stats.update(sched.stats)
            self.last_stats["zero_copy"] = int(dest.scatter)
            dest.release(not t.is_alive() and clean[0])

        src = PayloadSource(read, size, close)
        src.scheduler = sched
        src.placement = lambda: dest
        return src

    def upload(self, slot: dict[str, Any], payload: EncodedPayload) -> dict[str, Any]:
        ep, oid, token, k = endpoint_from(slot)
        cs = slot.get("chunk_size", chunks.DEFAULT_CHUNK)
        if not (isinstance(cs, int) and chunks.MIN_CHUNK <= cs <= chunks.MAX_CHUNK):
            raise RefError(f"rdma:// slot has an invalid chunk_size {cs!r}")
        agent = client_agent(_client_opts(slot))
        sv = chunks.SegmentView(payload.segments)
        if sv.size != payload.size:
            raise ValueError(f"payload segments hold {sv.size} bytes, the payload says "
                             f"{payload.size}")
        crcs = chunks.build_table(sv, cs)
        self.last_stats = {}
        with agent.upload_lock:  # one reply at a time per agent (the server checks)
            reg = agent.register(sv.views)  # the reply's own memory: no copy
            try:
                md = agent.metadata(reg)
                body = b"".join([PUT_HEAD.pack(sv.size, len(md), len(sv.views)), md,
                                 *(SEG.pack(_addr(v), len(v)) for v in sv.views),
                                 struct.pack(f"!{len(crcs)}I", *crcs)])

                def put(c: chunks.ClientConn) -> None:
                    c.request(chunks.OP_RDMA_PUT, oid, token, a=cs, b=len(body), body=[body])
                    # the server answers when it has read and verified every chunk
                    c.sock.settimeout(ep.timeout * (MAX_CHUNK_RETRIES + 2))
                    st, _, _, n, _ = c.response()
                    if st != chunks.OK:
                        if st == chunks.INCOMPLETE:  # the server gave up reading: no retry
                            raise chunks.Refused(f"rdma:// upload failed: {c.error_text(st, n)}")
                        chunks.raise_status(c, st, n, f"an upload of {sv.size} bytes")

                _control(ep, k["retries"], put)
            finally:
                agent.deregister(reg)
        self.last_stats["chunks"] = len(crcs)
        return {"host": slot["host"], "port": slot["port"], "id": oid}


# -- what works here ---------------------------------------------------------------------
_PROBE = r"""
import logging, os, sys, time
import numpy as np
mod = None
for name in ("nixl_cu12", "nixl_cu13", "nixl"):
    try:
        mod = __import__(name); mod.nixl_agent; break
    except Exception:
        mod = None
logging.getLogger("nixl").setLevel(logging.ERROR)
cfg = lambda: mod.nixl_agent_config(enable_prog_thread=True, backends=["UCX"])
a, b = mod.nixl_agent("probe-a", cfg()), mod.nixl_agent("probe-b", cfg())
if "UCX" not in a.backends:
    sys.exit(3)
src, dst = bytearray(b"x" * (1 << 20)), bytearray(1 << 20)
ad = lambda m: np.frombuffer(m, dtype=np.uint8).ctypes.data
ra = a.register_memory([(ad(src), len(src), 0, "")], "DRAM")
rb = b.register_memory([(ad(dst), len(dst), 0, "")], "DRAM")
peer = b.add_remote_agent(a.get_agent_metadata())
h = b.initialize_xfer("READ", b.get_xfer_descs([(ad(dst), len(dst), 0)], "DRAM"),
                      b.get_xfer_descs([(ad(src), len(src), 0)], "DRAM"), peer)
st, t = b.transfer(h), time.monotonic()
while st == "PROC" and time.monotonic() - t < 10:
    st = b.check_xfer_state(h)
print("FTX-PROBE", st, bytes(dst[:1]) == b"x", flush=True)
"""


def probe_ucx(tls: str | None, timeout: float = 30.0) -> tuple[bool, str]:
    """Try a real one-sided READ between two NIXL agents (in a child process) with
    UCX_TLS=``tls``; return (works, what UCX used or why not)."""
    import subprocess
    import sys

    env = dict(os.environ, UCX_PROTO_INFO="y")
    env.pop("UCX_TLS", None)
    if tls:
        env["UCX_TLS"] = with_gpu_tls(tls)
    try:
        p = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, check=False,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, "the probe timed out"
    out = p.stdout + p.stderr
    if "FTX-PROBE DONE True" not in out:
        last = [ln for ln in out.splitlines() if "rror" in ln or "failed" in ln]
        return False, (last[-1].strip()[-200:] if last else f"probe exited with {p.returncode}")
    used = sorted(set(re.findall(r"\b(cma|tcp|rc_mlx5|rc_verbs|dc_mlx5|ud_mlx5|ud_verbs|srd|"
                                 r"knem|xpmem|posix|sysv|self|gdr_copy|cuda_ipc)/", _read_tables(
                                     out))))
    return True, "one-sided READ works" + (f" (UCX used {', '.join(used)})" if used else "")


def _read_tables(out: str) -> str:
    """The parts of UCX_PROTO_INFO output that describe remote memory reads."""
    keep, on = [], False
    for ln in out.splitlines():
        if "remote memory read" in ln:
            on = True
        elif on and ("remote memory write" in ln or "active message" in ln):
            on = False
        if on:
            keep.append(ln)
    return "\n".join(keep)


def ib_devices() -> list[str]:
    try:
        return sorted(os.listdir("/sys/class/infiniband"))
    except OSError:
        return []


RMA_TRANSPORTS = {"cma": ("cma",), "tcp": ("tcp",), "rc": ("rc_mlx5", "rc_verbs"),
                  "ud": ("ud_mlx5", "ud_verbs"), "dc": ("dc_mlx5",)}


def ucx_transports() -> dict[str, tuple[bool, str]]:
    """For each UCX transport rdma:// can use (cma, tcp; rc/ud/dc with an RDMA device):
    (usable, detail), by a real one-sided READ between two NIXL agents per transport,
    probes run in parallel. UCX_TLS=<t>,tcp lets UCX wire up over tcp; the transport
    counts as usable only if UCX reports it for the READ itself."""
    from concurrent.futures import ThreadPoolExecutor

    devs = ib_devices()
    names = ["cma", "tcp"] + (["rc", "ud", "dc"] if devs else [])
    with ThreadPoolExecutor(len(names)) as ex:
        probes = dict(zip(names, ex.map(lambda t: probe_ucx(t if t == "tcp" else f"{t},tcp"),
                                        names), strict=True))
    out: dict[str, tuple[bool, str]] = {}
    for t in names:
        ok, why = probes[t]
        used = set(re.findall(r"UCX used ([\w, ]+)", why)[0].split(", ")) if "UCX used" in why \
            else set()
        if ok and used & set(RMA_TRANSPORTS[t]):
            out[t] = (True, "one-sided READ works")
        elif ok:
            out[t] = (False, f"UCX fell back to {', '.join(sorted(used)) or 'another transport'}")
        else:
            out[t] = (False, why)
    if not devs:
        for t in ("rc", "ud", "dc"):
            out[t] = (False, "no RDMA device")
    return out


def rdma_status() -> tuple[bool, str]:
    """(usable, details): can rdma:// run here, over which UCX transports, what to install."""
    try:
        load_nixl()
    except LinkError as exc:
        return False, str(exc)
    tr = ucx_transports()
    usable = [t for t, (ok, _) in tr.items() if ok]
    parts = [f"UCX transports usable: {', '.join(usable) or 'none'}"]
    parts += [f"{t}: {why}" for t, (ok, why) in tr.items() if not ok and why != "no RDMA device"]
    if not ib_devices():
        parts.append("rc/ud/dc: no RDMA device (/sys/class/infiniband is empty or missing); for "
                     "InfiniBand/RoCE install the NIC driver and rdma-core (kernel modules, "
                     "libibverbs; NIXL bundles UCX's ib/mlx5/efa modules), then check with "
                     "ibv_devices")
    if "cma" not in usable:
        parts.append("cma (same-host reads) needs ptrace permission between the processes "
                     "(kernel.yama.ptrace_scope=0, or the same user without Yama)")
    return bool(usable), "; ".join(parts)
