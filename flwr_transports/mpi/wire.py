"""Flower ``Message`` <-> (compact header, list of raw buffers), with no pickle.

This module knows nothing about MPI; :mod:`flwr_transports.mpi.comm` moves what it
produces. A message becomes

* a small JSON header: the message metadata, the error (if any), the record layout
  (record names and types, array names / dtypes / shapes / stypes, metric and config
  values) and the sizes of the raw buffers that follow;
* a list of raw buffers: each ``Array.data`` (the exact bytes Flower holds, never
  re-encoded) and each ``bytes`` value found in a ConfigRecord.

On the wire the buffers smaller than ``small`` bytes are packed back to back into one
buffer (fewer MPI messages for models made of many tiny arrays); larger ones travel
on their own, cut into chunks of at most ``chunk`` bytes (so counts stay below 2**31
and payloads above 2 GiB work with any MPI). Header and receiver agree on the layout
through ``small`` and ``chunk`` values carried in the header itself.

Everything read from a header is validated (types, sizes, counts) before use.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.app.error import Error

WIRE_VERSION = 1
KIND_MSG = "msg"  # server -> node: an instruction message
KIND_REPLY = "reply"  # node -> server: the reply to an instruction
KIND_STOP = "stop"  # server -> node: leave the loop
KIND_BYE = "bye"  # node -> server: acknowledges stop
KINDS = (KIND_MSG, KIND_REPLY, KIND_STOP, KIND_BYE)

DEFAULT_CHUNK = 1 << 30  # 1 GiB per MPI message: far below the 2 GiB int-count limit
DEFAULT_SMALL = 64 * 1024  # buffers below this are packed together
MAX_HEADER_BYTES = 256 * 1024 * 1024  # a header above this is refused
MAX_CHUNK = (1 << 31) - 1
_MAX_BUFFERS = 50_000_000


class WireError(ValueError):
    """A header or payload that is malformed or inconsistent."""


Buffer = bytes | bytearray | memoryview


@dataclass
class Layout:
    """How a message's buffers travel: sizes, packing and chunking."""

    sizes: list[int]
    small: int
    chunk: int

    def packed(self) -> list[int]:
        """Indices of the buffers that travel packed together."""
        return [i for i, n in enumerate(self.sizes) if n < self.small]

    def loose(self) -> list[int]:
        """Indices of the buffers that travel on their own."""
        return [i for i, n in enumerate(self.sizes) if n >= self.small]

    def packed_size(self) -> int:
        return sum(self.sizes[i] for i in self.packed())

    def n_messages(self) -> int:
        """Number of data messages (chunks) following the header."""
        n = math.ceil(self.packed_size() / self.chunk)
        for i in self.loose():
            n += math.ceil(self.sizes[i] / self.chunk)
        return n


# ---------------------------------------------------------------------------------------
# encode


def _meta_list(md: Metadata) -> list[Any]:
    return [
        md.run_id,
        md.message_id,
        md.src_node_id,
        md.dst_node_id,
        md.reply_to_message_id,
        md.group_id,
        md.created_at,
        md.ttl,
        md.message_type,
        md.src_task_id,
        md.dst_task_id,
    ]


def _buffer_of(obj: Any, what: str) -> Buffer:
    if isinstance(obj, bytes | bytearray):
        return obj
    if isinstance(obj, memoryview):
        return obj if obj.contiguous and obj.itemsize == 1 else memoryview(obj.tobytes())
    raise WireError(f"{what} must be bytes, got {type(obj).__name__}")


def _config_value(v: Any, bufs: list[Buffer]) -> Any:
    """ConfigRecord value -> JSON; ``bytes`` become ``{"b": index}``."""
    if isinstance(v, bytes):
        bufs.append(v)
        return {"b": len(bufs) - 1}
    if isinstance(v, list):
        return [_config_value(x, bufs) for x in v]
    if isinstance(v, bool | int | float | str):
        return v
    raise WireError(f"unsupported ConfigRecord value type {type(v).__name__}")


def encode_message(
    msg: Message, kind: str = KIND_MSG, *, small: int = DEFAULT_SMALL, chunk: int = DEFAULT_CHUNK
) -> tuple[bytes, list[Buffer], Layout]:
    """Split ``msg`` into a JSON header and raw buffers (the arrays' own bytes)."""
    if kind not in (KIND_MSG, KIND_REPLY):
        raise ValueError(f"bad kind {kind!r}")
    bufs: list[Buffer] = []
    records: list[Any] | None = None
    error: list[Any] | None = None
    if msg.has_error():
        error = [int(msg.error.code), msg.error.reason]
    if msg.has_content():
        records = []
        for name, rec in msg.content.items():
            if isinstance(rec, ArrayRecord):
                items = []
                for key, arr in rec.items():
                    bufs.append(_buffer_of(arr.data, f"Array {key!r} data"))
                    items.append([key, arr.dtype, list(arr.shape), arr.stype, len(bufs) - 1])
                records.append([name, "a", items])
            elif isinstance(rec, MetricRecord):
                records.append([name, "m", [[k, v] for k, v in rec.items()]])
            elif isinstance(rec, ConfigRecord):
                records.append([name, "c", [[k, _config_value(v, bufs)] for k, v in rec.items()]])
            else:
                raise WireError(f"record {name!r} has unsupported type {type(rec).__name__}")
    layout = Layout([memoryview(b).nbytes for b in bufs], max(1, small), chunk)
    header = {
        "v": WIRE_VERSION,
        "k": kind,
        "md": _meta_list(msg.metadata),
        "e": error,
        "r": records,
        "sz": layout.sizes,
        "sm": layout.small,
        "ch": layout.chunk,
    }
    return _dumps(header), bufs, layout


def control_header(kind: str, **extra: Any) -> bytes:
    """A header with no message: ``stop`` / ``bye``."""
    if kind not in (KIND_STOP, KIND_BYE):
        raise ValueError(f"bad control kind {kind!r}")
    return _dumps({"v": WIRE_VERSION, "k": kind, **extra})


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=True).encode()


def wire_segments(bufs: list[Buffer], layout: Layout) -> list[Buffer]:
    """The data messages to send after the header, in order (packed first, then chunks)."""
    out: list[Buffer] = []
    packed = layout.packed()
    if layout.packed_size():
        pack = bytearray(layout.packed_size())
        off = 0
        for i in packed:
            n = layout.sizes[i]
            pack[off : off + n] = bufs[i]
            off += n
        out.extend(_chunks(memoryview(pack), layout.chunk))
    for i in layout.loose():
        out.extend(_chunks(memoryview(bufs[i]).cast("B"), layout.chunk))
    return out


def _chunks(view: memoryview, chunk: int) -> list[memoryview]:
    return [view[o : o + chunk] for o in range(0, view.nbytes, chunk)]


# ---------------------------------------------------------------------------------------
# decode


def parse_header(raw: Buffer, *, max_total: int | None = None) -> dict[str, Any]:
    """Parse and validate a header; returns the dict with a ``Layout`` under ``"layout"``."""
    if len(raw) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        hdr = json.loads(bytes(raw))
    except ValueError as exc:
        raise WireError(f"undecodable header: {exc}") from None
    if not isinstance(hdr, dict) or hdr.get("v") != WIRE_VERSION:
        raise WireError(
            f"unsupported header version {hdr.get('v') if isinstance(hdr, dict) else None!r}"
        )
    kind = hdr.get("k")
    if kind not in KINDS:
        raise WireError(f"unknown message kind {kind!r}")
    if kind in (KIND_STOP, KIND_BYE):
        return hdr
    sizes, small, chunk = hdr.get("sz"), hdr.get("sm"), hdr.get("ch")
    if not (isinstance(sizes, list) and len(sizes) <= _MAX_BUFFERS):
        raise WireError("bad buffer size list")
    if not all(type(n) is int and n >= 0 for n in sizes):
        raise WireError("buffer sizes must be non-negative integers")
    if not (type(small) is int and small >= 1 and type(chunk) is int and 1 <= chunk <= MAX_CHUNK):
        raise WireError("bad packing/chunk parameters")
    total = sum(sizes)
    if max_total is not None and total > max_total:
        raise WireError(f"message of {total} bytes exceeds the limit of {max_total}")
    hdr["layout"] = Layout(sizes, small, chunk)
    return hdr


def receive_targets(layout: Layout, alloc) -> tuple[list[Buffer], list[memoryview]]:
    """Allocate where the data lands.

    Returns (``final``: one object per buffer index, the wire ``views`` to receive into,
    in wire order). ``alloc(n)`` returns ``(obj, writable_view)``. Packed buffers are
    sliced out of the pack after reception (:func:`finish_buffers`).
    """
    views: list[memoryview] = []
    final: list[Any] = [None] * len(layout.sizes)
    psize = layout.packed_size()
    if psize:
        pack = bytearray(psize)
        views.extend(_chunks(memoryview(pack), layout.chunk))
        final.append(pack)  # kept at the end: the pack itself
    for i in layout.loose():
        obj, view = alloc(layout.sizes[i])
        final[i] = obj
        views.extend(_chunks(view, layout.chunk))
    return final, views


def finish_buffers(layout: Layout, final: list[Any]) -> list[bytes]:
    """Turn received targets into one ``bytes`` per buffer index."""
    n = len(layout.sizes)
    out: list[Any] = final[:n]
    if layout.packed_size():
        pack = memoryview(final[n])
        off = 0
        for i in layout.packed():
            size = layout.sizes[i]
            out[i] = bytes(pack[off : off + size])
            off += size
    for i in layout.packed():  # zero-size buffers with nothing packed
        if out[i] is None:
            out[i] = b""
    return [b if isinstance(b, bytes) else bytes(b) for b in out]


def _s(v: Any, what: str) -> str:
    if not isinstance(v, str):
        raise WireError(f"{what} must be a string")
    return v


def _buf(bufs: list[bytes], idx: Any) -> bytes:
    if type(idx) is not int or not 0 <= idx < len(bufs):
        raise WireError(f"bad buffer index {idx!r}")
    return bufs[idx]


def _config_decode(v: Any, bufs: list[bytes]) -> Any:
    if isinstance(v, dict):
        return _buf(bufs, v.get("b"))
    if isinstance(v, list):
        return [_config_decode(x, bufs) for x in v]
    return v


def _metadata(md: Any) -> Metadata:
    if not (isinstance(md, list) and len(md) == 11):
        raise WireError("bad message metadata")
    run_id, mid, src, dst, reply_to, group, created, ttl, mtype, stask, dtask = md
    for v, what in ((run_id, "run_id"), (src, "src_node_id"), (dst, "dst_node_id")):
        if type(v) is not int:
            raise WireError(f"{what} must be an integer")
    for v, what in ((stask, "src_task_id"), (dtask, "dst_task_id")):
        if v is not None and type(v) is not int:
            raise WireError(f"{what} must be an integer or null")
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in (created, ttl)):
        raise WireError("created_at/ttl must be numbers")
    return Metadata(
        run_id=run_id,
        message_id=_s(mid, "message_id"),
        src_node_id=src,
        dst_node_id=dst,
        reply_to_message_id=_s(reply_to, "reply_to_message_id"),
        group_id=_s(group, "group_id"),
        created_at=float(created),
        ttl=float(ttl),
        message_type=_s(mtype, "message_type"),
        src_task_id=stask,
        dst_task_id=dtask,
    )


def decode_message(hdr: dict[str, Any], bufs: list[bytes]) -> Message:
    """Rebuild the Message from a parsed header and its buffers (one per index)."""
    md = _metadata(hdr.get("md"))
    err, recs = hdr.get("e"), hdr.get("r")
    if (err is None) == (recs is None):
        raise WireError("a message carries exactly one of content or error")
    if err is not None:
        if not (isinstance(err, list) and len(err) == 2 and type(err[0]) is int):
            raise WireError("bad error field")
        return Message(metadata=md, error=Error(code=err[0], reason=_s(err[1], "reason")))
    if not isinstance(recs, list):
        raise WireError("bad record list")
    content = RecordDict()
    try:
        for entry in recs:
            if not (isinstance(entry, list) and len(entry) == 3):
                raise WireError("bad record entry")
            name, typ, items = entry
            name = _s(name, "record name")
            if not isinstance(items, list):
                raise WireError(f"bad items in record {name!r}")
            if typ == "a":
                ar = ArrayRecord()
                for it in items:
                    if not (isinstance(it, list) and len(it) == 5):
                        raise WireError(f"bad array entry in record {name!r}")
                    key, dtype, shape, stype, idx = it
                    if not (isinstance(shape, list) and all(type(s) is int for s in shape)):
                        raise WireError(f"bad shape for array {key!r}")
                    ar[_s(key, "array name")] = Array(
                        dtype=_s(dtype, "dtype"),
                        shape=tuple(shape),
                        stype=_s(stype, "stype"),
                        data=_buf(bufs, idx),
                    )
                content[name] = ar
            elif typ == "m":
                content[name] = MetricRecord({_s(k, "metric name"): v for k, v in _pairs(items)})
            elif typ == "c":
                content[name] = ConfigRecord(
                    {_s(k, "config name"): _config_decode(v, bufs) for k, v in _pairs(items)}
                )
            else:
                raise WireError(f"unknown record type {typ!r}")
    except TypeError as exc:  # Flower's own record type checks
        raise WireError(f"invalid record value: {exc}") from None
    return Message(metadata=md, content=content)


def _pairs(items: list[Any]):
    for it in items:
        if not (isinstance(it, list) and len(it) == 2):
            raise WireError("bad key/value entry")
        yield it[0], it[1]
