"""Property-based fuzzing of everything a peer can send (issue 15).

References, tickets, slot descriptors, payload headers, tcp wire messages and the
client policy get random and mutated inputs (hypothesis). Properties: nothing but
the rejection error comes out (``RejectedInput``, or for I/O paths the link's
``LinkError``), every example finishes in bounded time (hypothesis ``deadline``),
and the server never opens a path outside its link's root.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flwr_transports.codec import PayloadError, data_ranges, decode_bytes, encode
from flwr_transports.errors import RejectedInput
from flwr_transports.links import LinkError, server_link
from flwr_transports.refs import Reference, RefError, Ticket

FUZZ = settings(max_examples=150, deadline=2000, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=10), kids,
                                                              max_size=5),
    max_leaves=30)

_VALID_REF = Reference("file", {"path": "/x/ftx-1-1-aaaa-r1"}, 100, "sha256t:" + "a" * 64,
                       n_arrays=2, ticket="t" * 32, slot=0, key="arrays").to_json()
_VALID_TICKET = Ticket("t" * 32, "tcp", 1, 1, 5, "train", 1 << 20, 1024,
                       slots=[{"host": "127.0.0.1", "port": 9, "id": "p.x",
                               "token": "ab" * 32}]).to_record()["ticket"]


def _mutate(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    b = bytearray(data)
    for kind, pos, val in ops:
        if not b:
            break
        pos %= len(b)
        if kind == 0:
            b[pos] = val & 0xFF
        elif kind == 1:
            del b[pos:pos + (val % 8) + 1]
        elif kind == 2:
            b[pos:pos] = bytes([val & 0xFF]) * ((val % 4) + 1)
        else:
            b[pos:pos] = b"[" * (val % 5000) + b"{" * (val % 7)
    return bytes(b)


mutations = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2**31),
                               st.integers(0, 2**31)), max_size=8)


def _only_rejections(fn, *args, allowed=(RejectedInput,)):
    try:
        return fn(*args)
    except allowed:
        return None


# -------------------------------------------------------------------- references
@FUZZ
@given(st.one_of(st.binary(max_size=300), mutations.map(lambda m: _mutate(_VALID_REF, m)),
                 json_values.map(lambda v: json.dumps(v).encode())))
def test_reference_parser_only_rejects(raw):
    ref = _only_rejections(Reference.from_json, raw)
    if ref is not None:  # accepted: every field has the type and range it must have
        assert isinstance(ref.size, int) and 0 <= ref.size and isinstance(ref.loc, dict)


@FUZZ
@given(st.dictionaries(st.sampled_from(["v", "scheme", "loc", "size", "digest", "n_arrays",
                                        "ticket", "slot", "key"]), json_values, max_size=9))
def test_reference_fields_fuzzed(doc):
    _only_rejections(Reference.from_json, json.dumps(doc).encode())


# ----------------------------------------------------------------------- tickets
@FUZZ
@given(st.one_of(st.text(max_size=300),
                 mutations.map(lambda m: _mutate(_VALID_TICKET.encode(), m).decode(
                     "utf-8", "replace")),
                 json_values.map(json.dumps)))
def test_ticket_parser_only_rejects(raw):
    t = _only_rejections(Ticket.from_record, ConfigRecord({"ticket": raw}))
    if t is not None:
        assert isinstance(t.slots, list) and all(isinstance(s, dict) for s in t.slots)
        assert isinstance(t.node, int) and isinstance(t.max_size, int)


# ------------------------------------------------------------ slot descriptors
slot_dicts = st.dictionaries(
    st.sampled_from(["host", "port", "id", "token", "streams", "window", "timeout", "retries",
                     "tls", "chunk_size", "path", "name", "mode", "get", "put", "enc", "stored",
                     "range", "key", "conc", "checksum", "part"]),
    json_values | st.sampled_from(["127.0.0.1", "../../etc/passwd", "ftx-1-x", "/etc/passwd",
                                   "ab" * 32, "http://169.254.169.254/x"]),
    max_size=10)


@FUZZ
@given(slot_dicts)
def test_client_descriptor_validation_only_rejects(desc):
    """Everything a client validates in a location/slot before any I/O."""
    from flwr_transports.links.fs import FileClientLink, ShmClientLink
    from flwr_transports.links.s3_http import check_encryption, check_get_url, expand_urls
    from flwr_transports.links.tcp import endpoint_from
    from flwr_transports.policy import ClientPolicy

    _only_rejections(endpoint_from, desc)
    _only_rejections(FileClientLink()._resolve, desc)
    _only_rejections(ShmClientLink()._resolve, desc)
    _only_rejections(check_get_url, desc.get("get"))
    _only_rejections(expand_urls, desc.get("put"))
    _only_rejections(check_encryption, desc.get("enc"))
    p = ClientPolicy.build(hosts=["127.0.0.1"], environ={})
    for scheme in ("tcp", "s3", "file", "shm", "rdma"):
        _only_rejections(lambda s, d: p.check_location(s, d, upload=False), scheme, desc)
        _only_rejections(lambda s, d: p.check_location(s, d, upload=True), scheme, desc)


@pytest.fixture(scope="module")
def file_link(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzzroot")
    (root.parent / "outside-secret").write_bytes(b"s" * 100)
    link = server_link(f"file://{root}?eager=false", 1, {})
    slot = link.issue_slot("r1-train-n5-s0", 1 << 20)
    yield link, slot, str(root)
    link.close()


@FUZZ
@given(loc=slot_dicts | st.builds(lambda p: {"path": p}, st.sampled_from(
    ["/", "..", "/etc/passwd", "{root}/../outside-secret", "{root}/./x", "{root}//x",
     "{root}/ftx-1-1", "{root}/../fuzzroot/x", "{slot}/..", "{slot}\x00"])), size=st.integers(
    0, 2**41))
def test_server_never_opens_outside_its_root(file_link, monkeypatch, loc, size):
    from flwr_transports.links import fs

    link, slot, root = file_link
    if isinstance(loc.get("path"), str):
        loc = {"path": loc["path"].replace("{root}", root).replace("{slot}", slot["path"])}
    opened = []

    def spy(path, size, **kw):
        opened.append(path)
        raise LinkError("spy")

    monkeypatch.setattr(fs, "open_payload", spy)
    _only_rejections(link.open_upload, slot, loc, size, allowed=(RejectedInput, LinkError))
    assert opened in ([], [slot["path"]]), opened


# --------------------------------------------------------------- payload headers
_PAYLOAD = encode(ArrayRecord([np.arange(64, dtype=np.float32), np.zeros((2, 3))])).to_bytes()


def _with_header(h: bytes) -> bytes:
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"\x00" * 64


@FUZZ
@given(st.one_of(mutations.map(lambda m: _mutate(_PAYLOAD, m)), st.binary(max_size=400),
                 json_values.map(lambda v: _with_header(json.dumps(v).encode())),
                 json_values.map(lambda v: _with_header(json.dumps(
                     {"__metadata__": {"format": "flwr-transports/1",
                                       "flwr_transports": json.dumps(v)}}).encode()))))
def test_payload_decoder_only_rejects(raw):
    _only_rejections(decode_bytes, raw, None)
    got = data_ranges(raw, len(raw))  # the tcp client's header sniffing never raises
    if got is not None:
        base, ranges = got
        assert all(base <= a <= b <= len(raw) for a, b in ranges)


def test_deep_and_huge_headers_are_cheap_rejections():
    for h in (b"[" * 1_000_000, b'{"a":' * 200_000, b'{"__metadata__":' + b"[" * 50_000):
        t0 = time.perf_counter()
        with pytest.raises(PayloadError):
            decode_bytes(_with_header(h), None)
        assert time.perf_counter() - t0 < 2.0


# --------------------------------------------------------------- tcp wire messages
@pytest.fixture(scope="module")
def tcp_server():
    link = server_link("tcp://127.0.0.1:0", 1, {})
    payload = encode(ArrayRecord([np.arange(10_000, dtype=np.float32)]))
    loc = link.publish("g", payload)
    errors = []
    old = threading.excepthook
    threading.excepthook = lambda args: errors.append(args)
    yield link, loc, payload, errors
    threading.excepthook = old
    link.close()


def _valid_request(loc) -> bytes:
    from flwr_transports.links.chunks import OP_GET, REQ

    oid = loc["id"].encode()
    return REQ.pack(b"FTXQ", OP_GET, 0, len(oid), bytes.fromhex(loc["token"]), 0, 0, 0) + oid


@settings(max_examples=60, deadline=5000, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=200), mutations.map(lambda m: ("VALID", m))))
def test_tcp_server_survives_any_bytes(tcp_server, data):
    link, loc, _payload, errors = tcp_server
    if isinstance(data, tuple):
        data = _mutate(_valid_request(loc), data[1])
    s = socket.create_connection(("127.0.0.1", link.port), timeout=5)
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(5)
        while s.recv(1 << 20):  # the server answers and/or closes, within its deadlines
            pass
    except OSError:
        pass
    finally:
        s.close()
    assert not errors, [str(e.exc_value) for e in errors]


def test_tcp_server_still_serves_after_the_fuzzing(tcp_server):
    from flwr_transports.codec import decode
    from flwr_transports.links import client_link

    _link, loc, payload, errors = tcp_server
    with client_link("tcp").open(loc, payload.size) as src:
        decode(src.read, payload.size, payload.digest)
    assert not errors


@FUZZ
@given(st.binary(max_size=300), st.integers(0, 2**40))
def test_tcp_client_table_parser_only_rejects(body, size):
    from flwr_transports.links.chunks import ProtocolError, unpack_table

    _only_rejections(unpack_table, body, size, allowed=(ProtocolError, LinkError, RefError))


def test_fuzz_left_nothing_in_shm():
    assert not [e for e in os.listdir("/dev/shm") if e.startswith(f"ftx-{os.getpid()}-")]
