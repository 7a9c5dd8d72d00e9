"""tcp:// link: protocol, access control, faults, concurrency, TLS, offload round trip."""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
import threading
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from test_tcp_helpers import FaultProxy, make_payload, self_signed_cert

from flwr_transports import codec, offload, payload_mod
from flwr_transports.codec import decode, encode
from flwr_transports.links import LinkError, server_link
from flwr_transports.links import chunks as ch
from flwr_transports.links.tcp import TcpClientLink, TcpServerLink
from flwr_transports.refs import RefError

KiB, MiB = 1024, 1024 * 1024


@pytest.fixture
def server():
    links = []

    def make(**opts):
        opts.setdefault("chunk_size", "64KiB")
        opts.setdefault("timeout", 10)  # a hang fails fast instead of waiting 60 s
        link = TcpServerLink("tcp://127.0.0.1:0", 7, opts)
        links.append(link)
        return link

    yield make
    for link in links:
        link.close()


def fetch(loc, payload, client=None):
    client = client or TcpClientLink()
    with client.open(loc, payload.size) as src:
        return decode(src.read, payload.size, payload.digest), client.last_stats


def same(a: ArrayRecord, b: ArrayRecord) -> bool:
    return list(a) == list(b) and all(a[k].data == b[k].data for k in a)


# -- scheduler (the state machine shared by both wires) ---------------------------------
def test_scheduler_requeue_corrupt_and_giveup():
    s = ch.ChunkScheduler(3, workers=1, max_chunk_retries=2)
    assert [s.take(), s.take()] == [0, 1]
    s.done(0)
    s.requeue(1)  # connection lost: back to the front
    assert s.take() == 1
    s.corrupted(1, "test")
    assert s.take() == 1 and s.stats["crc_errors"] == 1
    s.done(1)
    assert s.take() == 2
    s.corrupted(2, "x")
    s.take()
    s.corrupted(2, "x")
    s.take()
    s.corrupted(2, "x")  # third failure > max_chunk_retries=2
    with pytest.raises(LinkError, match="chunk 2 failed"):
        s.wait_chunks(2, 2, 1)
    assert s.take() is None


def test_scheduler_fails_when_every_worker_gives_up():
    s = ch.ChunkScheduler(4, workers=2)
    s.worker_exit(OSError("a"))
    assert s.error is None  # one worker left
    s.worker_exit(OSError("b"))
    with pytest.raises(LinkError, match="every connection gave up"):
        s.wait_all(1)


def test_scheduler_wait_blocks_until_done():
    s = ch.ChunkScheduler(2, workers=1)
    threading.Timer(0.1, lambda: (s.done(s.take()), s.done(s.take()))).start()
    s.wait_chunks(0, 1, 5)
    assert s.finished


def test_segment_view_ranges_cross_segments():
    sv = ch.SegmentView([b"abc", b"", memoryview(b"defgh"), b"ij"])
    assert sv.size == 10
    assert b"".join(sv.range(2, 5)) == b"cdefg"
    assert b"".join(sv.range(0, 10)) == b"abcdefghij"
    assert b"".join(sv.range(8, 2)) == b"ij"


# -- basic transfers ---------------------------------------------------------------------
def test_download_upload_roundtrip_multi_chunk(server):
    link = server(streams=3, window=2)
    rec, p = make_payload(700 * KiB)
    loc = link.publish("r1-train-0", p)
    assert loc["port"] == link.server.port > 0 and loc["host"] == "127.0.0.1"
    out, stats = fetch(loc, p)
    assert same(out, rec) and stats["chunks"] == -(-p.size // (64 * KiB))
    slot = link.issue_slot("r1-train-n101-s0-aa", 4 * MiB)
    client = TcpClientLink()
    back = client.upload(slot, p)
    assert back == {"host": "127.0.0.1", "port": loc["port"], "id": slot["id"]}
    with link.open_upload(slot, back, p.size) as src:
        assert same(decode(src.read, p.size, p.digest), rec)
    link.discard_slot(slot)
    link.discard_slot(slot)  # idempotent


def test_small_payload_and_read_bounds(server):
    link = server()
    _rec, p = make_payload(8)
    loc = link.publish("tiny", p)
    with TcpClientLink().open(loc, p.size) as src:
        assert src.read(0, 8) == p.to_bytes()[:8]
        with pytest.raises(ValueError):
            src.read(p.size - 1, 2)


def test_url_and_options():
    with pytest.raises(ValueError, match="HOST:PORT"):
        server_link("tcp://127.0.0.1", 1)
    with pytest.raises(ValueError, match="clients dial"):
        server_link("tcp://0.0.0.0:0", 1)
    with pytest.raises(ValueError, match="unknown option"):
        server_link("tcp://127.0.0.1:0?colour=red", 1)
    with pytest.raises(ValueError, match="chunk_size"):
        server_link("tcp://127.0.0.1:0?chunk_size=1KiB", 1)
    # HOST advertised, bind elsewhere: clients get the URL's host
    link = server_link("tcp://localhost:0?bind=127.0.0.1&streams=2", 1)
    try:
        _, p = make_payload(100 * KiB)
        loc = link.publish("x", p)
        assert loc["host"] == "localhost" and loc["streams"] == 2
        assert fetch(loc, p)[0] is not None
    finally:
        link.close()


def test_listen_failure_is_clear():
    busy = socket.create_server(("127.0.0.1", 0))
    try:
        port = busy.getsockname()[1]
        with pytest.raises(LinkError, match="cannot listen"):
            TcpServerLink(f"tcp://127.0.0.1:{port}", 1, {})
    finally:
        busy.close()


def test_descriptor_validation():
    c = TcpClientLink()
    good = {"host": "127.0.0.1", "port": 1, "id": "g.x", "token": "0" * 64}
    for bad in ({**good, "host": "a b"}, {**good, "port": 70000}, {**good, "port": True},
                {**good, "id": "../etc"}, {**good, "token": "zz"}, {**good, "streams": 1000},
                {**good, "tls": {"cert": "x", "fp": "nothex"}}, "notadict"):
        with pytest.raises(RefError):
            c.open(bad, 10)


# -- access control ----------------------------------------------------------------------
def test_invalid_token_refused_and_logged(server, caplog):
    link = server()
    _, p = make_payload(200 * KiB)
    loc = link.publish("r1-train-0", p)
    loc2 = link.publish("r1-train-1", p)
    caplog.set_level(logging.WARNING, logger="flwr_transports.links")
    bad = {**loc, "token": "ab" * 32}
    with pytest.raises(LinkError, match="refused.*invalid token"):
        TcpClientLink().open(bad, p.size)
    # a valid token for ANOTHER object does not open this one
    with pytest.raises(LinkError, match="refused"):
        TcpClientLink().open({**loc, "id": loc2["id"]}, p.size)
    # a download token cannot upload, even to a slot with the same name
    slot = link.issue_slot("r1-train-n101-s0-aa", 4 * MiB)
    with pytest.raises(LinkError, match="refused"):
        TcpClientLink().upload({**slot, "token": loc["token"]}, p)
    assert link.server.stats["refused"] >= 3
    assert "invalid token" in caplog.text
    # garbage on the socket: refused, the server keeps serving
    with socket.create_connection(("127.0.0.1", loc["port"])) as s:
        s.sendall(b"GET / HTTP/1.1\r\n" + b"x" * 100)
        s.settimeout(5)
        data = s.recv(1000)
        assert data[:4] == ch.MAGIC_RSP and data[4] == ch.BAD_REQUEST
    assert fetch(loc, p)[0] is not None


def test_released_payload_and_discarded_slot(server):
    link = server()
    _, p = make_payload(100 * KiB)
    loc = link.publish("r1", p)
    link.release("r1")
    with pytest.raises(LinkError, match="expired"):
        TcpClientLink().open(loc, p.size)
    slot = link.issue_slot("s", 4 * MiB)
    link.discard_slot(slot)
    with pytest.raises(LinkError, match="expired"):
        TcpClientLink().upload(slot, p)


def test_upload_is_decoded_on_arrival_and_checked_against_the_claimed_digest(server):
    """A complete upload is decoded in the background right away (before the reply
    even reaches the server); opening it hands over that record, whose digest is
    then checked against what the reference claims."""
    link = server()
    rec, p = make_payload(900 * KiB, seed=3)
    slot = link.issue_slot("s-eager", 4 * MiB)
    loc = TcpClientLink().upload(slot, p)
    pre = link.server.slots[slot["id"]].pre
    assert pre is not None
    arrays, got = pre.result(10)  # done without anyone asking for it
    assert got == p.digest and same(arrays, rec)
    with link.open_upload(slot, loc, p.size) as src:
        arrays2, got2 = src.predecoded()
        assert arrays2 is arrays and got2 == p.digest
        codec.check_digest(got2, p.digest)
        with pytest.raises(codec.PayloadError, match="digest mismatch"):
            codec.check_digest(got2, "sha256t:" + "0" * 64)
    link.discard_slot(slot)
    assert slot["id"] not in link.server.slots


def test_malformed_upload_fails_its_eager_decode_with_a_payload_error(server):
    link = server()
    slot = link.issue_slot("s-bad", 4 * MiB)
    junk = b"\xff" * (200 * KiB)  # not a payload: absurd header length
    bad = codec.EncodedPayload(segments=[junk], size=len(junk), digest="sha256t:" + "0" * 64)
    loc = TcpClientLink().upload(slot, bad)
    with link.open_upload(slot, loc, len(junk)) as src:
        with pytest.raises(codec.PayloadError, match="header length"):
            src.predecoded()
    link.discard_slot(slot)


def test_upload_cap_and_reference_checks(server):
    link = server()
    _, p = make_payload(300 * KiB)
    small = link.issue_slot("small", 100 * KiB)
    with pytest.raises(LinkError, match="exceeds the cap"):
        TcpClientLink().upload(small, p)
    slot = link.issue_slot("s0", 4 * MiB)
    other = link.issue_slot("s1", 4 * MiB)
    with pytest.raises(LinkError, match="did not finish"):
        link.open_upload(slot, {k: slot[k] for k in ("host", "port", "id")}, p.size)
    loc = TcpClientLink().upload(slot, p)
    with pytest.raises(RefError):
        link.open_upload(other, loc, p.size)  # claims another slot
    with pytest.raises(RefError):
        link.open_upload(slot, {**loc, "host": "evil.example"}, p.size)
    with pytest.raises(RefError):
        link.open_upload(slot, loc, p.size + 1)  # size mismatch


# -- faults ------------------------------------------------------------------------------
def _damage_once(chunk: int, offset: int, mask: int, hits: list):
    """Server fault hook: flip bits at ``offset`` of ``chunk`` the first time it is sent."""
    def fault(op, oid, i, views):
        if i == chunk and not hits:
            hits.append(i)
            data = bytearray(b"".join(views))
            data[offset] ^= mask
            return [memoryview(data)]
        return views
    return fault


def test_corrupted_chunk_is_refetched_alone(server):
    link = server(streams=2)
    rec, p = make_payload(600 * KiB)
    loc = link.publish("r1", p)
    hits = []
    link.server.fault = _damage_once(3, 100, 0x55, hits)
    out, stats = fetch(loc, p)
    assert hits == [3] and same(out, rec)
    assert stats["crc_errors"] == 1
    n = -(-p.size // (64 * KiB))
    assert link.server.stats["chunks_sent"] == n + 1  # only chunk 3 was sent twice


def test_corrupted_first_chunk_falls_back_to_a_plain_buffer(server):
    """Chunk 0 (fetched with the table, and whose header places the arrays) arrives
    with its JSON header damaged: the header does not parse, so chunks land in a plain
    buffer; chunk 0 fails its CRC, is fetched again, and the payload still decodes."""
    link = server(streams=2)
    rec, p = make_payload(300 * KiB)
    loc = link.publish("r1", p)
    hits = []
    link.server.fault = _damage_once(0, 20, 0x01, hits)  # byte 20: inside the JSON header
    ep = ch.Endpoint("127.0.0.1", loc["port"], timeout=10)
    stats: dict = {}
    with ch.download(lambda: ch.ClientConn(ep), loc["id"], bytes.fromhex(loc["token"]),
                     p.size, stats=stats) as src:
        assert same(decode(src.read, p.size, p.digest), rec)
        assert not src.placement().scatter  # decided once chunk 0's header came in
    assert hits == [0] and stats["zero_copy"] == 0
    assert stats["chunks"] == -(-p.size // (64 * KiB))


def test_corruption_in_flight_through_proxy_upload(server):
    link = server(streams=1, window=2)
    rec, p = make_payload(500 * KiB)
    slot = link.issue_slot("s0", 4 * MiB)
    # flip one byte deep inside the first chunk's body on the client->server stream
    proxy = FaultProxy(link.server.port, flip_at=("up", 5000))
    try:
        pslot = {**slot, "port": proxy.port}
        client = TcpClientLink()
        loc = client.upload(pslot, p)
        assert proxy.flipped == 1 and client.last_stats["crc_errors"] == 1
        with link.open_upload(pslot, loc, p.size) as src:
            assert same(decode(src.read, p.size, p.digest), rec)
        assert link.server.stats["crc_errors"] == 1
    finally:
        proxy.close()


def test_killed_connection_resumes_download(server):
    link = server(streams=1, window=4)
    rec, p = make_payload(2 * MiB)
    loc = link.publish("r1", p)
    proxy = FaultProxy(link.server.port, kill_after=("down", 900 * KiB))
    try:
        out, stats = fetch({**loc, "port": proxy.port}, p)
        assert proxy.killed == 1 and proxy.conns >= 2  # killed conn, then the resumed one
        assert same(out, rec)
        n = -(-p.size // (64 * KiB))
        assert stats["reconnects"] >= 1
        assert stats["chunks"] == n  # every chunk completed exactly once
        assert 1 <= stats["requeued"] <= 4  # at most the window was fetched again
    finally:
        proxy.close()


def test_killed_upload_resumes_from_server_bitmap(server):
    link = server(streams=1, window=2, retries=0)
    rec, p = make_payload(2 * MiB)
    n = -(-p.size // (64 * KiB))
    slot = link.issue_slot("s0", 8 * MiB)
    proxy = FaultProxy(link.server.port, kill_after=("up", 1 * MiB))
    try:
        pslot = {**slot, "port": proxy.port, "retries": 0}
        with pytest.raises(LinkError):
            TcpClientLink().upload(pslot, p)  # no retries allowed: fails mid-way
        deadline = time.monotonic() + 10  # let the server finish what it was receiving
        while link.server.active and time.monotonic() < deadline:
            time.sleep(0.05)
        stored = link.server.slots[slot["id"]].have.count(1)
        assert 0 < stored < n
        client = TcpClientLink()  # a new attempt asks what the server has, sends the rest
        loc = client.upload(slot, p)
        assert client.last_stats["chunks"] == n - stored
        with link.open_upload(slot, loc, p.size) as src:
            assert same(decode(src.read, p.size, p.digest), rec)
    finally:
        proxy.close()


def test_stalled_client_does_not_block_others(server):
    link = server(timeout=1.0)
    rec, p = make_payload(1 * MiB)
    loc = link.publish("r1", p)
    token = bytes.fromhex(loc["token"])
    # 1: sends half a header and stalls; 2: asks for chunks and never reads them
    s1 = socket.create_connection(("127.0.0.1", loc["port"]))
    s1.sendall(ch.MAGIC_REQ + b"\x02")
    s2 = socket.create_connection(("127.0.0.1", loc["port"]))
    s2.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    oid = loc["id"].encode()
    for i in range(16):
        s2.sendall(ch.REQ.pack(ch.MAGIC_REQ, ch.OP_GET, 0, len(oid), token, i, 0, 0) + oid)
    try:
        t0 = time.monotonic()
        results = []
        threads = [threading.Thread(target=lambda: results.append(fetch(loc, p)[0]))
                   for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(results) == 4 and all(same(r, rec) for r in results)
        assert time.monotonic() - t0 < 20
        # the server times the stalled connections out (timeout=1s) and closes them
        s1.settimeout(10)
        assert s1.recv(100) == b""
        deadline = time.monotonic() + 10
        while len(link.server.active) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not link.server.active
    finally:
        s1.close()
        s2.close()


def test_backpressure_max_conns(server):
    link = server(max_conns=2, streams=2)
    rec, p = make_payload(4 * MiB)  # 64 chunks of 64 KiB: transfers that overlap
    loc = link.publish("r1", p)
    results, errors = [], []
    start = threading.Barrier(8)

    def run():
        try:
            start.wait(10)  # all at once: 16 connections for 2 places
            results.append(fetch(loc, p)[0])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 8 and all(same(r, rec) for r in results)
    assert link.server.stats["busy"] > 0  # some were told to back off, and retried


def test_sixteen_concurrent_clients(server):
    link = server(streams=2)
    rec, p = make_payload(512 * KiB, seed=1)
    loc = link.publish("r1-train-0", p)
    slots = [link.issue_slot(f"r1-train-n{i}-s0-x", 4 * MiB) for i in range(16)]
    replies = [make_payload(300 * KiB, seed=100 + i) for i in range(16)]
    errors, locs = [], {}

    def client(i):
        try:
            c = TcpClientLink()
            out, _ = fetch(loc, p, c)
            assert same(out, rec)
            locs[i] = c.upload(slots[i], replies[i][1])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i in range(16):
        r, rp = replies[i]
        with link.open_upload(slots[i], locs[i], rp.size) as src:
            assert same(decode(src.read, rp.size, rp.digest), r)


# -- TLS ---------------------------------------------------------------------------------
def test_tls_pinned_certificate(server, tmp_path):
    cert, key = self_signed_cert(str(tmp_path), "some-other-name")
    link = server(tls_cert=cert, tls_key=key)
    rec, p = make_payload(300 * KiB)
    loc = link.publish("r1", p)
    assert "tls" in loc and len(loc["tls"]["fp"]) == 64
    assert same(fetch(loc, p)[0], rec)
    slot = link.issue_slot("s0", 4 * MiB)
    back = TcpClientLink().upload(slot, p)
    with link.open_upload(slot, back, p.size) as src:
        assert same(decode(src.read, p.size, p.digest), rec)
    # a plain-TCP client cannot talk to it; a client pinning another cert refuses it
    with pytest.raises(LinkError):
        TcpClientLink().open({**loc, "tls": None, "retries": 0}, p.size)
    other, _ = self_signed_cert(str(tmp_path), "impostor")
    with open(other) as f:
        pem = f.read()
    fp = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()
    with pytest.raises(LinkError):
        TcpClientLink().open({**loc, "tls": {"cert": pem, "fp": fp}, "retries": 0}, p.size)


# -- through offload() ------------------------------------------------------------------
def _app():
    app = ClientApp(mods=[payload_mod])

    @app.train()
    def train(msg, ctx):
        arrs = msg.content["arrays"].to_numpy_ndarrays()
        pid = ctx.node_config["partition-id"]
        new = [a + (pid + 1) * 0.5 for a in arrs]
        return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord(
            {"num-examples": 10 * (pid + 1)})}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg, ctx):
        arrs = msg.content["arrays"].to_numpy_ndarrays()
        return Message(RecordDict({"metrics": MetricRecord(
            {"loss": float(sum(a.sum() for a in arrs)), "num-examples": 1})}), reply_to=msg)

    return app


def test_offload_fedavg_tcp_equals_inband():
    from inproc import InProcessGrid

    init = ArrayRecord([np.arange(300_000, dtype=np.float32).reshape(300, 1000), np.ones(3)])
    results = {}
    for t in ("inband", "tcp://127.0.0.1:0?chunk_size=256KiB&aggregation=inner"):
        s = offload(FedAvg(), transport=t)
        r = s.start(InProcessGrid(_app(), n_nodes=2), init, num_rounds=2)
        results[t] = (r.arrays, s.stats)
    (a, _), (b, stats) = results.values()
    for k in a:
        np.testing.assert_array_equal(a[k].numpy(), b[k].numpy())
    assert same(a, b)
    assert stats["link_bytes_sent"] > 0 and stats["link_bytes_received"] > 0
    assert stats["replies_rejected"] == 0
    # the payload server is gone after the run
    assert not [t for t in threading.enumerate() if t.name.startswith("ftx-tcp")]


def test_server_close_stops_threads_and_port():
    link = TcpServerLink("tcp://127.0.0.1:0", 1, {})
    port = link.server.port
    link.close()
    for t in [t for t in threading.enumerate() if t.name.startswith("ftx-tcp")]:
        t.join(10)  # close() told them to stop: each one ends (joined, not slept on)
    assert not [t for t in threading.enumerate() if t.name.startswith("ftx-tcp")]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def _has_ipv6_loopback() -> bool:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_ipv6_host():
    link = TcpServerLink("tcp://[::1]:0", 1, {"chunk_size": "64KiB", "timeout": 10})
    try:
        rec, p = make_payload(200 * KiB)
        loc = link.publish("r1", p)
        assert loc["host"] == "::1"
        assert same(fetch(loc, p)[0], rec)
    finally:
        link.close()


class _NoScatterConn(ch.ClientConn):
    scatter = False  # as rdma's: a chunk must land in one buffer


def test_download_receives_into_the_arrays_own_bytes(server):
    """Chunks land straight in one fresh bytes object per array; the decoded Array
    holds that very object (no copy after the socket), also when chunk boundaries cut
    through arrays and arrays are smaller than a chunk."""
    link = server(chunk_size=str(ch.MIN_CHUNK))
    rng = np.random.default_rng(5)
    rec = ArrayRecord({
        "big": Array(rng.random(3 * MiB // 8 + 1001)),  # crosses many chunk boundaries
        "tiny": Array(np.arange(3, dtype=np.int8)),
        "empty": Array(np.zeros((0, 4), dtype=np.float32)),
        "mid": Array(rng.integers(0, 9, 100 * KiB, dtype=np.int16)),
        "scalar": Array(np.array(2.5)),
        "tail": Array(rng.random(70 * KiB // 8).astype(np.float32)),
    })
    p = encode(rec)
    loc = link.publish("zc", p)
    ep = ch.Endpoint("127.0.0.1", loc["port"], timeout=10)
    pool = ch.BufferPool(64 * MiB)
    stats: dict = {}
    src = ch.download(lambda: ch.ClientConn(ep), loc["id"], bytes.fromhex(loc["token"]),
                      p.size, pool=pool, stats=stats)
    got = decode(src.read, p.size, p.digest)
    assert src.placement().scatter
    assert same(got, rec)
    big = [name for name, a in rec.items() if len(a.data) >= 64 * KiB]
    assert big, "the payload must have arrays above the zero-copy threshold"
    ranges = codec.data_ranges(p.to_bytes()[:ch.MIN_CHUNK], p.size)
    assert ranges is not None
    names = list(rec.keys())
    for k, (a, b) in enumerate(ranges[1]):
        if b - a >= 64 * KiB:  # read() hands out the received object itself, every time
            assert src.read(a, b - a) is src.read(a, b - a) is got[names[k]].data
    src.close()
    assert stats["zero_copy"] == 1 and stats["chunks"] == src.scheduler.n
    assert pool.hits == 0 and not pool.free  # no scratch buffer was used


def test_buffers_are_reused_without_leaking_old_data(server):
    link = server()
    pool = ch.BufferPool(64 * MiB)
    rec1, p1 = make_payload(400 * KiB, seed=1)
    rec2, p2 = make_payload(400 * KiB, seed=2)  # same size, other bytes
    assert p1.size == p2.size
    for rec, p, name in ((rec1, p1, "a"), (rec2, p2, "b")):
        loc = link.publish(name, p)
        ep = ch.Endpoint("127.0.0.1", loc["port"], timeout=10)
        with ch.download(lambda ep=ep: _NoScatterConn(ep), loc["id"], bytes.fromhex(loc["token"]),
                         p.size, pool=pool) as src:
            assert not src.placement().scatter
            assert same(decode(src.read, p.size, p.digest), rec)
    assert pool.hits == 1 and len(pool.free) == 1
    # server side: round 2's upload slot reuses round 1's buffer
    for i, (rec, p) in enumerate(((rec1, p1), (rec2, p2))):
        slot = link.issue_slot(f"r{i}-s0", 4 * MiB)
        loc = TcpClientLink().upload(slot, p)
        with link.open_upload(slot, loc, p.size) as src:
            assert same(decode(src.read, p.size, p.digest), rec)
            if getattr(src, "predecoded", None) is not None:
                # the eager decoder also reads the buffer; it goes back to the pool
                # only when both are done, which round 2 must not race
                assert same(src.predecoded(10)[0], rec)
        link.discard_slot(slot)
    assert link.server.pool.hits == 1
    pool.clear()


# -- stream count ------------------------------------------------------------------------
class _FakeSock:
    """Answers TCP_INFO with a chosen smoothed RTT (tcpi_rtt, microseconds)."""

    def __init__(self, rtt_us: int):
        self.rtt_us = rtt_us

    def getsockopt(self, level, opt, n):
        info = bytearray(n)
        info[68:72] = self.rtt_us.to_bytes(4, "little")
        return bytes(info)


def test_auto_streams_follow_the_measured_rtt(monkeypatch):
    monkeypatch.setenv(ch.SNDBUF_ENV, "4MiB")  # a known send buffer: 8 MiB granted
    window = ch.stream_window()
    assert window == min(int(ch.SEND_BUFFER_PAYLOAD * 8 * MiB),
                         ch.client._sysctl_max("tcp_rmem", 6 << 20) // 2)
    assert ch.auto_streams(_FakeSock(100), 1000) == ch.AUTO_MIN_STREAMS  # LAN / loopback
    far = ch.auto_streams(_FakeSock(100_000), 1000)  # 100 ms
    want = -(-int(ch.AUTO_TARGET_RATE * 0.1) // window)
    assert far == max(ch.AUTO_MIN_STREAMS, min(want, ch.AUTO_MAX_STREAMS))
    assert far > ch.AUTO_MIN_STREAMS  # a long RTT gets more streams than a LAN
    assert ch.auto_streams(_FakeSock(2_000_000), 1000) == ch.AUTO_MAX_STREAMS  # capped
    assert ch.auto_streams(_FakeSock(100_000), 3) == 3  # never more than chunks left
    assert ch.auto_streams(_FakeSock(0), 1000) == ch.AUTO_MIN_STREAMS  # no RTT sample


def test_send_buffer_request_rules(monkeypatch, caplog):
    """auto asks for net.core.wmem_max only where that beats autotuning's cap (the
    kernel doubles an explicit SO_SNDBUF); the environment overrides."""
    from flwr_transports.links.chunks import protocol

    monkeypatch.delenv(ch.SNDBUF_ENV, raising=False)
    for wmem_max, autotune_cap, want in ((4 * MiB, 4 * MiB, 4 * MiB),  # Linux defaults
                                         (MiB, 4 * MiB, 0),  # explicit would be smaller
                                         (2 * MiB, 4 * MiB, 0),  # 2x = the same: leave it
                                         (64 * MiB, 32 * MiB, 64 * MiB)):  # a tuned host
        vals = {"/proc/sys/net/core/wmem_max": wmem_max,
                "/proc/sys/net/ipv4/tcp_wmem": autotune_cap}
        monkeypatch.setattr(protocol, "_proc_int", lambda path, field, d, v=vals: v[path])
        assert ch.send_buffer_request() == want, (wmem_max, autotune_cap)
    monkeypatch.setenv(ch.SNDBUF_ENV, "0")
    assert ch.send_buffer_request() == 0
    monkeypatch.setenv(ch.SNDBUF_ENV, "16MiB")
    assert ch.send_buffer_request() == 16 * MiB
    monkeypatch.setenv(ch.SNDBUF_ENV, "lots")
    with caplog.at_level("WARNING", logger="flwr_transports.links"):
        assert ch.send_buffer_request() == 64 * MiB  # falls back to auto (the fake host)
    assert "FLWR_TRANSPORTS_SNDBUF" in caplog.text


def test_chunk_connections_get_the_send_buffer(server, monkeypatch):
    """Both ends of a real transfer: the client's connections and the server's accepted
    ones carry the requested send buffer (the kernel grants twice the request)."""
    monkeypatch.setenv(ch.SNDBUF_ENV, "1MiB")
    granted: list[int] = []
    real = ch.tune_socket

    def spy(sock):
        granted.append(real(sock))
        return granted[-1]

    import flwr_transports.links.chunks.client as chc
    import flwr_transports.links.chunks.server as chs

    monkeypatch.setattr(chc, "tune_socket", spy)
    monkeypatch.setattr(chs, "tune_socket", spy)
    link = server()
    rec, p = make_payload(3 * MiB)
    loc = link.publish("sb", p)
    with TcpClientLink().open(loc, p.size) as src:
        assert same(decode(src.read, p.size, p.digest), rec)
    assert len(granted) >= 2  # at least one connection each side
    assert set(granted) == {2 * MiB}
    monkeypatch.setenv(ch.SNDBUF_ENV, "0")  # kernel autotuning: nothing is locked
    granted.clear()
    with TcpClientLink().open(loc, p.size) as src:
        assert same(decode(src.read, p.size, p.digest), rec)
    assert granted and 2 * MiB not in granted  # whatever autotuning chose, not the lock


def test_streams_default_to_auto_and_clients_size_them(server):
    link = server()  # no streams option
    rec, p = make_payload(1 * MiB)
    loc = link.publish("auto", p)
    assert loc["streams"] == 0  # auto travels in the descriptor
    client = TcpClientLink()
    with client.open(loc, p.size) as src:
        assert same(decode(src.read, p.size, p.digest), rec)
    assert client.last_stats["streams"] == ch.AUTO_MIN_STREAMS  # loopback RTT
    slot = link.issue_slot("s-auto", 4 * MiB)
    client.upload(slot, p)
    assert client.last_stats["streams"] == ch.AUTO_MIN_STREAMS
    assert server(streams=3).publish("fixed", p)["streams"] == 3


def test_auto_chunk_size_spreads_small_payloads_over_more_chunks(server):
    assert ch.auto_chunk_size(10 * 10**6) == 256 * KiB * 4  # 10 MB -> 1 MiB chunks
    assert ch.auto_chunk_size(100 * MiB) == 2 * MiB
    assert ch.auto_chunk_size(500 * MiB) == ch.DEFAULT_CHUNK
    assert ch.auto_chunk_size(1) == ch.AUTO_CHUNK_MIN
    link = TcpServerLink("tcp://127.0.0.1:0", 7, {"timeout": 10})  # chunk_size: auto
    try:
        rec, p = make_payload(3 * MiB)
        loc = link.publish("auto-cs", p)
        assert link.server.objects[loc["id"]].cs == ch.AUTO_CHUNK_MIN
        slot = link.issue_slot("s-auto-cs", 8 * MiB)
        assert slot["chunk_size"] == ch.AUTO_CHUNK_MIN  # replies follow the model's size
        out, _ = fetch(loc, p)
        assert same(out, rec)
    finally:
        link.close()
    fixed = server(chunk_size="256KiB")
    assert fixed.issue_slot("s-fixed", 8 * MiB)["chunk_size"] == 256 * KiB


# -- spill files: the ServerApp keeps no per-node copy of a folded upload (issue 24) ----
def _wait(pred, timeout=10.0):
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("spill", ["auto", "off"])
def test_a_folded_upload_lands_in_a_spill_file_and_leaves_no_pages_behind(server, spill):
    """With a landing hook (streaming aggregation), the upload is received into an
    unlinked spill file whose pages are dropped chunk by chunk: while the round waits
    for the other nodes, the ServerApp holds none of this node's model; the hook and
    a later rebuild read the exact bytes back from the file. spill=off receives into
    memory, which stays resident (the test's control)."""
    from test_tcp_helpers import mapping_of

    link = server(spill=spill)
    rec, p = make_payload(6 * MiB, seed=5)
    sent = hashlib.sha256(b"".join(bytes(s) for s in p.segments)).hexdigest()
    slot = link.issue_slot("s-spill", 8 * MiB)
    seen = {}

    def hook(src):
        st = link.server.slots[slot["id"]]
        seen["before"] = mapping_of(st.buf)  # received, not yet read by the fold
        seen["sha"] = hashlib.sha256(src.view(0, src.size)).hexdigest()

    assert link.on_upload(slot, hook)
    loc = TcpClientLink().upload(slot, p)
    st = link.server.slots[slot["id"]]
    _wait(lambda: "sha" in seen and st.readers == 0)
    assert seen["sha"] == sent  # the fold saw exactly the bytes sent
    rss_before, path = seen["before"]
    rss_after, _ = mapping_of(st.buf)
    if spill == "off":
        assert not st.spilled and rss_after >= p.size  # the control: all resident
        return
    assert st.spilled and path.endswith("(deleted)")  # a file with no name
    assert rss_before <= 256 * KiB, rss_before  # dropped as the chunks arrived
    assert rss_after <= 64 * KiB, rss_after  # and after the fold
    with link.open_upload(slot, loc, p.size) as src:  # a rebuild re-reads the file
        assert same(decode(src.read, p.size, p.digest), rec)
    assert mapping_of(st.buf)[0] <= 256 * KiB
    link.discard_slot(slot)
    assert link.server.stats["spilled"] == 1


def test_a_spill_directory_that_cannot_hold_the_upload_falls_back_to_memory(server, tmp_path,
                                                                          caplog):
    link = server(spill_dir=str(tmp_path / "missing"))
    _, p = make_payload(2 * MiB, seed=6)
    slot = link.issue_slot("s-nospill", 4 * MiB)
    got = []
    assert link.on_upload(slot, lambda src: got.append(bytes(src.view(0, src.size))))
    with caplog.at_level(logging.WARNING, logger="flwr_transports.links"):
        TcpClientLink().upload(slot, p)
        _wait(lambda: got)
    assert got[0] == b"".join(bytes(s) for s in p.segments)
    assert not link.server.slots[slot["id"]].spilled
    assert "cannot make a spill file" in caplog.text
    assert link.server.stats["spill_failed"] == 1


def test_a_large_chunk_is_spilled_a_piece_at_a_time(server, monkeypatch):
    """A connection never holds more than one SPILL_STEP of an upload's pages, however
    large its chunks: what N uploads in flight cost the server does not scale with the
    chunk size (checked at every page drop, before it happens)."""
    from test_tcp_helpers import mapping_of

    from flwr_transports.links.chunks import server as srv_mod

    link = server(chunk_size="4MiB", streams=1)
    _, p = make_payload(12 * MiB, seed=8)
    slot = link.issue_slot("s-pieces", 16 * MiB)
    got = []
    assert link.on_upload(slot, lambda src: got.append(src.size))
    peaks = []
    real = srv_mod.drop_pages

    def watched(buf, off, n):
        peaks.append(mapping_of(buf)[0])
        real(buf, off, n)

    monkeypatch.setattr(srv_mod, "drop_pages", watched)
    TcpClientLink().upload(slot, p)
    _wait(lambda: got)
    assert len(peaks) >= 12  # 3 chunks of 4 MiB, 4 pieces each
    assert max(peaks) <= srv_mod.SPILL_STEP + 64 * KiB, max(peaks)


def test_a_landing_hook_on_a_slot_discarded_meanwhile_releases_its_reader(server):
    """The race a review found: a slot discarded (buffer freed) between its last chunk
    and the landing hook: the hook runs on no buffer, raises nothing out of the pool
    thread, and gives its reader back."""
    link = server()
    _, p = make_payload(1 * MiB, seed=9)
    slot = link.issue_slot("s-race", 4 * MiB)
    seen = []
    assert link.on_upload(slot, seen.append)
    TcpClientLink().upload(slot, p)
    st = link.server.slots[slot["id"]]
    _wait(lambda: seen and st.readers == 0)
    link.discard_slot(slot)  # freed: buffer gone
    assert st.buf is None and st.spilled
    st.readers += 1  # as the PUT_DONE that raced the discard would have
    link.server._run_hook(slot["id"], st)
    assert st.readers == 0


# -- hostile clients vs spill files (review of issue 24) ---------------------------------
def test_announced_uploads_reserve_at_most_their_slots_and_discarding_frees_them(server,
                                                                              tmp_path):
    """A client announcing uploads and then sending nothing, half, or hanging up: each
    slot reserves one spill file of the size announced (never over the slot's cap,
    refused before anything is made), so what idle announcements hold on disk is
    bounded by the slots the server issued x their cap; an honest upload meanwhile
    goes through; discarding the slots frees every file (buffer_pool=0: none pooled)."""
    from test_tcp_helpers import raw_put, spill_maps

    link = server(buffer_pool=0, spill_dir=str(tmp_path))
    base = spill_maps(tmp_path)
    cap = 2 * MiB
    slots = [link.issue_slot(f"s-idle{k}", cap) for k in range(6)]
    for s in slots:
        assert link.on_upload(s, lambda src: None)
    with pytest.raises(AssertionError):  # over the cap: TOO_BIG, no file made
        raw_put(slots[0], cap + 1)
    socks = [raw_put(slots[0], cap),  # announces the cap, sends nothing, stays
             raw_put(slots[1], cap, {0: b"x" * (64 * KiB)}),  # sends a bit, stays
             raw_put(slots[2], cap)]
    socks.pop().close()  # announces, hangs up
    again = raw_put(slots[0], cap)  # a second announcement of the same slot: same file
    again.close()
    assert spill_maps(tmp_path) - base == 3 * cap  # one file per announced slot, none larger
    _, p = make_payload(1 * MiB, seed=40)  # an honest node is not held up
    got = []
    assert link.on_upload(slots[5], lambda src: got.append(bytes(src.view(0, src.size))))
    TcpClientLink().upload(slots[5], p)
    _wait(lambda: got)
    assert got[0] == b"".join(bytes(s) for s in p.segments)
    for s in slots:
        link.discard_slot(s)
    assert spill_maps(tmp_path) == base  # every spill file released, idle connections or not
    for s in socks:
        s.close()


def test_a_client_stalled_inside_a_chunk_does_not_keep_a_discarded_slots_spill_file(server,
                                                                                   tmp_path):
    """A client that stops (or trickles a byte now and then, so that no receive ever
    times out) in the middle of a chunk holds a view of the slot's spill file: when the
    round discards the slot, its connections are closed, so the file is released at
    once, not when (if ever) the connection times out."""
    from test_tcp_helpers import raw_put, spill_maps

    link = server(buffer_pool=0, timeout=30, spill_dir=str(tmp_path))
    base = spill_maps(tmp_path)
    slot = link.issue_slot("s-stall", 2 * MiB)
    assert link.on_upload(slot, lambda src: None)
    s = raw_put(slot, 2 * MiB)
    oid, tok = slot["id"].encode(), bytes.fromhex(slot["token"])
    n = 64 * KiB
    s.sendall(ch.REQ.pack(ch.MAGIC_REQ, ch.OP_PUT, 0, len(oid), tok, 0, n, 0) + oid
              + b"y" * (n // 2))  # half the chunk, then nothing
    st = link.server.slots[slot["id"]]
    _wait(lambda: 0 in st.claimed)
    assert spill_maps(tmp_path) - base == 2 * MiB
    link.discard_slot(slot)
    _wait(lambda: spill_maps(tmp_path) == base, timeout=3)
    s.settimeout(3)
    assert s.recv(100) == b""  # the server closed it
    s.close()
