"""The node side: ranks 1..N-1 each run the app's ClientApp as one Flower node.

The loop waits (without spinning a core) for a message from rank 0, runs the
ClientApp with this node's persistent ``Context`` and sends the reply back. An
exception in the ClientApp becomes an error reply, as in Flower; a ``stop`` from rank
0 ends the loop with a ``bye``.
"""

from __future__ import annotations

import logging
import traceback
import uuid
from collections.abc import Callable

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.common.constant import ErrorCode

from . import comm as C
from . import wire

log = logging.getLogger("flwr_transports.mpi")

SERVER_RANK = 0


def _error_reply(msg: Message, code: int, ex: BaseException) -> Message:
    reason = str(type(ex)) + ":<'" + str(ex) + "'>"  # Flower's own format
    return Message(Error(code=code, reason=reason), reply_to=msg)


def serve(
    comm,
    context: Context,
    load_app: Callable[[], Callable[[Message, Context], Message]],
    *,
    chunk: int = wire.DEFAULT_CHUNK,
    small: int = wire.DEFAULT_SMALL,
    max_message_bytes: int | None = None,
    poll_cap: float = 0.005,
) -> int:
    """Serve messages from rank 0 until told to stop. Returns the number handled."""
    MPI = C.import_mpi()
    rank = comm.Get_rank()
    app = None
    load_error: BaseException | None = None
    try:
        app = load_app()
    except Exception as ex:  # noqa: BLE001 - reported on every message, as Flower does
        load_error = ex
        log.error("rank %d: cannot load the ClientApp: %s", rank, ex)

    poller = C.Poller(poll_cap)
    handled = 0
    while True:
        probe = C.probe_header(comm, MPI, SERVER_RANK)
        if probe is None:
            poller.wait()
            continue
        poller.reset()
        hdr = C.recv_header(comm, MPI, SERVER_RANK, probe[1], max_total=max_message_bytes)
        if hdr["k"] == wire.KIND_STOP:
            C.send(comm, MPI, SERVER_RANK, wire.control_header(wire.KIND_BYE), [])
            return handled
        bufs = C.recv_payload(comm, MPI, SERVER_RANK, hdr, None)
        if hdr["k"] != wire.KIND_MSG:
            log.warning("rank %d: ignoring unexpected %r message", rank, hdr["k"])
            continue
        msg = wire.decode_message(hdr, bufs)
        del bufs
        reply = _handle(app, load_error, msg, context, rank)
        del msg
        reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        header, rbufs, layout = wire.encode_message(
            reply, wire.KIND_REPLY, small=small, chunk=chunk
        )
        C.send(comm, MPI, SERVER_RANK, header, wire.wire_segments(rbufs, layout))
        handled += 1


def _handle(app, load_error, msg: Message, context: Context, rank: int) -> Message:
    if app is None:
        return _error_reply(msg, ErrorCode.LOAD_CLIENT_APP_EXCEPTION, load_error)
    try:
        reply = app(msg, context)
        if not isinstance(reply, Message):
            raise TypeError(f"the ClientApp returned {type(reply).__name__}, not a Message")
        if reply.metadata.reply_to_message_id != msg.metadata.message_id:
            raise ValueError("the ClientApp's reply does not reply to the message it got")
        return reply
    except Exception as ex:  # noqa: BLE001 - an exception becomes an error reply
        log.error("rank %d: ClientApp raised an exception\n%s", rank, traceback.format_exc())
        return _error_reply(msg, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, ex)
