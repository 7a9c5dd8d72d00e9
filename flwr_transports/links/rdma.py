"""``rdma://HOST:PORT``: the tcp:// chunk protocol with chunk data moved by RDMA.

STATUS: the RDMA data path is written against the pyverbs API (rdma-core) but has
NOT been run on RDMA hardware: the machine this package was developed on has no
RDMA devices (no InfiniBand/RoCE/iWARP, no Soft-RoCE in its kernel). Everything it
shares with ``tcp://`` (chunk table and CRCs, the scheduler, pipelining over parallel
connections, resume, tokens, refusals) is tested over TCP. See docs/links/rdma.md.

Design: each transfer connection is a pair

* a TCP control connection to the payload server at HOST:PORT, carrying exactly
  the tcp:// requests and responses (INFO, GET, PUT_OPEN, PUT, PUT_DONE) with the
  same HMAC token checks;
* an RC queue pair set up through rdma_cm (``pyverbs.cmid.CMID``) to HOST at
  ``rdma_port`` (default PORT+1), paired with the control connection by a random
  nonce that the client SENDs first and names in a HELLO request.

A GET is answered by an RDMA SEND of the chunk from a registered send buffer into
one of ``window`` registered receive buffers the client posted (buffers registered
once per connection and reused for every chunk; one work request per chunk, and
the chunk size is capped at the port's max message size); the control response
(flag ``F_OUT_OF_BAND``, the chunk's index, length and CRC, no inline body) follows
only after the send completion was polled, i.e. when the data has landed. Uploads
mirror it. The receiver re-checks every chunk's CRC, so a damaged chunk is fetched
again exactly as over TCP.

Copies: pyverbs owns registered memory (``MR``), so data is copied into a send
buffer and out of a receive buffer (two user-space copies per side more than a C
implementation that registers the arrays in place would need).

``rdma://`` fails fast, at ``offload(...)`` and on a client, with a message naming
``tcp://`` when pyverbs or an RDMA device is missing.
"""

from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
from typing import Any

from ..options import Option, integer, optional
from ..refs import RefError
from . import chunks
from .base import LinkError
from .tcp import TcpClientLink, TcpServerLink

log = logging.getLogger("flwr_transports.links")

_HINT = ("use tcp://HOST:PORT instead: the same chunked, pipelined, verified protocol over "
         "TCP (several parallel streams per transfer)")
_WC_SUCCESS = 0
_MAX_PAIRS_PENDING = 1024


def rdma_status() -> tuple[bool, str]:
    """(usable, reason): can rdma:// run here?"""
    try:
        import pyverbs.device as d
    except ImportError as exc:
        return False, (f"pyverbs is not importable ({exc}); install rdma-core's Python bindings "
                       "(Debian/Ubuntu: apt install python3-pyverbs; they must match the "
                       "system's rdma-core)")
    except Exception as exc:  # noqa: BLE001 - a broken binding fails in many ways
        return False, f"pyverbs failed to load: {exc}"
    try:
        devs = d.get_device_list()
    except Exception as exc:  # noqa: BLE001 - PyverbsRDMAError when there is no RDMA stack
        return False, f"no RDMA devices ({exc})"
    if not devs:
        return False, "pyverbs found no RDMA devices"
    names = ", ".join(x.name.decode() if isinstance(x.name, bytes) else str(x.name)
                      for x in devs)
    return True, f"RDMA devices: {names}"


def require_rdma() -> None:
    ok, why = rdma_status()
    if not ok:
        raise LinkError(f"rdma:// cannot run on this machine: {why}; {_HINT}")


def _pyverbs():
    import pyverbs.cm_enums as ce
    from pyverbs.cmid import CMID, AddrInfo
    from pyverbs.qp import QPCap, QPInitAttr

    return ce, CMID, AddrInfo, QPCap, QPInitAttr


def _qp_attr(window: int):
    _, _, _, QPCap, QPInitAttr = _pyverbs()
    cap = QPCap(max_send_wr=window + 1, max_recv_wr=window + 1, max_send_sge=1, max_recv_sge=1)
    return QPInitAttr(cap=cap)


def _poll(get, what: str, timeout: float):
    """Poll a completion queue (``get_send_comp``/``get_recv_comp``) until a completion."""
    deadline = time.monotonic() + timeout
    while True:
        wc = get()
        if wc is not None:
            if wc.status != _WC_SUCCESS:
                raise ConnectionError(f"RDMA {what} completion failed (status {wc.status})")
            return wc
        if time.monotonic() > deadline:
            raise TimeoutError(f"no RDMA {what} completion within {timeout}s")


def _copy_in(mr, views: list[memoryview]) -> int:
    off = 0
    for v in views:
        mr.write(bytes(v), len(v), off)
        off += len(v)
    return off


class _Endpoint:
    """One RDMA queue pair with ``window`` registered buffers each way (reused)."""

    def __init__(self, cmid, chunk_size: int, window: int, timeout: float, *, post_recvs: bool):
        self.cmid, self.cs, self.timeout = cmid, chunk_size, timeout
        self.send_mr = cmid.reg_msgs(chunk_size)
        self.recv_mrs = [cmid.reg_msgs(chunk_size) for _ in range(window)]
        self.posted: collections.deque = collections.deque()
        if post_recvs:
            self.post_all()

    def post_all(self) -> None:
        for mr in self.recv_mrs:
            self.cmid.post_recv(mr)
            self.posted.append(mr)

    def send(self, views: list[memoryview]) -> None:
        _copy_in(self.send_mr, views)
        self.cmid.post_send(self.send_mr)  # one WR <= chunk_size <= the port's max message
        _poll(self.cmid.get_send_comp, "send", self.timeout)

    def recv_into(self, dest: memoryview | None, n: int) -> None:
        wc = _poll(self.cmid.get_recv_comp, "receive", self.timeout)
        mr = self.posted.popleft()
        if wc.byte_len < n:
            raise chunks.ProtocolError(f"RDMA message of {wc.byte_len} bytes, expected {n}")
        if dest is not None:
            dest[:] = mr.read(n, 0)
        self.cmid.post_recv(mr)  # reuse the registered buffer
        self.posted.append(mr)

    def close(self) -> None:
        for step in (self.cmid.disconnect, self.cmid.close):
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - best effort teardown
                log.debug("rdma:// teardown: %s", exc)


class _RdmaListener:
    """rdma_cm passive side: accepts queue pairs and pairs them with control connections."""

    def __init__(self, bind: str, port: int, chunk_size: int, window: int, timeout: float):
        ce, CMID, AddrInfo, _, _ = _pyverbs()
        self.cs, self.window, self.timeout = chunk_size, window, timeout
        ai = AddrInfo(src=bind, src_service=str(port), port_space=ce.RDMA_PS_TCP,
                      flags=ce.RAI_PASSIVE)
        self.cmid = CMID(creator=ai, qp_init_attr=_qp_attr(window))
        self.cmid.listen()
        self.pending: dict[bytes, _Endpoint] = {}
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="ftx-rdma-cm", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            try:
                new = self.cmid.get_request()
                hello = new.reg_msgs(32)
                new.post_recv(hello)  # the nonce comes first
                new.accept()
                ep = _Endpoint(new, self.cs, self.window, self.timeout, post_recvs=False)
                _poll(new.get_recv_comp, "hello", self.timeout)
                nonce = hello.read(32, 0)
                ep.post_all()  # buffers for uploaded chunks
            except Exception as exc:  # noqa: BLE001
                if self.stopping:
                    return
                log.warning("rdma:// connection setup failed: %s", exc)
                continue
            with self.cond:
                if len(self.pending) >= _MAX_PAIRS_PENDING:
                    ep.close()
                    continue
                self.pending[nonce] = ep
                self.cond.notify_all()

    def claim(self, nonce: bytes) -> _Endpoint | None:
        deadline = time.monotonic() + self.timeout
        with self.cond:
            while nonce not in self.pending:
                left = deadline - time.monotonic()
                if left <= 0 or self.stopping:
                    return None
                self.cond.wait(left)
            return self.pending.pop(nonce)

    def close(self) -> None:
        self.stopping = True
        try:
            self.cmid.close()  # unblocks get_request
        except Exception as exc:  # noqa: BLE001 - best effort teardown
            log.debug("rdma:// listener teardown: %s", exc)
        with self.cond:
            for ep in self.pending.values():
                ep.close()
            self.pending.clear()
            self.cond.notify_all()
        self.thread.join(2.0)


class RdmaServerConn(chunks.ServerConn):
    """Control connection whose chunk data moves over its paired queue pair."""

    ep: _Endpoint | None = None

    def hello(self, flags: int, a: int, b: int, oid: str) -> None:
        listener: _RdmaListener | None = getattr(self.server, "rdma", None)
        try:
            nonce = bytes.fromhex(oid)
        except ValueError:
            nonce = b""
        ep = listener.claim(nonce) if listener is not None and len(nonce) == 32 else None
        if ep is None:
            self.server.refuse(self, chunks.OP_HELLO, oid, "unknown RDMA pairing nonce")
            self.error(chunks.BAD_REQUEST, "no RDMA queue pair with this nonce")
            raise chunks.ProtocolError("bad RDMA hello")
        self.ep = ep
        self.reply(chunks.OK, a=listener.cs)

    def send_chunk(self, i: int, crc: int, views: list[memoryview]) -> None:
        if self.ep is None:
            return super().send_chunk(i, crc, views)
        self.ep.send(views)
        n = sum(len(v) for v in views)
        self.reply(chunks.OK, i, (), crc, flags=chunks.F_OUT_OF_BAND, length=n)

    def recv_chunk_into(self, dest: memoryview | None, n: int, flags: int) -> None:
        if not flags & chunks.F_OUT_OF_BAND:
            return super().recv_chunk_into(dest, n, flags)
        if self.ep is None:
            raise chunks.ProtocolError("out-of-band chunk without an RDMA queue pair")
        self.ep.recv_into(dest, n)

    def close(self) -> None:
        if self.ep is not None:
            self.ep.close()
            self.ep = None


class _RdmaServerLink(TcpServerLink):
    """Server side of ``rdma://`` (the TCP payload server + an rdma_cm listener)."""

    scheme = "rdma"
    OPTIONS = (*TcpServerLink.OPTIONS,
               Option("rdma_port", optional(integer(1, 65535)), None,
                      "rdma_cm listener port (default: the tcp port + 1)"))
    conn_cls = RdmaServerConn

    def __init__(self, url: str, run_id, options: dict[str, Any]):
        require_rdma()
        super().__init__(url, run_id, options)

    def setup(self) -> None:
        import pyverbs.device as d

        port = self.options.rdma_port or self.server.port + 1
        if not 0 < port < 65536:
            raise ValueError(f"rdma_port {port} is out of range")
        # registered memory regions are sized once: one fixed chunk size (no auto)
        if self.chunk_size is None:
            self.chunk_size = chunks.DEFAULT_CHUNK
        # one work request per chunk: cap chunks at the port's max message size
        dev = d.get_device_list()[0]
        with d.Context(name=dev.name.decode() if isinstance(dev.name, bytes) else dev.name) as c:
            max_msg = c.query_port(1).max_msg_sz
        if self.chunk_size > max_msg:
            log.info("rdma://: chunk_size %d capped at the port's max message size %d",
                     self.chunk_size, max_msg)
            self.chunk_size = max(chunks.MIN_CHUNK, min(self.chunk_size, max_msg))
        self.rdma_port = port
        try:
            self.server.rdma = _RdmaListener(self.server.sock.getsockname()[0], port,
                                             self.chunk_size, self.window, self.timeout)
        except Exception as exc:  # noqa: BLE001 - pyverbs errors are not OSErrors
            self.server.close()
            raise LinkError(f"rdma:// cannot listen for queue pairs on port {port}: {exc}; "
                            f"{_HINT}") from None

    def _desc(self, kind: str, oid: str) -> dict[str, Any]:
        return {**super()._desc(kind, oid), "rdma_port": self.rdma_port,
                "chunk_size": self.chunk_size}

    def close(self) -> None:
        listener = getattr(self.server, "rdma", None)
        super().close()
        if listener is not None:
            listener.close()


class RdmaClientConn(chunks.ClientConn):
    scatter = False  # a chunk arrives as one RDMA message: one target buffer

    def __init__(self, ep: chunks.Endpoint, rdma_port: int, chunk_size: int, window: int):
        super().__init__(ep)
        ce, CMID, AddrInfo, _, _ = _pyverbs()
        try:
            ai = AddrInfo(dst=ep.host, dst_service=str(rdma_port), port_space=ce.RDMA_PS_TCP)
            cmid = CMID(creator=ai, qp_init_attr=_qp_attr(window))
            self.rdma = _Endpoint(cmid, chunk_size, window, ep.timeout, post_recvs=True)
            cmid.connect()
            nonce = secrets.token_bytes(32)
            hello = cmid.reg_msgs(32)
            hello.write(nonce, 32, 0)
            cmid.post_send(hello)
            _poll(cmid.get_send_comp, "hello", ep.timeout)
            self.request(chunks.OP_HELLO, nonce.hex(), b"\0" * 32)
            st, _, _, n, _ = self.response()
            if st != chunks.OK:
                chunks._raise_status(self, st, n, "the RDMA pairing")
        except chunks.Refused:
            self.close()
            raise
        except Exception as exc:  # noqa: BLE001 - pyverbs errors are not OSErrors
            self.close()
            raise ConnectionError(f"RDMA connection to {ep.host}:{rdma_port} failed: {exc}"
                                  ) from None

    def put_chunk(self, oid: str, token: bytes, i: int, crc: int, views: list[memoryview]) -> None:
        self.rdma.send(views)
        self.request(chunks.OP_PUT, oid, token, a=i, b=sum(len(v) for v in views), crc=crc,
                     flags=chunks.F_OUT_OF_BAND)

    def recv_chunk_into(self, dest: memoryview, flags: int) -> None:
        if not flags & chunks.F_OUT_OF_BAND:
            return super().recv_chunk_into(dest, flags)
        self.rdma.recv_into(dest, len(dest))

    def close(self) -> None:
        r = getattr(self, "rdma", None)
        if r is not None:
            r.close()
            self.rdma = None
        super().close()


class _RdmaClientLink(TcpClientLink):
    scheme = "rdma"

    def __init__(self) -> None:
        require_rdma()
        super().__init__()

    def factory(self, ep: chunks.Endpoint, loc: dict[str, Any]):
        port, cs, window = loc.get("rdma_port"), loc.get("chunk_size"), loc.get("window", 4)
        if not (isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536):
            raise RefError(f"rdma:// location has an invalid rdma_port {port!r}")
        if not (isinstance(cs, int) and chunks.MIN_CHUNK <= cs <= chunks.MAX_CHUNK):
            raise RefError(f"rdma:// location has an invalid chunk_size {cs!r}")
        return lambda: RdmaClientConn(ep, port, cs, window)


def __getattr__(name: str):
    """The registry's classes: checked on access, so ``rdma://`` fails at ``offload()``."""
    if name == "RdmaServerLink":
        require_rdma()
        return _RdmaServerLink
    if name == "RdmaClientLink":
        require_rdma()
        return _RdmaClientLink
    raise AttributeError(name)
