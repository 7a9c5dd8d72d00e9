"""``MpiGrid``: a Flower Grid whose messages go to MPI ranks instead of a SuperLink.

Rank 0 runs the ServerApp with this Grid. Every other rank is one node
(``node_id = NODE_ID_BASE + rank``) running the ClientApp loop of
:mod:`flwr_transports.mpi.node`.

* ``push_messages`` gives each message an id, encodes it (arrays as raw buffers) and
  posts non-blocking sends; it returns at once.
* ``pull_messages`` receives whatever replies have arrived and returns those asked for.
* ``send_and_receive`` pushes, then waits (progressing sends, receiving replies) until
  every reply is in or ``timeout`` passes; replies come back in push order. When the
  timeout passes it logs which ranks did not answer and returns what it has (Flower's
  semantics).
* ``reply_timeout`` (launcher ``--reply-timeout``): if set, a message that has waited
  longer than this for its reply raises :class:`RankTimeout` naming the rank; the
  launcher then ends the whole job.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import Message, RecordDict
from flwr.serverapp.grid import Grid
from flwr.supercore.run import Run

from . import comm as C
from . import wire

log = logging.getLogger("flwr_transports.mpi")

NODE_ID_BASE = 1000  # node id of rank r is NODE_ID_BASE + r


class RankTimeout(RuntimeError):
    """A client rank did not reply in time."""

    def __init__(self, rank: int, node_id: int, message_id: str, waited: float) -> None:
        self.rank, self.node_id = rank, node_id
        super().__init__(
            f"MPI rank {rank} (node {node_id}) did not reply to message {message_id} "
            f"within {waited:.1f} s: the rank has stalled or died"
        )


class RankError(RuntimeError):
    """A client rank sent something the server cannot use."""


@dataclass
class _Outstanding:
    rank: int
    node_id: int
    pushed_at: float


def node_id_of(rank: int) -> int:
    return NODE_ID_BASE + rank


class MpiGrid(Grid):
    """Grid over an MPI communicator; this process must be rank 0 of ``comm``."""

    def __init__(
        self,
        comm,
        *,
        run: Run | None = None,
        chunk: int = wire.DEFAULT_CHUNK,
        small: int = wire.DEFAULT_SMALL,
        reply_timeout: float | None = None,
        max_message_bytes: int | None = None,
        poll_cap: float = 0.005,
    ) -> None:
        self._MPI = C.import_mpi()
        if comm.Get_rank() != 0:
            raise RuntimeError("MpiGrid must be created on rank 0")
        if comm.Get_size() < 2:
            raise RuntimeError("MpiGrid needs at least 2 ranks (1 server + 1 node)")
        self._comm = comm
        self._run = run
        self._chunk = int(chunk)
        self._small = int(small)
        self._reply_timeout = reply_timeout
        self._max_bytes = max_message_bytes
        self._poller = C.Poller(poll_cap)
        self._rank_of_node = {node_id_of(r): r for r in range(1, comm.Get_size())}
        self._sends: list[C.PendingSend] = []
        self._outstanding: dict[str, _Outstanding] = {}
        self._inbox: dict[str, Message] = {}  # reply_to_message_id -> reply
        self.bytes_sent = 0
        self.bytes_received = 0

    # -- Grid API --------------------------------------------------------------------

    def set_run(self, run: Run) -> None:
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run).__name__}")
        self._run = run

    @property
    def run(self) -> Run:
        if self._run is None:
            raise RuntimeError("MpiGrid has no run set")
        return Run(**vars(self._run))

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._rank_of_node)

    def rank_of(self, node_id: int) -> int:
        try:
            return self._rank_of_node[node_id]
        except KeyError:
            raise ValueError(f"unknown node id {node_id} (nodes: {list(self._rank_of_node)})")

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        MPI = self._MPI
        ids: list[str] = []
        for msg in messages:
            md = msg.metadata
            if md.reply_to_message_id != "" or md.ttl <= 0:
                raise ValueError(f"invalid instruction message: {md}")
            rank = self.rank_of(md.dst_node_id)
            mid = uuid.uuid4().hex
            md.__dict__["_message_id"] = mid
            header, bufs, layout = wire.encode_message(
                msg, wire.KIND_MSG, small=self._small, chunk=self._chunk
            )
            segs = wire.wire_segments(bufs, layout)
            self._sends.append(C.isend(self._comm, MPI, rank, header, segs))
            self.bytes_sent += len(header) + sum(layout.sizes)
            self._outstanding[mid] = _Outstanding(rank, md.dst_node_id, time.monotonic())
            ids.append(mid)
        self._progress()
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self._progress()
        out = []
        for mid in message_ids:
            reply = self._inbox.pop(mid, None)
            if reply is not None:
                out.append(reply)
        return out

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        ids = list(self.push_messages(messages))
        del messages
        end = None if timeout is None else time.monotonic() + timeout
        got: dict[str, Message] = {}
        self._poller.reset()
        while True:
            for mid in ids:
                if mid not in got and mid in self._inbox:
                    got[mid] = self._inbox.pop(mid)
            if len(got) == len(ids):
                break
            if end is not None and time.monotonic() >= end:
                missing = [self._outstanding[m] for m in ids if m not in got]
                log.warning(
                    "send_and_receive timed out after %.1f s; no reply from %s",
                    timeout,
                    ", ".join(f"rank {o.rank} (node {o.node_id})" for o in missing),
                )
                break
            state = self._progress()
            if not state:
                self._poller.wait()
            else:
                self._poller.reset()
                if state == "sending":  # the nodes do the copies: leave them the CPU
                    time.sleep(C.SENDER_NAP)
                else:
                    C._yield()
        return [got[m] for m in ids if m in got]

    # -- engine ----------------------------------------------------------------------

    def _progress(self) -> str | bool:
        """Advance sends, take in arrived replies, enforce reply_timeout.

        Returns "received" when a reply came in, "sending" when only sends are still
        in flight (the nodes are copying), False when nothing is moving.
        """
        MPI = self._MPI
        busy: str | bool = False
        if self._sends:
            self._sends = [p for p in self._sends if not p.done(MPI)]
            busy = "sending" if self._sends else False
        while (probe := C.probe_header(self._comm, MPI, MPI.ANY_SOURCE)) is not None:
            busy = "received"
            self._receive_one(*probe)
        self._check_timeouts()
        return busy

    def _receive_one(self, source: int, size: int) -> None:
        MPI = self._MPI
        try:
            hdr = C.recv_header(self._comm, MPI, source, size, max_total=self._max_bytes)
        except wire.WireError as exc:
            raise RankError(f"bad header from MPI rank {source}: {exc}") from None
        if hdr["k"] != wire.KIND_REPLY:
            log.warning("ignoring unexpected %r message from MPI rank %d", hdr["k"], source)
            if "layout" in hdr:
                C.recv_payload(self._comm, MPI, source, hdr, None)
            return
        wait = self._reply_timeout
        deadline = None if wait is None else time.monotonic() + wait
        try:
            bufs = C.recv_payload(self._comm, MPI, source, hdr, deadline)
            reply = wire.decode_message(hdr, bufs)
        except C.MpiTimeout:
            raise RankTimeout(source, node_id_of(source), "(reply data)", wait or 0.0) from None
        except wire.WireError as exc:
            raise RankError(f"bad reply from MPI rank {source}: {exc}") from None
        self.bytes_received += size + sum(hdr["layout"].sizes)
        mid = reply.metadata.reply_to_message_id
        out = self._outstanding.get(mid)
        if out is None:
            log.warning("dropping reply from MPI rank %d to unknown message %s", source, mid)
            return
        if out.rank != source or reply.metadata.src_node_id != out.node_id:
            raise RankError(
                f"MPI rank {source} replied to message {mid} that was sent to rank {out.rank}"
            )
        del self._outstanding[mid]
        self._inbox[mid] = reply

    def _check_timeouts(self) -> None:
        if self._reply_timeout is None:
            return
        now = time.monotonic()
        for mid, out in self._outstanding.items():
            if now - out.pushed_at > self._reply_timeout:
                raise RankTimeout(out.rank, out.node_id, mid, now - out.pushed_at)

    # -- shutdown --------------------------------------------------------------------

    def shutdown(self, timeout: float = 30.0) -> list[int]:
        """Tell every node to stop; return the ranks that did not acknowledge in time."""
        MPI = self._MPI
        header = wire.control_header(wire.KIND_STOP)
        ranks = sorted(self._rank_of_node.values())
        for r in ranks:
            self._sends.append(C.isend(self._comm, MPI, r, header, []))
        waiting = set(ranks)
        end = time.monotonic() + timeout
        self._poller.reset()
        while waiting and time.monotonic() < end:
            moved = False
            self._sends = [p for p in self._sends if not p.done(MPI)]
            while (probe := C.probe_header(self._comm, MPI, MPI.ANY_SOURCE)) is not None:
                moved = True
                source, size = probe
                hdr = C.recv_header(self._comm, MPI, source, size, max_total=None)
                if hdr["k"] == wire.KIND_BYE:
                    waiting.discard(source)
                elif "layout" in hdr:  # a late reply: drain and drop it
                    C.recv_payload(self._comm, MPI, source, hdr, time.monotonic() + timeout)
            if not moved:
                self._poller.wait()
        return sorted(waiting)
