"""s3:// link against a real embedded S3 server (moto's ThreadedMotoServer).

moto does not check signatures or expiry: security properties are tested against
Ceph radosgw in test_s3_radosgw.py. Faults (5xx, connections cut mid-body) are
injected by a small real HTTP proxy between the link and moto.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import boto3
import moto  # noqa: F401 - a dev dependency: missing is a failure
import numpy as np
import pytest
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from moto_store import moto_endpoint as _moto

from flwr_transports import offload, payload_mod
from flwr_transports.codec import decode, encode
from flwr_transports.links import LinkError, server_link
from flwr_transports.links.s3 import S3ClientLink, S3ServerLink
from flwr_transports.refs import RefError

sys.path.insert(0, os.path.dirname(__file__))
from inproc import InProcessGrid

MiB = 2**20
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
         "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


# -- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def moto_endpoint():
    with _moto() as endpoint:
        yield endpoint


@pytest.fixture
def s3(moto_endpoint):
    return boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")


@pytest.fixture
def bucket(s3):
    name = f"ftx-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    yield name
    for o in s3.list_objects_v2(Bucket=name).get("Contents", []):
        s3.delete_object(Bucket=name, Key=o["Key"])
    for u in s3.list_multipart_uploads(Bucket=name).get("Uploads", []):
        s3.abort_multipart_upload(Bucket=name, Key=u["Key"], UploadId=u["UploadId"])
    s3.delete_bucket(Bucket=name)


def leftovers(s3, bucket) -> tuple[list[str], list[str]]:
    objs = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    ups = [u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    return objs, ups


class FaultProxy:
    """A real HTTP proxy in front of the store that can fail chosen requests.

    ``rules``: list of dicts {"method", "part" (partNumber) or "range_start",
    "action": "503" | "cut" | "reset", "times"}. ``log``: (method, partNumber, range start).
    """

    def __init__(self, upstream: str):
        u = urlsplit(upstream)
        self.up = (u.hostname, u.port)
        self.rules: list[dict] = []
        self.log: list[tuple[str, str | None, int | None]] = []
        self.lock = threading.Lock()
        proxy = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _handle(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                q = parse_qs(urlsplit(self.path).query)
                part = q.get("partNumber", [None])[0]
                rng = self.headers.get("Range")
                start = int(rng.split("=")[1].split("-")[0]) if rng else None
                action = None
                with proxy.lock:
                    proxy.log.append((self.command, part, start))
                    for r in proxy.rules:
                        if r["times"] > 0 and r["method"] == self.command and (
                                ("part" in r and r["part"] == part)
                                or ("range_start" in r and r["range_start"] == start)):
                            r["times"] -= 1
                            action = r["action"]
                            break
                if action == "reset":  # request read, then the connection dies
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if action == "503":
                    msg = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection(*proxy.up, timeout=60)
                hdrs = {k: v for k, v in self.headers.items()
                        if k.lower() not in ("connection", "keep-alive")}
                conn.request(self.command, self.path, body=body, headers=hdrs)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length",
                                         "server", "date"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if action == "cut":  # half the body, then a dead connection
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(moto_endpoint):
    p = FaultProxy(moto_endpoint)
    yield p
    p.close()


# -- a small federation ----------------------------------------------------------------------
app = ClientApp(mods=[payload_mod])


@app.train()
def _train(msg, ctx):
    arrs = msg.content["arrays"].to_numpy_ndarrays()
    pid = ctx.node_config["partition-id"]
    return Message(RecordDict({
        "arrays": ArrayRecord([np.asarray(a * 0.5 + (pid + 1)) for a in arrs]),
        "metrics": MetricRecord({"num-examples": 10 * (pid + 1)}),
    }), reply_to=msg)


@app.evaluate()
def _evaluate(msg, ctx):
    arrs = msg.content["arrays"].to_numpy_ndarrays()
    return Message(RecordDict({"metrics": MetricRecord({
        "loss": float(sum(float(a.sum()) for a in arrs)), "num-examples": 1})}), reply_to=msg)


def initial(n: int = 1_500_000) -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord([rng.standard_normal(n).astype(np.float32),
                        np.arange(10, dtype=np.int64), np.full((), 3.5)])


def run(transport: str, init: ArrayRecord, rounds: int = 2, **opts):
    s = offload(FedAvg(), transport=transport, **opts)
    r = s.start(InProcessGrid(app, n_nodes=2), init, num_rounds=rounds)
    out = r.arrays.to_numpy_ndarrays()
    # training really happened (a failed round would leave the initial model)
    assert not np.array_equal(out[1], init.to_numpy_ndarrays()[1])
    return out, s.stats


def payload_of(nbytes: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    rec = ArrayRecord([rng.integers(0, 255, nbytes, dtype=np.uint8),
                       np.arange(1000, dtype=np.float32)])
    return rec, encode(rec)


def same(a: ArrayRecord, b: ArrayRecord) -> bool:
    x, y = a.to_numpy_ndarrays(), b.to_numpy_ndarrays()
    return len(x) == len(y) and all(
        u.dtype == v.dtype and u.shape == v.shape and np.array_equal(u, v) for u, v in zip(x, y))


# -- tests -------------------------------------------------------------------------------------
def test_federation_identical_to_inband(moto_endpoint, s3, bucket):
    init = initial()
    want, _ = run("inband", init)
    url = f"s3://{bucket}/runs/exp1?endpoint_url={moto_endpoint}&part_size=5MiB"
    got, stats = run(url, init, aggregation="inner")  # the link changes no bit
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    # the global model went over S3 (once per round and phase), replies too
    assert stats["link_bytes_sent"] >= 4 * 6_000_000
    assert stats["link_bytes_received"] >= 4 * 6_000_000
    assert stats["inband_bytes_sent"] < 200_000
    assert stats["replies_rejected"] == 0
    assert leftovers(s3, bucket) == ([], [])


def test_large_payload_many_parts_and_ranges(moto_endpoint, proxy, s3, bucket):
    """A payload of 4+ parts: multipart with parallel parts up, parallel ranges down."""
    rec, payload = payload_of(21 * MiB)
    link = server_link(f"s3://{bucket}/big?endpoint_url={proxy.endpoint}",
                       run_id=3, options={"part_size": "5MiB", "concurrency": 4})
    try:
        loc = link.publish("global", payload)
        assert link.wait_published("global", 60)  # uploaded in the background
        head = s3.head_object(Bucket=bucket, Key=loc["key"])
        assert head["ContentLength"] == payload.size
        assert head["ETag"].strip('"').endswith("-5")  # a 5-part multipart object
        with S3ClientLink().open(loc, payload.size) as src:
            assert same(decode(src.read, payload.size, payload.digest), rec)
        gets = sorted(s for m, _, s in proxy.log if m == "GET" and s is not None)
        assert gets == [i * 5 * MiB for i in range(5)]  # 5 ranges, each fetched once

        # a reply of several parts through a presigned multipart upload
        rec2, reply = payload_of(17 * MiB, seed=2)
        slot = link.issue_slot("reply-n1", max_size=64 * MiB)
        assert len(slot["put"]["parts"]) >= 13
        proxy.log.clear()
        claimed = S3ClientLink().upload(slot, reply)
        assert claimed == {"key": slot["key"], "parts": 4}
        puts = sorted(int(p) for m, p, _ in proxy.log if m == "PUT" and p)
        assert puts == [1, 2, 3, 4]
        with link.open_upload(slot, claimed, reply.size) as src:
            assert same(decode(src.read, reply.size, reply.digest), rec2)
        link.discard_slot(slot)
        link.discard_slot(slot)  # idempotent
    finally:
        link.close()
    assert leftovers(s3, bucket) == ([], [])


def test_retries_per_part_and_range(moto_endpoint, proxy, s3, bucket):
    rec, payload = payload_of(16 * MiB)
    link = server_link(f"s3://{bucket}?endpoint_url={proxy.endpoint}", run_id=4,
                       options={"part_size": "5MiB", "concurrency": 3})
    try:
        loc = link.publish("global", payload)
        assert link.wait_published("global", 60)  # uploaded in the background
        # a ranged GET cut mid-body and a 503 on another range
        proxy.rules += [{"method": "GET", "range_start": 5 * MiB, "action": "cut", "times": 1},
                        {"method": "GET", "range_start": 10 * MiB, "action": "503", "times": 2}]
        proxy.log.clear()
        client = S3ClientLink()
        with client.open(loc, payload.size) as src:
            assert same(decode(src.read, payload.size, payload.digest), rec)
        gets = [s for m, _, s in proxy.log if m == "GET"]
        assert gets.count(0) == 1 and gets.count(15 * MiB) == 1  # untouched ranges: once
        assert gets.count(5 * MiB) == 2 and gets.count(10 * MiB) == 3  # only failed ones again

        # a part PUT answered 503 twice, another cut: only those parts are sent again
        slot = link.issue_slot("reply", max_size=64 * MiB)
        proxy.rules += [{"method": "PUT", "part": "2", "action": "503", "times": 2},
                        {"method": "PUT", "part": "3", "action": "reset", "times": 1}]
        proxy.log.clear()
        claimed = client.upload(slot, payload)
        puts = [p for m, p, _ in proxy.log if m == "PUT"]
        assert puts.count("1") == 1 and puts.count("4") == 1
        assert puts.count("2") == 3 and puts.count("3") == 2
        with link.open_upload(slot, claimed, payload.size) as src:
            assert same(decode(src.read, payload.size, payload.digest), rec)
        assert client.http.retried >= 6

        # a part that keeps failing: a clear error after the retry budget
        slot2 = link.issue_slot("reply2", max_size=64 * MiB)
        proxy.rules.append({"method": "PUT", "part": "1", "action": "503", "times": 100})
        client.http.retries, client.http.backoff = 2, 0.01
        with pytest.raises(LinkError, match="HTTP 503"):
            client.upload(slot2, payload)
    finally:
        link.close()
    assert leftovers(s3, bucket) == ([], [])


def test_encryption_roundtrip_and_ciphertext_at_rest(moto_endpoint, s3, bucket):
    rec, payload = payload_of(6 * MiB)
    plain = payload.to_bytes()
    link = server_link(f"s3://{bucket}/enc?endpoint_url={moto_endpoint}&encrypt=true",
                       run_id=5, options={"part_size": "5MiB"})
    try:
        loc = link.publish("global", payload)
        assert link.wait_published("global", 60)  # uploaded in the background
        stored = s3.get_object(Bucket=bucket, Key=loc["key"])
        blob = stored["Body"].read()
        assert len(blob) == payload.size + 16 * 7  # 7 chunks of 1 MiB, a tag each
        key = loc["enc"]["key"]
        assert plain[:4096] not in blob and plain[3 * MiB: 3 * MiB + 4096] not in blob
        assert key.encode() not in blob and key not in json.dumps(stored["Metadata"])
        with S3ClientLink().open(loc, payload.size) as src:
            assert same(decode(src.read, payload.size, payload.digest), rec)

        # a reply, encrypted by the client with the slot's own key
        slot = link.issue_slot("reply", 64 * MiB)
        assert slot["enc"]["key"] != key
        claimed = S3ClientLink().upload(slot, payload)
        with link.open_upload(slot, claimed, payload.size) as src:
            # a planner's scattered header reads (peek): whole AEAD chunks, decrypted
            for off, n in ((0, 8), (MiB - 10, 40), (3 * MiB - 3, MiB + 7),
                           (payload.size - 100, 100)):
                assert src.peek(off, n) == plain[off:off + n]
            assert same(decode(src.read, payload.size, payload.digest), rec)
        rblob = s3.get_object(Bucket=bucket, Key=slot["key"])["Body"].read()
        assert plain[:4096] not in rblob and slot["enc"]["key"].encode() not in rblob

        # the store's operator flips one byte: authentication fails, nothing is decoded
        evil = bytearray(blob)
        evil[2 * MiB + 100] ^= 1
        s3.put_object(Bucket=bucket, Key=loc["key"], Body=bytes(evil))
        with pytest.raises(LinkError, match="failed authentication"), S3ClientLink().open(loc, payload.size) as src:
            decode(src.read, payload.size, payload.digest)
    finally:
        link.close()
    assert leftovers(s3, bucket) == ([], [])


def test_federation_encrypted(moto_endpoint, s3, bucket):
    init = initial(400_000)
    want, _ = run("inband", init, rounds=1)
    got, stats = run(f"s3://{bucket}?endpoint_url={moto_endpoint}", init, rounds=1,
                     encrypt=True, threshold=1024, aggregation="inner")
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
    assert stats["link_bytes_received"] > 0
    assert leftovers(s3, bucket) == ([], [])


def test_federation_streaming_aggregation(moto_endpoint, s3, bucket):
    """Each reply is folded from ranged GETs, never decoded: as soon as the client's
    completed upload appears in the store, or when Flower hands over the replies (in
    process the reply may come first); the mean equals FedAvg's within rounding."""
    init = initial()
    want, _ = run("inband", init)
    url = f"s3://{bucket}/runs/exp2?endpoint_url={moto_endpoint}&part_size=5MiB"
    got, stats = run(url, init, aggregation="streaming")
    assert stats["agg_streamed_rounds"] == 2
    assert stats["agg_eager_folds"] + stats["agg_settle_folds"] == 4
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * float(np.max(np.abs(b))))
    assert leftovers(s3, bucket) == ([], [])


def test_open_upload_checks_the_claim(moto_endpoint, s3, bucket):
    rec, payload = payload_of(2 * MiB)
    link = server_link(f"s3://{bucket}?endpoint_url={moto_endpoint}", run_id=6, options={})
    try:
        a = link.issue_slot("a", 64 * MiB)
        b = link.issue_slot("b", 64 * MiB)
        S3ClientLink().upload(b, payload)
        # a client claims another slot's object, or any other key: refused before reading
        with pytest.raises(RefError, match="not the object key"):
            link.open_upload(a, {"key": b["key"]}, payload.size)
        with pytest.raises(RefError, match="not the object key"):
            link.open_upload(a, {"key": "../../etc/passwd"}, payload.size)
        with pytest.raises(RefError, match="not the object key"):
            link.open_upload(a, "nonsense", payload.size)
        # declared size does not match what was uploaded (the client completed it)
        with pytest.raises(RefError, match="bytes, a .*-byte payload needs"):
            link.open_upload(b, {"key": b["key"]}, payload.size + 5 * MiB)
        # a slot whose upload never happened
        with pytest.raises(RefError, match="parts"):
            link.open_upload(a, {"key": a["key"]}, payload.size)
        with link.open_upload(b, {"key": b["key"]}, payload.size) as src:
            assert same(decode(src.read, payload.size, payload.digest), rec)
        with pytest.raises(RefError, match="not open"):  # replay of a used slot
            link.open_upload(b, {"key": b["key"]}, payload.size)
    finally:
        link.close()
    assert leftovers(s3, bucket) == ([], [])


def test_a_completed_upload_lands_before_its_reply(moto_endpoint, s3, bucket):
    """The client completes its multipart upload with the slot's presigned URL; the
    ServerApp's watcher sees the object and hands a reader of it to the landing hook
    before any reply arrived. The reply then finds it complete (no second completion)."""
    rec, payload = payload_of(12 * MiB)
    link = server_link(f"s3://{bucket}?endpoint_url={moto_endpoint}&part_size=5MiB",
                       run_id=7, options={})
    try:
        slot = link.issue_slot("r1-n1", 64 * MiB)
        assert slot["done"].startswith(moto_endpoint) and "uploadId=" in slot["done"]
        seen, landed = [], threading.Event()

        def hook(src):
            seen.append(decode(src.read, src.size, payload.digest))
            landed.set()

        assert link.on_upload(slot, hook)
        S3ClientLink().upload(slot, payload)
        assert landed.wait(10), "the watcher did not see the completed upload"
        assert same(seen[0], rec)
        uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        assert not [u for u in uploads if u["Key"] == slot["key"]]  # completed by the client
        with link.open_upload(slot, {"key": slot["key"]}, payload.size) as src:
            assert same(decode(src.read, payload.size, payload.digest), rec)
        assert len(seen) == 1  # called once
    finally:
        link.close()
    assert leftovers(s3, bucket) == ([], [])


def test_a_client_that_does_not_complete_is_completed_at_reply_time(moto_endpoint, s3,
                                                                    bucket):
    """An older client (no "done" in the slot) or a failed completion: nothing lands
    early, the ServerApp checks the parts and completes the upload when the reply
    arrives; a discarded slot that a client had completed leaves no object."""
    rec, payload = payload_of(6 * MiB)
    link = server_link(f"s3://{bucket}?endpoint_url={moto_endpoint}&part_size=5MiB",
                       run_id=8, options={})
    try:
        slot = link.issue_slot("r1-n1", 64 * MiB)
        called = []
        assert link.on_upload(slot, called.append)
        old = {k: v for k, v in slot.items() if k != "done"}
        S3ClientLink().upload(old, payload)
        with link.open_upload(slot, {"key": slot["key"]}, payload.size) as src:
            assert same(decode(src.read, payload.size, payload.digest), rec)
        assert called == []
        # completed by the client, then discarded (the reply never came)
        gone = link.issue_slot("r1-n2", 64 * MiB)
        S3ClientLink().upload(gone, payload)
        link.discard_slot(gone)
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert gone["key"] not in keys
    finally:
        link.close()
    assert leftovers(s3, bucket) == ([], [])


def test_background_publish_clients_wait_for_the_object(moto_endpoint, s3, bucket):
    """The global model is uploaded while its reference travels: a client that asks
    before the object exists asks again until it appears (within the reference's
    ``wait``), and fails with a clear error when it never does."""
    from flwr_transports.links.s3_http import HttpTransport, RangedReader, S3HttpError

    rec, payload = payload_of(11 * MiB)
    link = server_link(f"s3://{bucket}?endpoint_url={moto_endpoint}&part_size=5MiB",
                       run_id=9, options={})
    try:
        loc = link.publish("global", payload)  # returns before the upload is done
        assert 60 <= loc["wait"] <= 3600
        with S3ClientLink().open(loc, payload.size) as src:  # at once, not after a wait
            assert same(decode(src.read, payload.size, payload.digest), rec)
        assert link.wait_published("global", 60)
    finally:
        link.close()
    assert leftovers(s3, bucket) == ([], [])

    # the mechanism itself, deterministic: the object appears 1 s after the first GET
    data = os.urandom(3 * MiB)
    url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "late"})
    t = threading.Timer(1.0, lambda: s3.put_object(Bucket=bucket, Key="late", Body=data))
    t.start()
    http = HttpTransport()
    try:
        rd = RangedReader(http, url, len(data), None, 5 * MiB, 2, "late", False, 10.0)
        t0 = time.monotonic()
        assert rd.read(0, len(data)) == data
        assert time.monotonic() - t0 >= 0.9
        rd.close()
        gone = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "never"})
        rd = RangedReader(http, gone, 1000, None, 5 * MiB, 2, "never", False, 0.5)
        with pytest.raises(S3HttpError, match="did not appear in the store in time"):
            rd.read(0, 1000)
        rd.close()
        bad = dict(loc, wait=-1)
        with pytest.raises(RefError, match="invalid wait"):
            S3ClientLink().open(bad, payload.size)
    finally:
        t.join()
        http.close()
        s3.delete_object(Bucket=bucket, Key="late")


def test_client_rejects_hostile_descriptors():
    c = S3ClientLink()
    _, payload = payload_of(1000)
    bad_locs = [
        {"get": "file:///etc/passwd", "stored": payload.size, "range": 5 * MiB},
        {"get": "http://x/y?a=b c", "stored": payload.size, "range": 5 * MiB},
        {"get": "http://127.0.0.1:9/k?X=1", "stored": payload.size + 1, "range": 5 * MiB},
        {"get": "http://127.0.0.1:9/k", "stored": payload.size, "range": -1},
        {"get": "http://127.0.0.1:9/k", "stored": payload.size, "range": 5 * MiB,
         "enc": {"alg": "ROT13", "key": "", "nonce": "", "chunk": 1}},
    ]
    for loc in bad_locs:
        with pytest.raises(RefError):
            c.open(loc, payload.size)
    good_put = {"base": "http://127.0.0.1:9/b/k", "common": ["uploadId=x"],
                "parts": ["partNumber=1"]}
    bad_slots = [
        {"key": "k", "put": {**good_put, "base": "gopher://h/k"}, "part": 5 * MiB},
        {"key": "k", "put": {**good_put, "parts": []}, "part": 5 * MiB},
        {"key": "k", "put": {**good_put, "parts": ["a=1#frag"]}, "part": 5 * MiB},
        {"key": "k", "put": good_put, "part": 1024},  # below S3's minimum part size
        {"key": "k", "put": good_put, "part": 5 * MiB, "checksum": "crc64"},
    ]
    for slot in bad_slots:
        with pytest.raises(RefError):
            c.upload(slot, payload)


def test_clear_errors(moto_endpoint, s3, bucket, monkeypatch):
    # bucket missing
    with pytest.raises(LinkError, match=r"bucket 'ftx-nope-[0-9a-f]+' does not exist.*create"):
        server_link(f"s3://ftx-nope-{uuid.uuid4().hex[:8]}?endpoint_url={moto_endpoint}", 1)
    # ... unless asked to create it
    name = f"ftx-new-{uuid.uuid4().hex[:8]}"
    server_link(f"s3://{name}?endpoint_url={moto_endpoint}&create_bucket=true", 1).close()
    s3.head_bucket(Bucket=name)
    s3.delete_bucket(Bucket=name)
    # endpoint unreachable (a port nobody listens on)
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        dead = so.getsockname()[1]
    with pytest.raises(LinkError, match="cannot reach the S3 endpoint"):
        server_link(f"s3://{bucket}?endpoint_url=http://127.0.0.1:{dead}&retries=0", 1)
    # a client whose presigned URL points at an unreachable store
    _, payload = payload_of(1000)
    loc = {"get": f"http://127.0.0.1:{dead}/{bucket}/k?X-Amz-Expires=60",
           "stored": payload.size, "range": 5 * MiB}
    c = S3ClientLink()
    c.http.retries, c.http.backoff = 1, 0.01
    with pytest.raises(LinkError, match="cannot reach|failed to connect"), c.open(loc, payload.size) as src:
        src.read(0, 8)
    # object gone (removed at the end of its round)
    link = server_link(f"s3://{bucket}?endpoint_url={moto_endpoint}", 1)
    loc = link.publish("g", payload)
    link.release("g")
    with pytest.raises(LinkError, match="does not exist"), S3ClientLink().open(loc, payload.size) as src:
        src.read(0, 8)
    link.close()
    # unknown option, bad values
    with pytest.raises(ValueError, match="unknown option"):
        offload(FedAvg(), transport=f"s3://{bucket}?endpont_url=x")
    with pytest.raises(ValueError, match="part_size"):
        server_link(f"s3://{bucket}?endpoint_url={moto_endpoint}&part_size=1MiB", 1)
    # no credentials anywhere
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/ftx")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/ftx")
    with pytest.raises(LinkError, match="no AWS credentials"):
        server_link(f"s3://{bucket}?endpoint_url={moto_endpoint}", 1)


def test_cleanup_finds_leftovers_of_a_crashed_run(moto_endpoint, s3, bucket, capsys):
    _, payload = payload_of(6 * MiB)
    url = f"s3://{bucket}/pre?endpoint_url={moto_endpoint}"
    s3.put_object(Bucket=bucket, Key="pre/not-ours.bin", Body=b"keep me")
    link = S3ServerLink(url, 9, {"part_size": "5MiB"})
    link.publish("global", payload)
    link.issue_slot("reply", 64 * MiB)
    # the run "crashes": close() is never called
    assert S3ServerLink.cleanup(url) == []  # younger than older_than (1h): a live run's
    found = S3ServerLink.cleanup(url + "&older_than=0", dry_run=True)
    assert len(found) == 2 and any("incomplete upload" in f for f in found)
    from flwr_transports.cleanup import main as cleanup_cli  # the CLI reaches the same code

    assert cleanup_cli([url + "&older_than=0", "--dry-run"]) == 0
    assert "would remove 2 object(s)" in capsys.readouterr().out
    objs, ups = leftovers(s3, bucket)
    assert len(objs) == 2 and len(ups) == 1
    found = S3ServerLink.cleanup(url, all_=True)
    assert len(found) == 2
    assert leftovers(s3, bucket) == (["pre/not-ours.bin"], [])
    link.http.close()


def test_client_side_needs_no_boto3(moto_endpoint, s3, bucket):
    """A ClientApp process fetches and uploads with plain HTTP: boto3 is never imported."""
    rec, payload = payload_of(6 * MiB)
    link = server_link(f"s3://{bucket}?endpoint_url={moto_endpoint}", 2,
                       {"part_size": "5MiB", "encrypt": "true"})
    try:
        loc = link.publish("g", payload)
        slot = link.issue_slot("r", 64 * MiB)
        code = (
            "import json, sys\n"
            "from flwr_transports.links import client_link\n"
            "from flwr_transports.codec import decode, encode\n"
            "d = json.load(sys.stdin)\n"
            "c = client_link('s3')\n"
            "with c.open(d['loc'], d['size']) as src:\n"
            "    rec = decode(src.read, d['size'], d['digest'])\n"
            "claimed = c.upload(d['slot'], encode(rec))\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore')]\n"
            "print(json.dumps({'claimed': claimed, 'boto': bad}))\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        out = subprocess.run(
            [sys.executable, "-c", code], input=json.dumps(
                {"loc": loc, "slot": slot, "size": payload.size, "digest": payload.digest}),
            capture_output=True, text=True, env=env, timeout=120, check=False)
        assert out.returncode == 0, out.stderr[-2000:]
        res = json.loads(out.stdout.strip().splitlines()[-1])
        assert res["boto"] == []
        with link.open_upload(slot, res["claimed"], payload.size) as src:
            assert same(decode(src.read, payload.size, payload.digest), rec)
    finally:
        link.close()
    assert leftovers(s3, bucket) == ([], [])


def test_random_reads_and_progress(moto_endpoint, s3, bucket, capfd, monkeypatch):
    """Ranged reads in any order (backwards too) return the right bytes; progress lines
    appear only when asked for."""
    _, payload = payload_of(13 * MiB)
    plain = payload.to_bytes()
    link = server_link(f"s3://{bucket}?endpoint_url={moto_endpoint}", 8,
                       {"part_size": "5MiB", "concurrency": 2})
    try:
        loc = link.publish("g", payload)
        rng = np.random.default_rng(5)
        with S3ClientLink().open(loc, payload.size) as src:
            for _ in range(25):
                off = int(rng.integers(0, payload.size))
                n = int(rng.integers(0, min(7 * MiB, payload.size - off) + 1))
                assert src.read(off, n) == plain[off: off + n]
                p = int(rng.integers(0, payload.size - 300))  # no read-ahead; from
                assert src.peek(p, 300) == plain[p:p + 300]  # fetched ranges if there
            with pytest.raises(ValueError):
                src.read(payload.size - 1, 2)
            with pytest.raises(ValueError):
                src.peek(payload.size - 1, 2)
        assert "flwr-transports s3" not in capfd.readouterr().err  # quiet by default
        monkeypatch.setenv("FLWR_TRANSPORTS_PROGRESS", "1")
        with S3ClientLink().open(loc, payload.size) as src:
            src.read(0, payload.size)
        err = capfd.readouterr().err
        assert "flwr-transports s3 download g:" in err and "(100%)" in err
    finally:
        link.close()


@pytest.mark.parametrize("endpoint,style,token", [
    ("http://127.0.0.1:7480", "path", None), (None, "virtual", "TOKEN/with+slash=="),
    ("https://s3.example.org", "path", "tok")])
def test_fast_part_presigning_matches_botocore(endpoint, style, token):
    """Part URLs signed by _QuerySigner are byte-identical to botocore's (same second)."""
    from botocore.config import Config

    from flwr_transports.links.s3 import _QuerySigner

    c = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="AKIDEXAMPLE",
                     aws_secret_access_key="wJalr/XUtnFEMI+K7MDENG", aws_session_token=token,
                     region_name="eu-central-1",
                     config=Config(signature_version="s3v4", s3={"addressing_style": style}))
    kw = {"Bucket": "my-bucket", "Key": "pre fix/ftx-1-2-3-t17-r1~x+y", "UploadId": "2~a/b+c="}
    for _ in range(3):  # retry if the clock ticked between the two presigns
        first = c.generate_presigned_url("upload_part", Params={**kw, "PartNumber": 1})
        s = _QuerySigner.from_url(first, "PUT", c._request_signer._credentials)
        assert s is not None
        mine = [s.url(partNumber=str(i)) for i in range(2, 6)]
        theirs = [c.generate_presigned_url("upload_part", Params={**kw, "PartNumber": i})
                  for i in range(2, 6)]
        if mine == theirs:
            break
    assert mine == theirs
    # a wrong secret never passes the self-check (botocore then signs every part)
    bad = c._request_signer._credentials.get_frozen_credentials()._replace(secret_key="x")
    assert _QuerySigner.from_url(first, "PUT", bad) is None


def test_http_connections_get_the_send_buffer(moto_endpoint, monkeypatch):
    """The client's HTTP connections (part uploads: one TCP stream each) carry the send
    buffer the chunk links ask for; the kernel grants twice the request."""
    import socket

    from flwr_transports.links import chunks as ch
    from flwr_transports.links.s3_http import HttpTransport

    for req, locked in (("1MiB", True), ("0", False)):
        monkeypatch.setenv(ch.SNDBUF_ENV, req)
        t = HttpTransport()
        try:
            pool = t.session.get_adapter(moto_endpoint).poolmanager.connection_from_url(
                moto_endpoint)
            conn = pool._new_conn()  # a connection as the pool makes them, to a real server
            conn.connect()
            try:
                got = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
                assert (got == 2 * MiB) is locked, got
                assert conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            finally:
                conn.close()
        finally:
            t.session.close()


def test_streaming_with_hostile_replies_folded_from_the_store(moto_endpoint, s3, bucket):
    """Six nodes, two rounds; in round 2 one reference lies about its digest, one reply
    becomes an error after its upload, one is lost, one states another weight in-band.
    Every upload is folded from the store as soon as the client completes it, before
    its reply; the ones that do not count are excluded exactly (one rebuild), and the
    result equals the inner strategy's on the same replies."""
    from test_aggregation import _compare, _run

    url = f"s3://{bucket}/agg?endpoint_url={moto_endpoint}&part_size=5MiB"
    _, r_in, seen_in = _run(FedAvg(), url, "inner")
    s_st, r_st, seen_st = _run(FedAvg(), url, "streaming")
    assert s_st.stats["agg_streamed_rounds"] == 2
    assert s_st.stats["agg_eager_folds"] == 12  # all landed from the store first
    assert s_st.stats["agg_rebuilds"] == 1 and s_st.stats["agg_settle_folds"] == 3
    assert s_st.stats["replies_rejected"] == 1
    assert seen_in == seen_st
    _compare(r_in, r_st)
    assert leftovers(s3, bucket) == ([], [])


def test_owned_upload_binds_the_parts_the_writers_reported(moto_endpoint, s3, bucket):
    """aggregation=ray's shard owners PUT the parts of the next model (begin_owned):
    a part PUT again with other bytes after its writer reported its ETag (a writer
    thought dead, still running) cannot end up in the published object: completion
    with the reported ETags fails, the abort leaves nothing. A completed upload reads
    back as the bytes reported; release and close leave nothing."""
    from flwr_transports.links.s3_http import HttpTransport

    link = server_link(f"s3://{bucket}/own?endpoint_url={moto_endpoint}&part_size=5MiB",
                       run_id=1, options={})
    http = HttpTransport(retries=0)
    body = [os.urandom(5 * MiB), os.urandom(1000)]
    try:
        up = link.begin_owned("r1-model", 2)
        etags = [http.put(up["urls"][i], body[i], f"part {i + 1}", md5=up["md5"])
                 for i in range(2)]
        http.put(up["urls"][0], os.urandom(5 * MiB), "the zombie's part 1", md5=False)
        with pytest.raises(LinkError):
            link.complete_owned(up, etags, sum(map(len, body)))
        link.abort_owned(up)
        assert leftovers(s3, bucket) == ([], [])
        up = link.begin_owned("r2-model", 2)
        etags = [http.put(up["urls"][i], body[i], f"part {i + 1}", md5=up["md5"])
                 for i in range(2)]
        link.complete_owned(up, etags, sum(map(len, body)))
        with link.read_published("r2-model", sum(map(len, body))) as src:
            assert src.read(0, src.size) == b"".join(body)
        link.release("r2-model")
        assert leftovers(s3, bucket) == ([], [])
        link.begin_owned("r3-model", 1)  # never completed: close aborts it
    finally:
        http.close()
        link.close()
    assert leftovers(s3, bucket) == ([], [])



def test_an_owners_part_damaged_on_its_way_is_never_published(moto_endpoint, s3, bucket):
    """The ServerApp publishes the owners' model under a digest built from their leaf
    hashes without reading it back, so every owner's part is PUT with Content-MD5 even
    with checksum=none (the default): a store that checks it (S3, radosgw) refuses
    damaged bytes, and a store that kept other bytes than were sent (moto does not check
    Content-MD5 on parts) is caught from the part's ETag; the upload is aborted, nothing
    left. (The damage is injected between the PUT and the store: no store here damages
    bytes on request.)"""
    from flwr_transports.links.s3_http import HttpTransport, S3HttpError

    link = server_link(f"s3://{bucket}/own?endpoint_url={moto_endpoint}&checksum=none",
                       run_id=1, options={})
    http = HttpTransport(retries=0)
    real_put = http.session.put

    def damaging_put(url, data=None, **kw):
        return real_put(url, data=bytes([data[0] ^ 1]) + data[1:], **kw)

    body = os.urandom(1000)
    try:
        up = link.begin_owned("r1-model", 1)
        assert up["md5"] is True  # whatever checksum= says
        assert http.put(up["urls"][0], body, "part 1", md5=up["md5"])  # intact: fine
        http.session.put = damaging_put
        with pytest.raises(S3HttpError, match="kept other bytes"):
            http.put(up["urls"][0], body, "part 1", md5=up["md5"])
        link.abort_owned(up)
    finally:
        http.close()
        link.close()
    assert leftovers(s3, bucket) == ([], [])


def test_a_reply_folded_from_the_store_is_fetched_once(moto_endpoint, s3, bucket,
                                                       monkeypatch):
    """Streaming aggregation of one-object replies reads each byte from the store ONCE:
    the plan's scattered .npy header reads (one before every array) are small exact
    GETs (``peek``), not ranged reads that start the read-ahead and drop it again as
    the planner moves on (the fold then fetched the whole reply a second time: 1.95x
    for this model, 3710 MiB instead of ~1900 over a WAN). Both the fold on landing
    and the fold at settle time; the digest is still checked and the mean exact."""
    from flwr.app import Array

    from flwr_transports.aggregation.layout import WEIGHT_META, expected_layout
    from flwr_transports.aggregation.round import Accepted, RoundStream
    from flwr_transports.links.s3_http import HttpTransport

    fetched: list[tuple[int, int]] = []
    real = HttpTransport.get_range

    def counting(self, url, start, end, *a, **kw):
        data = real(self, url, start, end, *a, **kw)
        fetched.append((start, len(data)))
        return data

    monkeypatch.setattr(HttpTransport, "get_range", counting)
    rng = np.random.default_rng(5)
    recs = [ArrayRecord({f"a{i:02d}": Array(rng.standard_normal(100_000).astype(np.float32))
                         for i in range(32)}) for _ in range(2)]  # 32 arrays, 12.8 MB each
    payloads = [encode(r, {WEIGHT_META: json.dumps(w)}) for r, w in zip(recs, (1, 3))]
    link = server_link(f"s3://{bucket}?endpoint_url={moto_endpoint}&part_size=5MiB",
                       run_id=11, options={})
    try:
        rs = RoundStream(1, expected_layout(recs[0]))
        slots = [link.issue_slot(f"r1-n{i}", 64 * MiB) for i in range(2)]
        landed = threading.Event()

        def hook(src):
            rs.on_landed(slots[0]["key"], src)
            landed.set()

        assert link.on_upload(slots[0], hook)  # the first lands and is folded at once
        for slot, p in zip(slots, payloads):
            S3ClientLink().upload(slot, p)
        assert landed.wait(20)
        eager = sum(n for _, n in fetched)
        size = payloads[0].size
        assert size <= eager <= size + 64 * 1024, (eager, size)  # headers: 32 x 256 B
        fetched.clear()
        acc = [Accepted(i, s["key"], p.digest, float(w), p.size)
               for i, (s, p, w) in enumerate(zip(slots, payloads, (1, 3)))]
        total, rejected = rs.settle(
            acc, lambda a: link.open_upload(slots[a.index], {"key": a.key}, a.size))
        assert rejected == {} and rs.eager_folds == 1 and rs.settle_folds == 1
        settled = sum(n for _, n in fetched)
        assert payloads[1].size <= settled <= payloads[1].size + 64 * 1024, settled
        got = total.mean()
        for name in recs[0]:
            want = (recs[0][name].numpy() + 3 * recs[1][name].numpy()) / 4
            np.testing.assert_allclose(got[name].numpy(), want, rtol=1e-6, atol=1e-6)
        # aggregation=ray: the ServerApp plans from the header bytes alone
        from flwr_transports.aggregation.ray_shards import RayRoundStream

        fetched.clear()
        with link.open_upload(slots[0], {"key": slots[0]["key"]}, size) as src:
            plan = RayRoundStream._plan_remote(src.remote)
        assert len(plan.arrays) == 32 and sum(n for _, n in fetched) <= 64 * 1024
        # the digest still decides: a reference that lies about it does not count
        rs2 = RoundStream(1, expected_layout(recs[0]))
        slot = link.issue_slot("r1-n9", 64 * MiB)
        S3ClientLink().upload(slot, payloads[0])
        lie = Accepted(0, slot["key"], payloads[1].digest, 1.0, payloads[0].size)
        total2, rejected2 = rs2.settle(
            [lie], lambda a: link.open_upload(slot, {"key": a.key}, a.size))
        assert total2 is None and "digest mismatch" in str(rejected2[0])
    finally:
        link.close()
    assert leftovers(s3, bucket) == ([], [])
