"""Moving wire messages over MPI: one header message, then raw data messages.

Tags: ``TAG_HDR`` carries the JSON header, ``TAG_DATA`` the buffers (in the order
:func:`flwr_transports.mpi.wire.wire_segments` gives). MPI keeps messages between
one pair of ranks on one tag in order, so a receiver that took a header from rank
``r`` finds that message's data next on ``(r, TAG_DATA)``.

Waiting is done with ``Iprobe``/``Test`` and short sleeps when nothing is moving, so
idle ranks do not spin a core (MPICH's blocking calls busy-poll); while data is in
flight the loops call into MPI without sleeping, which is what drives MPI's progress.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

from .. import _membuf
from . import wire

TAG_HDR = 7001
TAG_DATA = 7002

INSTALL_HINT = "the MPI runtime needs mpi4py and an MPI: pip install 'flwr-transports[mpi]'"


class MpiTimeout(TimeoutError):
    """A peer rank did not deliver within the allowed time."""


def import_mpi():
    """Import ``mpi4py.MPI`` (initializes MPI) with an install hint on failure."""
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"{INSTALL_HINT} ({exc})") from exc
    return MPI


# ---------------------------------------------------------------------------------------
# receive buffers: a fresh ``bytes`` object that MPI writes into (no extra copy)


def alloc_bytes(n: int) -> tuple[Any, memoryview]:
    """``(obj, writable view)`` for an ``n``-byte receive: a fresh ``bytes`` object MPI
    fills in place (see :mod:`flwr_transports._membuf`), with transparent huge pages
    requested as NumPy does for its arrays (fewer page faults while MPI writes)."""
    return _membuf.alloc_bytes(n, huge=True)


# ---------------------------------------------------------------------------------------
# sending


@dataclass
class PendingSend:
    """Non-blocking sends of one message; keeps its buffers alive until done."""

    dest: int
    requests: list[Any]
    keep: list[Any] = field(default_factory=list)

    def done(self, MPI) -> bool:
        if self.requests and MPI.Request.Testall(self.requests):
            self.requests = []
            self.keep = []
        return not self.requests


def isend(comm, MPI, dest: int, header: bytes, segments: list[Any]) -> PendingSend:
    """Post the header and data sends for one message (returns immediately)."""
    reqs = [comm.Isend([header, MPI.BYTE], dest=dest, tag=TAG_HDR)]
    for seg in segments:
        reqs.append(comm.Isend([seg, MPI.BYTE], dest=dest, tag=TAG_DATA))
    return PendingSend(dest, reqs, [header, segments])


_yield = getattr(os, "sched_yield", lambda: time.sleep(0))
SENDER_NAP = 0.0002  # seconds a waiting sender sleeps between checks


def wait_all(MPI, requests: list[Any], deadline: float | None, what: str, *,
             sender: bool = False) -> None:
    """Drive ``requests`` to completion; raise MpiTimeout past ``deadline``.

    A receiver keeps calling into MPI (it does the copy there: with CMA the receiver
    reads the sender's memory). A ``sender`` of large messages has nothing to do but
    wait for the receiver's acknowledgement, so after a short spin it sleeps in small
    steps instead of yielding in a loop: on a machine with fewer cores than ranks a
    spinning sender steals the CPU the receiver needs for the copy.
    """
    spins = 0
    while requests and not MPI.Request.Testall(requests):
        spins += 1
        if sender and spins > 64:
            time.sleep(SENDER_NAP)
        else:
            _yield()
        if deadline is not None and time.monotonic() > deadline:
            for r in requests:
                with contextlib.suppress(Exception):  # best effort
                    r.Cancel()
            raise MpiTimeout(what)


def send(comm, MPI, dest: int, header: bytes, segments: list[Any], deadline=None) -> None:
    """Send one message and wait until MPI is done with its buffers."""
    p = isend(comm, MPI, dest, header, segments)
    wait_all(MPI, p.requests, deadline, f"sending to rank {dest} timed out", sender=True)


# ---------------------------------------------------------------------------------------
# receiving


class Poller:
    """Sleep schedule for idle waiting: 0, then growing up to ``cap`` seconds."""

    def __init__(self, cap: float = 0.005) -> None:
        self.cap = cap
        self.idle = 0

    def reset(self) -> None:
        self.idle = 0

    def wait(self) -> None:
        self.idle += 1
        if self.idle > 50:
            time.sleep(min(self.cap, 1e-5 * 2 ** min(self.idle - 50, 20)))


def probe_header(comm, MPI, source: int) -> tuple[int, int] | None:
    """If a header is waiting from ``source`` (or any), return ``(source, size)``."""
    status = MPI.Status()
    if comm.Iprobe(source=source, tag=TAG_HDR, status=status):
        return status.Get_source(), status.Get_count(MPI.BYTE)
    return None


def recv_header(comm, MPI, source: int, size: int, *, max_total: int | None) -> dict:
    if size > wire.MAX_HEADER_BYTES:
        raise wire.WireError(f"header of {size} bytes from rank {source} is too large")
    raw = bytearray(size)
    comm.Recv([raw, MPI.BYTE], source=source, tag=TAG_HDR)
    return wire.parse_header(raw, max_total=max_total)


def recv_payload(comm, MPI, source: int, hdr: dict, deadline: float | None) -> list[bytes]:
    """Receive the data messages announced by ``hdr`` from ``source``."""
    layout: wire.Layout = hdr["layout"]
    final, views = wire.receive_targets(layout, alloc_bytes)
    reqs = [comm.Irecv([v, MPI.BYTE], source=source, tag=TAG_DATA) for v in views]
    wait_all(MPI, reqs, deadline, f"receiving data from rank {source} timed out")
    return wire.finish_buffers(layout, final)
