"""The MPI runtime's wire format (no MPI needed): round trips, packing, chunking, hostile headers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.app.error import Error

from flwr_transports.mpi import wire
from flwr_transports.mpi.comm import alloc_bytes


def _md(**kw) -> Metadata:
    base = {
        "run_id": 7,
        "message_id": "m1",
        "src_node_id": 1,
        "dst_node_id": 1001,
        "reply_to_message_id": "",
        "group_id": "3",
        "created_at": 1234.5,
        "ttl": 60.0,
        "message_type": "train",
        "src_task_id": 1,
        "dst_task_id": None,
    }
    base.update(kw)
    return Metadata(**base)


def _content() -> RecordDict:
    arrays = {
        "f32": Array(np.arange(10, dtype=np.float32) / 3),
        "f16": Array(np.arange(4, dtype=np.float16)),
        "i64": Array(np.arange(6, dtype=np.int64).reshape(2, 3)),
        "u8": Array(np.arange(200_000, dtype=np.uint8)),
        "bool": Array(np.array([True, False])),
        "c64": Array(np.array([1 + 2j], dtype=np.complex64)),
        "empty": Array(np.zeros((0, 3), dtype=np.float32)),
        "scalar": Array(np.array(2.5)),
        "raw": Array(dtype="bfloat16", shape=(2,), stype="raw", data=b"\x01\x02\x03\x04"),
        "zero-bytes": Array(dtype="x", shape=(0,), stype="raw", data=b""),
    }
    for i in range(50):
        arrays[f"tiny.{i}"] = Array(np.full(3, i, dtype=np.int32))
    return RecordDict(
        {
            "arrays": ArrayRecord(arrays),
            "metrics": MetricRecord(
                {"a": 1, "b": 2.5, "c": [1, 2], "d": [0.5], "nan": float("nan")}
            ),
            "config": ConfigRecord(
                {
                    "s": "t\u00e9xt",
                    "flag": False,
                    "blob": b"\x00\xff",
                    "big": bytes(range(256)) * 400,
                    "blobs": [b"", b"xy"],
                    "ints": [1, -2],
                    "empty": [],
                    "f": 1e300,
                }
            ),
        }
    )


def _transfer(header: bytes, bufs, layout, *, alloc=alloc_bytes) -> Message:
    """Simulate the MPI transfer: copy each sent segment into the next receive view."""
    hdr = wire.parse_header(header)
    segs = wire.wire_segments(bufs, layout)
    final, views = wire.receive_targets(hdr["layout"], alloc)
    assert len(segs) == len(views) == layout.n_messages()
    for s, v in zip(segs, views, strict=True):
        assert memoryview(s).nbytes == v.nbytes
        v[:] = memoryview(s).cast("B")
    return wire.decode_message(hdr, wire.finish_buffers(hdr["layout"], final))


def _assert_same(a: Message, b: Message) -> None:
    assert a.metadata == b.metadata
    assert a.has_error() == b.has_error()
    if a.has_error():
        assert (a.error.code, a.error.reason) == (b.error.code, b.error.reason)
        return
    assert list(a.content.keys()) == list(b.content.keys())
    for name, rec in a.content.items():
        other = b.content[name]
        assert type(rec) is type(other)
        if isinstance(rec, ArrayRecord):
            assert list(rec.keys()) == list(other.keys())
            for k, arr in rec.items():
                o = other[k]
                assert (arr.dtype, arr.shape, arr.stype) == (o.dtype, o.shape, o.stype)
                assert arr.data == o.data and type(o.data) is bytes
        else:
            got = dict(other)
            for k, v in rec.items():
                if isinstance(v, float) and math.isnan(v):
                    assert math.isnan(got[k])
                else:
                    assert got[k] == v and type(got[k]) is type(v), k


@pytest.mark.parametrize(
    ("small", "chunk"),
    [(wire.DEFAULT_SMALL, wire.DEFAULT_CHUNK), (1, 1000), (10**9, 333), (16, 7)],
)
def test_round_trip_all_record_types(small, chunk):
    msg = Message(metadata=_md(), content=_content())
    header, bufs, layout = wire.encode_message(msg, small=small, chunk=chunk)
    _assert_same(msg, _transfer(header, bufs, layout))


def test_array_bytes_are_sent_without_copy_and_header_is_small():
    msg = Message(metadata=_md(), content=_content())
    header, bufs, layout = wire.encode_message(msg)
    big = msg.content["arrays"]["u8"].data
    assert any(b is big for b in bufs)  # the Array's own bytes object, not a copy
    segs = wire.wire_segments(bufs, layout)
    assert any(isinstance(s, memoryview) and s.obj is big for s in segs)
    assert len(header) < 8000
    assert b"\\u0000" not in header and b"f32" in header  # plain JSON, no binary blobs


def test_error_message_round_trip():
    msg = Message(metadata=_md(reply_to_message_id="m0"), error=Error(code=2, reason="boom"))
    header, bufs, layout = wire.encode_message(msg, wire.KIND_REPLY)
    assert bufs == []
    _assert_same(msg, _transfer(header, bufs, layout))


def test_zero_copy_receive_gives_fresh_bytes():
    obj, view = alloc_bytes(1 << 20)
    view[:5] = b"hello"
    view[-1] = 7
    assert type(obj) is bytes and obj[:5] == b"hello" and obj[-1] == 7
    obj2, _ = alloc_bytes(1 << 20)
    assert obj2 is not obj
    small, sview = alloc_bytes(10)
    sview[:] = b"0123456789"
    assert bytes(small) == b"0123456789"


def test_receive_with_bytearray_fallback():
    msg = Message(metadata=_md(), content=_content())
    header, bufs, layout = wire.encode_message(msg, small=4, chunk=4096)

    def alloc(n):
        b = bytearray(n)
        return b, memoryview(b)

    _assert_same(msg, _transfer(header, bufs, layout, alloc=alloc))


def _hdr(**over) -> bytes:
    msg = Message(metadata=_md(), content=RecordDict({"a": ArrayRecord({"x": Array(np.ones(3))})}))
    h = json.loads(wire.encode_message(msg)[0])
    h.update(over)
    return json.dumps(h).encode()


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"\xff\xfe", "undecodable"),
        (b"[1,2]", "version"),
        (_hdr(v=99), "version"),
        (_hdr(k="evil"), "kind"),
        (_hdr(sz=[-1]), "non-negative"),
        (_hdr(sz=[1.5]), "non-negative"),
        (_hdr(sz="x"), "size list"),
        (_hdr(ch=0), "chunk"),
        (_hdr(ch=1 << 40), "chunk"),
        (_hdr(sm=0), "chunk"),
    ],
)
def test_hostile_headers_are_refused(raw, match):
    with pytest.raises(wire.WireError, match=match):
        wire.parse_header(raw)


def test_size_limit_is_enforced():
    with pytest.raises(wire.WireError, match="exceeds the limit"):
        wire.parse_header(_hdr(sz=[10**12]), max_total=10**9)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("md", [1, 2], "metadata"),
        ("r", [["a", "a", [["x", "float64", [3], "numpy.ndarray", 5]]]], "buffer index"),
        ("r", [["a", "a", [["x", "float64", "3", "numpy.ndarray", 0]]]], "shape"),
        ("r", [["a", "z", []]], "record type"),
        ("r", [["a", "c", [["k", {"b": 9}]]]], "buffer index"),
        ("r", [["a", "m", [["k", "not-a-number"]]]], "invalid record value"),
        ("e", [2, "x"], "exactly one"),
    ],
)
def test_hostile_records_are_refused(field, value, match):
    hdr = wire.parse_header(_hdr(**{field: value}))
    with pytest.raises(wire.WireError, match=match):
        wire.decode_message(hdr, [b"\x00" * 8])
