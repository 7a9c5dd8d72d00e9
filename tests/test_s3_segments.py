"""s3:// segmented replies (URL option ``segment``) against a real moto server.

A reply slot cut into segments, each its own multipart upload the ServerApp created:
the streaming fold reads a segment as soon as the client completed it, so when the
last segment lands only that one is left to fold. Hostile clients (a segment of the
wrong size, a missing, an extra segment, another slot's object, a size that lies) are
rejected and leave nothing in the bucket.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid

import boto3
import numpy as np
import pytest
from flwr.app import ArrayRecord
from moto_store import moto_endpoint as _moto

from flwr_transports.aggregation import WEIGHT_META
from flwr_transports.aggregation.round import Accepted, RoundStream
from flwr_transports.codec import decode, encode
from flwr_transports.links import s3_segments as seg
from flwr_transports.links import server_link
from flwr_transports.links.s3 import S3ClientLink
from flwr_transports.links.s3_http import HttpTransport, expand_urls
from flwr_transports.refs import RefError

sys.path.insert(0, os.path.dirname(__file__))

# moto round trips, ~18 s in all: run once in CI (not again in the oldest-Flower pass)
pytestmark = pytest.mark.slow

MiB = 2**20


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


def model(n: int, seed: int = 0, weight: float = 3.0) -> tuple[ArrayRecord, object]:
    """A float32 model of n elements plus a small array, with its weight in-band."""
    rng = np.random.default_rng(seed)
    rec = ArrayRecord([rng.standard_normal(n).astype(np.float32),
                       np.arange(7, dtype=np.float32)])
    return rec, encode(rec, {WEIGHT_META: json.dumps(weight)})


def link_url(bucket, endpoint, **opts) -> str:
    q = "&".join(f"{k}={v}" for k, v in {"endpoint_url": endpoint, "part_size": "5MiB",
                                         "segment": "5MiB", **opts}.items())
    return f"s3://{bucket}/seg?{q}"


class Gate:
    """A client HttpTransport that holds the completion of chosen segments until
    released (the test decides when a segment lands)."""

    def __init__(self, hold: set[int]):
        self.http = HttpTransport()
        self.hold = hold
        self.release = threading.Event()
        self.completed: list[tuple[int, float]] = []
        real = self.http.complete

        def complete(url, etags, what):
            j = int(what.split("segment ")[1].split("/")[0]) - 1 if "segment " in what else -1
            if j in self.hold:
                assert self.release.wait(30), "the test never released the segment"
            real(url, etags, what)
            self.completed.append((j, time.perf_counter()))

        self.http.complete = complete


def upload(slot, payload, http=None):
    c = S3ClientLink()
    if http is not None:
        c._http = http
    return c.upload(slot, payload)


# -- tests ------------------------------------------------------------------------------
def test_slot_is_segments_of_multipart_uploads(moto_endpoint, s3, bucket):
    """Each segment is its own multipart upload of whole parts (abortable: a
    discarded slot lets a late client create nothing), plus the size declaration;
    a discarded slot leaves no object and no upload."""
    link = server_link(link_url(bucket, moto_endpoint), run_id=1, options={})
    try:
        link.reply_hint = 12 * MiB  # the model published was 12 MiB (publish sets it)
        slot = link.issue_slot("r1-n1", 40 * MiB)
        assert "put" not in slot and "done" not in slot
        segs = slot["segments"]
        # 3 segments of one 5 MiB part for the 12 MiB a reply likely needs, the 4th
        # takes the rest of the cap (5 parts): 5 uploads, not one per part of the cap
        assert slot["part"] == 5 * MiB and segs["pps"] == 1
        assert [len(expand_urls(p)) for p in segs["put"]] == [1, 1, 1, 5]
        ups = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        assert sorted(u["Key"] for u in ups) == sorted(
            [seg.seg_key(slot["key"], j) for j in range(4)] + [seg.size_key(slot["key"])])
        # the client policy sees every URL it will request
        eps = S3ClientLink().endpoints(slot, upload=True)
        assert len(eps) == 8 + 4 + 2
        # a reply larger than expected fills the last segment with several parts
        rec, payload = model(5_500_000)  # ~21 MiB
        upload(slot, payload)
        with link.open_upload(slot, {"key": slot["key"]}, payload.size) as src:
            got = decode(src.read, payload.size, payload.digest)
        assert np.array_equal(got.to_numpy_ndarrays()[0], rec.to_numpy_ndarrays()[0])
        sizes = {o["Key"][-5:]: o["Size"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
        assert sizes["s0003"] == payload.size - 15 * MiB
        link.discard_slot(slot)
        link.wait_discarded()
        assert leftovers(s3, bucket) == ([], [])
        # a late client: every upload is aborted, nothing can be created any more
        with pytest.raises(Exception):  # noqa: B017 - NoSuchUpload from the store
            HttpTransport(retries=0).put(expand_urls(segs["put"][0])[0], b"x" * 10, "late")
        assert leftovers(s3, bucket) == ([], [])
    finally:
        link.close()
    assert leftovers(s3, bucket) == ([], [])


def test_a_large_upload_is_folded_segment_by_segment_before_the_last_lands(
        moto_endpoint, s3, bucket):
    """The fold reads every segment but the last while the last is held back by the
    client (it cannot have waited for the whole upload); after the last segment
    lands, the upload completes and the fold equals the exact weighted mean."""
    rec, payload = model(6_000_000)  # ~23 MiB: 5 segments of 5 MiB
    link = server_link(link_url(bucket, moto_endpoint), run_id=2, options={})
    link.reply_hint = payload.size  # as publishing the model would
    stream = RoundStream(1, expected=None)
    from flwr_transports.aggregation.layout import expected_layout

    stream.expected = expected_layout(rec)
    arrivals = []
    try:
        slot = link.issue_slot("r1-n1", 64 * MiB)
        last = -(-payload.size // (5 * MiB)) - 1

        def hook(src):
            arrivals.append(link._arrivals.get(slot["key"]))
            stream.on_landed("a", src)

        assert link.on_upload(slot, hook)
        gate = Gate({last})
        t = threading.Thread(target=upload, args=(slot, payload, gate.http))
        t.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # every segment but the last was read
            arr = arrivals[0] if arrivals else None
            if arr is not None and set(range(last)) <= arr.read_segments:
                break
            time.sleep(0.02)
        else:
            pytest.fail("the fold did not read the landed segments before the last one")
        assert last not in arr.landed and stream.landed["a"].status == "new"
        before_last = link.last_landed
        gate.release.set()
        t.join(30)
        assert gate.completed[-1][0] == last
        deadline = time.monotonic() + 30
        while stream.landed["a"].status == "new" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stream.landed["a"].status == "folded"
        # the upload counts as landed once its LAST segment landed (the tail's start)
        assert link.last_landed is not None and link.last_landed != before_last
        assert link.last_landed >= gate.completed[-1][1] - 0.01
        acc = Accepted(index=0, key="a", digest=payload.digest, weight=3.0, size=payload.size)
        total, rejected = stream.settle([acc], lambda a: link.open_upload(
            slot, {"key": slot["key"]}, a.size))
        assert rejected == {} and stream.eager_folds == 1 and stream.settle_folds == 0
        got = total.mean().to_numpy_ndarrays()
        for x, y in zip(got, rec.to_numpy_ndarrays()):
            np.testing.assert_allclose(x, y, rtol=1e-6)
    finally:
        link.close()
    assert leftovers(s3, bucket) == ([], [])


def test_two_uploads_fold_side_by_side(moto_endpoint, s3, bucket):
    """Two uploads arriving at once are folded concurrently (neither waits for the
    other's last segment) into one sum: the mean equals the exact weighted mean."""
    a_rec, a_pay = model(6_000_000, seed=1, weight=1.0)  # 5 segments, 2 fold windows
    b_rec, b_pay = model(6_000_000, seed=2, weight=3.0)
    link = server_link(link_url(bucket, moto_endpoint), run_id=3, options={})
    link.reply_hint = a_pay.size
    from flwr_transports.aggregation.layout import expected_layout

    stream = RoundStream(1, expected=expected_layout(a_rec))
    try:
        sa, sb = link.issue_slot("a", 64 * MiB), link.issue_slot("b", 64 * MiB)
        arr = {}
        for name, s in (("a", sa), ("b", sb)):
            def hook(src, name=name, s=s):
                arr[name] = link._arrivals.get(s["key"])
                stream.on_landed(name, src)
            assert link.on_upload(s, hook)
        ga, gb = Gate({4}), Gate({4})  # both hold their last segment
        ts = [threading.Thread(target=upload, args=(sa, a_pay, ga.http)),
              threading.Thread(target=upload, args=(sb, b_pay, gb.http))]
        for t in ts:
            t.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
                {"a", "b"} <= set(arr) and {0, 1, 2, 3} <= arr["a"].read_segments
                and {0, 1, 2, 3} <= arr["b"].read_segments):
            time.sleep(0.02)
        # both folds read all they could while neither upload had landed whole
        assert {0, 1, 2, 3} <= arr["a"].read_segments
        assert {0, 1, 2, 3} <= arr["b"].read_segments
        assert 4 not in arr["a"].landed and 4 not in arr["b"].landed
        ga.release.set()
        gb.release.set()
        for t in ts:
            t.join(30)
        acc = [Accepted(0, "a", a_pay.digest, 1.0, a_pay.size),
               Accepted(1, "b", b_pay.digest, 3.0, b_pay.size)]
        slots = {"a": sa, "b": sb}
        total, rejected = stream.settle(acc, lambda x: link.open_upload(
            slots[x.key], {"key": slots[x.key]["key"]}, x.size))
        assert rejected == {} and stream.eager_folds == 2 and stream.rebuilds == 0
        want = (a_rec.to_numpy_ndarrays()[0] * 1.0 + b_rec.to_numpy_ndarrays()[0] * 3.0) / 4
        np.testing.assert_allclose(total.mean().to_numpy_ndarrays()[0], want, rtol=1e-5,
                                   atol=1e-6)
    finally:
        link.close()
    assert leftovers(s3, bucket) == ([], [])


def _raw_client(slot):
    """The URLs of a segmented slot, for a hostile client that does its own thing."""
    segs, (size_put, size_done) = seg._parse(slot)
    return segs, size_put[0], size_done


def _put_segment(http, segs, j, data: bytes, part: int):
    urls, done = segs[j]
    etags = [http.put(urls[i], data[i * part:(i + 1) * part], "p", md5=False)
             for i in range(-(-len(data) // part))]
    http.complete(done, etags, "c")


@pytest.mark.parametrize("lie", ["short_segment", "missing_segment", "extra_segment",
                                 "other_slot", "size_lies"])
def test_hostile_segmented_uploads_are_rejected_and_leave_nothing(moto_endpoint, s3,
                                                                   bucket, lie):
    """A segment shorter than the size needs, a missing or an extra segment, segments
    put into another slot: the reply is rejected; a declared size that lies (the
    segments fit the reply) only spoils the early fold: the reply is folded from the
    store when it arrives, exactly. Nothing is left in the bucket."""
    rec, payload = model(3_000_000)  # ~11.4 MiB: segments of 5, 5, 1.4 MiB
    data = bytes(b"".join(bytes(s) for s in payload.segments))
    part = 5 * MiB
    link = server_link(link_url(bucket, moto_endpoint), run_id=4, options={})
    link.reply_hint = payload.size
    from flwr_transports.aggregation.layout import expected_layout

    stream = RoundStream(1, expected=expected_layout(rec))
    try:
        slot = link.issue_slot("victim", 32 * MiB)
        other = link.issue_slot("other", 32 * MiB)
        assert link.on_upload(slot, lambda src: stream.on_landed("v", src))
        http = HttpTransport(retries=0)
        target = other if lie == "other_slot" else slot
        segs, size_put, size_done = _raw_client(target)
        size = payload.size + (5 * MiB if lie == "size_lies" else 0)
        http.complete(size_done, [http.put(size_put, str(size).encode(), "s", md5=False)], "c")
        chunks = [data[j * part:(j + 1) * part] for j in range(3)]
        for j, c in enumerate(chunks):
            if lie == "missing_segment" and j == 1:
                continue
            if lie == "short_segment" and j == 0:
                c = c[:-1024]
            _put_segment(http, segs, j, c, part)
        if lie == "extra_segment":
            _put_segment(http, segs, 3, b"\0" * 1024, part)
        time.sleep(0.5)  # the watcher sees what landed
        if lie == "size_lies":  # the segments fit the reply: it counts, folded exactly
            total, rejected = stream.settle(
                [Accepted(0, "v", payload.digest, 3.0, payload.size)],
                lambda a: link.open_upload(slot, {"key": slot["key"]}, a.size))
            assert rejected == {} and stream.landed["v"].status == "failed"
            assert stream.settle_folds == 1
            np.testing.assert_allclose(total.mean().to_numpy_ndarrays()[0],
                                       rec.to_numpy_ndarrays()[0], rtol=1e-6)
            link.discard_slot(slot)
            link.discard_slot(other)
            link.wait_discarded()
            assert leftovers(s3, bucket) == ([], [])
            return
        with pytest.raises(RefError, match="segment"):
            link.open_upload(slot, {"key": slot["key"]}, payload.size)
        # the early fold (if it began) did not count: nothing folded that matches
        stream.close()
        st = stream.landed.get("v")
        assert st is None or st.status != "folded" or st.digest != payload.digest or (
            lie in ("other_slot", "extra_segment"))
        link.discard_slot(slot)
        link.discard_slot(other)
        link.wait_discarded()
        assert leftovers(s3, bucket) == ([], [])
    finally:
        link.close()
    assert leftovers(s3, bucket) == ([], [])


def test_settle_stops_waiting_for_a_segment_that_never_lands(moto_endpoint, s3, bucket):
    """A client that declared its size and uploaded part of its payload, then
    vanished: the round's close stops the fold at once (no wait for the URLs' life),
    its upload does not count, and the discarded slot leaves nothing."""
    rec, payload = model(3_000_000)
    data = bytes(b"".join(bytes(s) for s in payload.segments))
    link = server_link(link_url(bucket, moto_endpoint), run_id=5, options={})
    link.reply_hint = payload.size
    from flwr_transports.aggregation.layout import expected_layout

    stream = RoundStream(1, expected=expected_layout(rec))
    try:
        slot = link.issue_slot("gone", 32 * MiB)
        assert link.on_upload(slot, lambda src: stream.on_landed("g", src))
        http = HttpTransport(retries=0)
        segs, size_put, size_done = _raw_client(slot)
        http.complete(size_done, [http.put(size_put, str(payload.size).encode(), "s",
                                           md5=False)], "c")
        _put_segment(http, segs, 0, data[:5 * MiB], 5 * MiB)
        deadline = time.monotonic() + 10
        while "g" not in stream.inflight and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "g" in stream.inflight
        t0 = time.monotonic()
        total, _ = stream.settle([], lambda a: None)
        assert time.monotonic() - t0 < 5 and total is None
        assert stream.landed["g"].status == "failed"
        link.discard_slot(slot)
        link.wait_discarded()
        assert leftovers(s3, bucket) == ([], [])
    finally:
        link.close()
    assert leftovers(s3, bucket) == ([], [])


def test_encrypted_slots_stay_one_object(moto_endpoint, s3, bucket):
    rec, payload = model(1_000_000)
    link = server_link(link_url(bucket, moto_endpoint, encrypt="true"), run_id=6, options={})
    try:
        slot = link.issue_slot("e", 32 * MiB)
        assert "segments" not in slot and "put" in slot
        upload(slot, payload)
        with link.open_upload(slot, {"key": slot["key"]}, payload.size) as src:
            got = decode(src.read, payload.size, payload.digest)
        assert np.array_equal(got.to_numpy_ndarrays()[0], rec.to_numpy_ndarrays()[0])
    finally:
        link.close()
    assert leftovers(s3, bucket) == ([], [])


@pytest.mark.slow  # ~10 s: run once in CI, not again with the oldest Flower
def test_federation_with_hostile_replies_segmented(moto_endpoint, s3, bucket):
    """The wrapper end to end (six nodes, two rounds, in round 2 a reference that lies
    about its digest, an error reply, a lost reply, another weight in-band): with
    segmented slots every upload is folded while it arrives, what does not count is
    excluded exactly, and the result equals the inner strategy's."""
    from flwr.serverapp.strategy import FedAvg
    from test_aggregation import _compare, _run

    url = link_url(bucket, moto_endpoint).replace("/seg?", "/agg?")
    # the reference: the inner strategy on the same replies, one object per reply (the
    # slots' layout changes no bit of a reply)
    _, r_in, seen_in = _run(FedAvg(), url.replace("segment=5MiB", "segment=0"), "inner")
    s_st, r_st, seen_st = _run(FedAvg(), url, "streaming")
    assert s_st.stats["agg_streamed_rounds"] == 2
    assert s_st.stats["agg_eager_folds"] >= 10  # folded while they arrived
    assert s_st.stats["replies_rejected"] == 1
    assert seen_in == seen_st
    _compare(r_in, r_st)
    assert leftovers(s3, bucket) == ([], [])


@pytest.mark.slow  # ~10 s: run once in CI, not again with the oldest Flower
def test_federation_coded_replies_segmented(moto_endpoint, s3, bucket):
    """A codec's stream is decoded once all its segments landed (it cannot be read
    out of order), then folded: same model as in-band within rounding."""
    from test_s3_link import initial, run

    init = initial()
    want, _ = run("inband", init)
    got, stats = run(link_url(bucket, moto_endpoint), init, aggregation="streaming",
                     codec="lossless")
    assert stats["agg_streamed_rounds"] == 2 and stats["replies_rejected"] == 0
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * float(np.max(np.abs(b))))
    assert leftovers(s3, bucket) == ([], [])


def _payload(arrays, weight):
    rec = ArrayRecord(arrays)
    p = encode(rec, {WEIGHT_META: json.dumps(weight)})
    return rec, p, bytes(p.to_bytes())


def test_concurrent_sum_equals_one_fold_at_a_time():
    """Folds of several payloads at once into one concurrent sum (windows of each
    handed over as they 'land', interleaved by threads) give the serial sum's mean."""
    from flwr_transports.aggregation.fold import Source, WeightedSum
    from flwr_transports.aggregation.layout import plan_payload

    rng = np.random.default_rng(7)
    shapes = [(5_000_000,), (300, 41), (17,)]
    pays = [_payload([rng.standard_normal(s).astype(np.float32) for s in shapes]
                     + [rng.standard_normal(1000)], w) for w in (1.0, 2.5, 4.0)]
    serial = None
    for _, p, raw in pays:
        plan = plan_payload(Source.from_bytes(raw).read, len(raw))
        serial = serial or WeightedSum(plan)
        serial.fold(Source.from_bytes(raw), plan, plan.weight)
    conc = None
    lock = threading.Lock()
    errors = []

    def fold(raw):
        nonlocal conc
        try:
            plan = plan_payload(Source.from_bytes(raw).read, len(raw), predict=True)
            with lock:
                conc = conc or WeightedSum(plan, concurrent=True)
            src = Source.from_bytes(raw)
            src.wait = lambda off, n: time.sleep(0.001)  # windows handed over one by one
            conc.fold(src, plan, plan.weight)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    ts = [threading.Thread(target=fold, args=(raw,)) for _, _, raw in pays]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors and conc.total == serial.total == 7.5
    for a, b in zip(conc.mean().values(), serial.mean().values()):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_a_predicted_npy_header_that_lies_fails_the_fold():
    """An upload planned from its first bytes predicts each array's .npy header; an
    array whose header differs (Fortran order: same length, other bytes) is caught
    when its window is read: the early fold fails (the reply is then read again from
    the store when it arrives), nothing half-folded counts."""
    from flwr_transports.aggregation.fold import Source, WeightedSum
    from flwr_transports.aggregation.layout import plan_payload
    from flwr_transports.codec import PayloadError

    f = np.asfortranarray(np.arange(6_000_000, dtype=np.float32).reshape(3000, 2000))
    _, _, raw = _payload([f], 1.0)
    honest = plan_payload(Source.from_bytes(raw).read, len(raw))
    assert honest.arrays[0].fortran
    guessed = plan_payload(Source.from_bytes(raw).read, len(raw), predict=True)
    assert not guessed.arrays[0].fortran  # predicted C order: wrong, caught below
    s = WeightedSum(guessed, concurrent=True)
    with pytest.raises(PayloadError, match="changed"):
        s.fold(Source.from_bytes(raw), guessed, 1.0)
    assert s.dirty and s.folded == []


@pytest.mark.parametrize("declared", ["huge_object", "above_cap", "not_a_number"])
def test_an_invalid_declared_size_starts_no_early_fold(moto_endpoint, s3, bucket, declared):
    """The size object is the client's: a 6 MiB object of digits (the ServerApp reads
    at most 32 bytes of it), a size above the slot's cap (within its parts' room: one
    part more), or no number: no fold starts on landing (nothing read on the client's
    word); the reply is still read from the store when it arrives, exactly, and
    nothing is left in the bucket."""
    rec, payload = model(1_500_000)  # ~5.7 MiB: segments of 5 and 0.7 MiB
    data = bytes(b"".join(bytes(s) for s in payload.segments))
    link = server_link(link_url(bucket, moto_endpoint), run_id=7, options={})
    link.reply_hint = payload.size
    from flwr_transports.aggregation.layout import expected_layout

    stream = RoundStream(1, expected=expected_layout(rec))
    try:
        slot = link.issue_slot("sz", 16 * MiB)
        assert link.on_upload(slot, lambda src: stream.on_landed("v", src))
        http = HttpTransport(retries=0)
        segs, size_put, size_done = _raw_client(slot)
        body = {"huge_object": b"1" * (6 * MiB), "above_cap": str(16 * MiB + 1).encode(),
                "not_a_number": b" 5999999"}[declared]
        http.complete(size_done, [http.put(size_put, body, "s", md5=False)], "c")
        _put_segment(http, segs, 0, data[:5 * MiB], 5 * MiB)
        _put_segment(http, segs, 1, data[5 * MiB:], 5 * MiB)
        deadline = time.monotonic() + 2  # the watcher saw the size object (and refused it)
        while slot["key"] in link._hooks and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        assert slot["key"] not in link._hooks and "v" not in stream.landed
        assert slot["key"] not in link._arrivals
        total, rejected = stream.settle(
            [Accepted(0, "v", payload.digest, 3.0, payload.size)],
            lambda a: link.open_upload(slot, {"key": slot["key"]}, a.size))
        assert rejected == {} and stream.eager_folds == 0 and stream.settle_folds == 1
        np.testing.assert_allclose(total.mean().to_numpy_ndarrays()[0],
                                   rec.to_numpy_ndarrays()[0], rtol=1e-6)
        link.discard_slot(slot)
        link.wait_discarded()
        assert leftovers(s3, bucket) == ([], [])
    finally:
        link.close()
    assert leftovers(s3, bucket) == ([], [])
