"""Downlink delta (issue 25): the server sends the next global model as a delta against
the model a client kept; a client without it gets the full model. Exactness (fp32,
bf16), the decoder's checks against a hostile server, and real federations over
tcp:// (in process: real sockets, real payload_mod, real cache) with honest and
hostile references."""

from __future__ import annotations

import json
import logging
import os
import threading

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from inproc import InProcessGrid

from flwr_transports import codec as C
from flwr_transports import offload, payload_mod, trace
from flwr_transports.codec import PayloadError
from flwr_transports.codecs import Base, encode
from flwr_transports.codecs.wire import decode_delta
from flwr_transports.flower import cache as cache_mod
from flwr_transports.refs import DeltaRef, Reference, RefError, is_ref_record, parse_ref_record


def _bf16(x: np.ndarray) -> bytes:
    return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()


def _models(seed: int = 0) -> tuple[C.EncodedPayload, C.EncodedPayload]:
    """(base, new) raw payloads: fp32 and bf16 layers, a frozen one and trained ones."""
    rng = np.random.default_rng(seed)
    w = {k: rng.standard_normal(n).astype(np.float32) * 0.02
         for k, n in (("frozen", 60_000), ("fp32", 40_000), ("bf16", 50_000))}

    def rec(step: float) -> ArrayRecord:
        r = ArrayRecord()
        r["frozen"] = Array(w["frozen"])
        r["fp32"] = Array(w["fp32"] + np.float32(step) * 1e-3)
        r["bf16"] = Array(dtype="torch.bfloat16", shape=(50_000,), stype="torch.raw",
                          data=_bf16(w["bf16"] + np.float32(step) * 1e-3))
        return r

    return C.encode(rec(0.0)), C.encode(rec(1.0))


def _reader(b: bytes):
    mv = memoryview(b)
    return lambda off, n: bytes(mv[off: off + n])


def _file_base(p: C.EncodedPayload, data: bytes | None = None) -> Base:
    """The base as a client holds it: read on demand (as from its kept file)."""
    data = p.to_bytes() if data is None else data
    return Base.from_read(p.digest, _reader(data), len(data))


def test_delta_decodes_bit_identical_fp32_and_bf16():
    base, new = _models()
    wire = encode(new, "delta", base=Base.from_payload(base))
    full = encode(new, "lossless")
    assert wire.size < 0.8 * full.size  # the frozen layer costs nothing
    rec, got = decode_delta(_reader(wire.to_bytes()), wire.size, wire.digest,
                            base=_file_base(base), content=new.digest,
                            content_size=new.size, max_size=1 << 30)
    assert C.encode(rec).to_bytes() == new.to_bytes()  # every byte, bf16 included
    assert got.digest == new.digest and b"".join(got.segments) == new.to_bytes()
    assert rec["bf16"].dtype == "torch.bfloat16" and rec["bf16"].stype == "torch.raw"


def test_hostile_deltas_are_refused():
    base, new = _models()
    other, _ = _models(seed=1)
    wire = encode(new, "delta", base=Base.from_payload(base)).to_bytes()
    dig = C.hash_segments([wire])

    def dec(w=wire, d=dig, b=None, content=new.digest, size=new.size, cap=1 << 30):
        return decode_delta(_reader(w), len(w), d, base=b or _file_base(base),
                            content=content, content_size=size, max_size=cap)

    dec()  # the honest one decodes
    with pytest.raises(PayloadError, match="digest"):  # bytes on the wire changed
        dec(d="sha256t:" + "0" * 64)
    # coded against another base than the one its reference names (and the client holds)
    w2 = encode(new, "delta", base=Base.from_payload(other)).to_bytes()
    with pytest.raises(PayloadError, match="against base"):
        dec(w=w2, d=C.hash_segments([w2]))
    # a model the reference does not name, or of another size
    with pytest.raises(PayloadError, match="reference names"):
        dec(content=other.digest)
    with pytest.raises(PayloadError, match="reference names"):
        dec(size=new.size + 1)
    # not a delta: a lossless stream, a raw payload
    w3 = encode(new, "lossless").to_bytes()
    with pytest.raises(PayloadError, match="not 'delta'"):
        dec(w=w3, d=C.hash_segments([w3]))
    with pytest.raises(PayloadError, match="not an encoded stream"):
        dec(w=new.to_bytes(), d=new.digest)
    # the DECODED size is bounded (before anything is allocated for it)
    with pytest.raises(PayloadError, match="over the limit"):
        dec(cap=new.size - 1)
    # a base whose bytes are not what its name says (a changed kept file): the decoded
    # model misses its digest
    bad = bytearray(base.to_bytes())
    bad[-5] ^= 0xFF
    with pytest.raises(PayloadError, match="digest"):
        dec(b=_file_base(base, bytes(bad)))


def test_reference_delta_fields_round_trip_and_are_checked():
    d = DeltaRef(loc={"k": 1}, size=10, digest="sha256t:" + "a" * 64,
                 base="sha256t:" + "b" * 64, base_loc={"k": 0})
    ref = Reference(scheme="tcp", loc={}, size=5, digest="sha256t:" + "c" * 64,
                    codec="lossless", raw_digest="sha256t:" + "d" * 64, raw_size=99,
                    delta=d)
    back = Reference.from_json(ref.to_json())
    assert back.delta == d and (back.raw_digest, back.raw_size) == (ref.raw_digest, 99)
    doc = json.loads(ref.to_json())
    for mutate in (lambda x: x.pop("raw"),  # a delta must name the model it decodes to
                   lambda x: x["delta"].update(base="md5:00"),
                   lambda x: x["delta"].update(size=-1),
                   lambda x: x["delta"].update(size=True),
                   lambda x: x["delta"].update(base_loc="here"),
                   lambda x: x.update(delta=[1]),
                   lambda x: x["raw"].update(size="9")):
        bad = json.loads(json.dumps(doc))
        mutate(bad)
        with pytest.raises(RefError):
            Reference.from_json(json.dumps(bad).encode())
    raw = json.loads(ref.to_json())
    raw.pop("codec")  # a raw payload's raw digest is its own
    with pytest.raises(RefError, match="another raw digest"):
        Reference.from_json(json.dumps(raw).encode())
    raw["raw"] = {"digest": raw["digest"], "size": raw["size"]}
    assert Reference.from_json(json.dumps(raw).encode()).delta == d


def test_cache_base_is_bound_bounded_and_removed(tmp_path):
    c = cache_mod.PayloadCache(str(tmp_path / "cache"), node=3)
    base, _ = _models()
    c.keep_payload(base, "a" * 32)
    c.wait()
    assert c.use_base(base.digest, "b" * 32, 1 << 30, lambda b: 1) is None  # other binding
    assert c.use_base(base.digest, "a" * 32, base.size - 1, lambda b: 1) is None  # too big
    assert not (tmp_path / "cache").exists()  # refused: removed, directories tidied
    c.keep_payload(base, "a" * 32)
    c.wait()
    got = c.use_base(base.digest, "a" * 32, 1 << 30,
                     lambda b: (b.digest, b.reader.read(0, b.size)))
    assert got == (base.digest, base.to_bytes())
    assert not (tmp_path / "cache").exists()  # used: removed


# -- federations over tcp:// ----------------------------------------------------------
def _train(msg: Message, ctx) -> Message:
    """Fine-tuning: the body is frozen, the head moves."""
    pid = int(ctx.node_config["partition-id"])
    out = ArrayRecord()
    for k, a in msg.content["arrays"].items():
        x = a.numpy()
        out[k] = Array((x + (pid + 1) * 0.25).astype(x.dtype) if k == "head" else x)
    return Message(RecordDict({"arrays": out,
                               "metrics": MetricRecord({"num-examples": 10 * (pid + 1)})}),
                   reply_to=msg)


def _evaluate(msg: Message, ctx) -> Message:
    loss = float(sum(float(np.abs(a).sum()) for a in msg.content["arrays"].to_numpy_ndarrays()))
    return Message(RecordDict({"metrics": MetricRecord({"loss": loss, "num-examples": 1})}),
                   reply_to=msg)


def _app(hostile=None) -> ClientApp:
    app = ClientApp(mods=[hostile, payload_mod] if hostile else [payload_mod])
    app.train()(_train)
    app.evaluate()(_evaluate)
    return app


def _init() -> ArrayRecord:
    rng = np.random.default_rng(3)
    return ArrayRecord({"body": Array(rng.standard_normal(200_000).astype(np.float32)),
                        "head": Array(rng.standard_normal(10_000))})


def _federate(monkeypatch, tmp_path, tag: str, cache: str, hostile=None, codec="delta",
              url="tcp://127.0.0.1:0"):
    tdir = tmp_path / f"trace-{tag}"
    tdir.mkdir()
    monkeypatch.setenv(trace.ENV, str(tdir))
    monkeypatch.setenv(cache_mod.CACHE_ENV, cache)
    s = offload(FedAvg(), url, codec=codec, aggregation="inner", threshold=0)
    res = s.start(InProcessGrid(_app(hostile)), _init(), num_rounds=3)
    fetches = [e for e in trace.read_events(tdir) if e["ev"] == "fetch"]
    return s, res, fetches


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same federation without the cache (every fetch the full model), once."""
    with pytest.MonkeyPatch.context() as mp:
        _, res, fetches = _federate(mp, tmp_path_factory.mktemp("ref"), "off", "off")
    return res, fetches


def _same(a: ArrayRecord, b: ArrayRecord) -> None:
    assert list(a) == list(b)
    for k in a:
        assert bytes(a[k].data) == bytes(b[k].data), k


def _counts(fetches) -> tuple[int, int, int]:
    """(full fetches, delta fetches, cache hits)."""
    delta = sum(1 for e in fetches if e.get("delta"))
    hits = sum(1 for e in fetches if e.get("cached"))
    return len(fetches) - delta - hits, delta, hits


@pytest.fixture(scope="module")
def s3_bucket():
    """A bucket on moto's S3 server (tests/moto_store.py); its keys when the test ends."""
    import boto3
    from moto_store import moto_endpoint

    with moto_endpoint() as ep:
        s3 = boto3.client("s3", endpoint_url=ep, region_name="us-east-1")
        s3.create_bucket(Bucket="ftx-dd")
        yield (f"s3://ftx-dd/runs?endpoint_url={ep}",
               lambda: [o["Key"] for o in s3.list_objects_v2(Bucket="ftx-dd").get(
                   "Contents", [])])


from rdma_param import RDMA as _RDMA


@pytest.mark.parametrize("link", ["tcp", "s3", _RDMA])
def test_federation_sends_deltas_to_clients_that_kept_the_base(monkeypatch, tmp_path,
                                                               reference, link, request):
    """3 rounds, 2 nodes, train + evaluate: round 1 trains on the full model; each
    evaluate gets the new model as a delta against the trained-on one, each next train
    round takes that model from the cache. The model is bit-identical to a run without
    the cache (every fetch full), the downlink moved far fewer bytes, nothing is left
    (on the clients, and on the link: s3:// holds both objects of each publication;
    rdma:// runs over UCX as installed here, cma or tcp)."""
    ref_res, off = reference
    assert _counts(off) == (12, 0, 0)
    cdir = tmp_path / "cache"
    url, keys = {"tcp": ("tcp://127.0.0.1:0", None),
                 "rdma": ("rdma://127.0.0.1:0?chunk_size=256KiB", None)}.get(link) or \
        request.getfixturevalue("s3_bucket")
    s, res, on = _federate(monkeypatch, tmp_path, "on", str(cdir), url=url)
    _same(ref_res.arrays, res.arrays)
    assert _counts(on) == (2, 6, 4)
    assert s.stats["downlink_deltas"] == 3 and s.stats["replies_rejected"] == 0
    full = sum(e["bytes"] for e in off)
    moved = sum(e["bytes"] for e in on if not e.get("cached"))
    assert moved < 0.3 * full  # the frozen body costs (almost) nothing
    assert not cdir.exists()  # the last evaluate is not kept: every base was used
    assert keys is None or keys() == []
    assert not [t for t in threading.enumerate() if t.name.startswith("ftx-rdma")]


def _rewrite(change):
    """A hostile server: a mod before payload_mod changes the evaluate references."""

    def mod(msg: Message, ctx, call_next):
        if msg.metadata.message_type == "evaluate":
            c = msg.content
            for k, rec in list(c.items()):
                if is_ref_record(rec):
                    ref = parse_ref_record(rec)
                    if ref.delta is not None:
                        change(ref)
                        c[k] = ref.to_record()
        return call_next(msg, ctx)

    return mod


def _held_elsewhere(ref):
    ref.delta.base_loc = {**ref.delta.base_loc, "x": 1}  # another location: not bound


def _unheld(ref):
    ref.delta.base = "sha256t:" + "5" * 64


def _full_as_delta(ref):  # the full (lossless) stream where the delta should be
    ref.delta.loc, ref.delta.size, ref.delta.digest = ref.loc, ref.size, ref.digest


@pytest.mark.parametrize("change", [_unheld, _held_elsewhere, _full_as_delta])
def test_hostile_delta_falls_back_to_the_full_model(monkeypatch, tmp_path, caplog, change,
                                                    reference):
    """A delta against a base this client does not hold (another digest, or bound to
    another location) is never fetched; a delta that is not what its reference says is
    refused after the fetch (logged). Either way the client fetches the full model, and
    the run ends with the same model."""
    ref_res, _ = reference
    with caplog.at_level(logging.WARNING, logger="flwr_transports"):
        s, res, f = _federate(monkeypatch, tmp_path, "h", str(tmp_path / "c"),
                              hostile=_rewrite(change))
    _same(ref_res.arrays, res.arrays)
    assert s.stats["replies_rejected"] == 0
    full, delta, hits = _counts(f)
    assert (full, hits) == (8, 4)  # 2 train round 1 + 6 evaluate
    if change is _full_as_delta:
        assert delta == 6 and caplog.text.count("downlink delta not used") == 6
        assert "not 'delta'" in caplog.text
    else:
        assert delta == 0
    assert all(len(m) for m in res.evaluate_metrics_clientapp.values())
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("link", ["tcp", _RDMA])
def test_a_delta_size_that_lies_falls_back_to_the_full_model(monkeypatch, tmp_path, caplog,
                                                             link, reference):
    """The reference names the real delta's location with another size (7 bytes more
    for node 101, 7 less for node 102): the link refuses the read before any byte is
    used, the client logs it and fetches the full model. Same model, nothing kept, no
    reply rejected; over tcp:// and rdma:// (the server answers the size it holds)."""
    def lie(msg, ctx, call_next):
        if msg.metadata.message_type == "evaluate":
            for k, rec in list(msg.content.items()):
                if is_ref_record(rec):
                    ref = parse_ref_record(rec)
                    if ref.delta is not None:
                        ref.delta.size += 7 if msg.metadata.dst_node_id == 101 else -7
                        msg.content[k] = ref.to_record()
        return call_next(msg, ctx)

    ref_res, _ = reference
    url = {"tcp": "tcp://127.0.0.1:0", "rdma": "rdma://127.0.0.1:0?chunk_size=256KiB"}[link]
    with caplog.at_level(logging.WARNING, logger="flwr_transports"):
        s, res, f = _federate(monkeypatch, tmp_path, "size", str(tmp_path / "c"),
                              hostile=lie, url=url)
    _same(ref_res.arrays, res.arrays)
    assert _counts(f) == (8, 6, 4)  # each delta fetch refused, then the full model
    assert sum(1 for e in f if e.get("error")) == 6
    assert caplog.text.count("downlink delta not used") == 6
    assert "the reference says" in caplog.text
    assert s.stats["replies_rejected"] == 0 and len(res.evaluate_metrics_clientapp) == 3
    assert not (tmp_path / "c").exists()


def test_a_model_digest_that_misses_the_reference_fails_the_message(monkeypatch, tmp_path):
    """The reference names another model than the server sent: the delta decodes to
    something else (refused), the full model fetched instead is verified against the
    same digest (the client keeps it) and fails: the message fails with the reason, no
    model the reference does not name is used or kept."""
    def lie(ref):
        ref.raw_digest = "sha256t:" + "6" * 64
    s, res, f = _federate(monkeypatch, tmp_path, "lie", str(tmp_path / "c"),
                          hostile=_rewrite(lie))
    # every evaluate failed on both nodes (no metrics); training went on
    assert res.evaluate_metrics_clientapp == {}
    assert len(res.train_metrics_clientapp) == 3 and s.stats["replies_rejected"] == 0
    # each evaluate: the delta was fetched and refused, then the full model failed too
    assert _counts(f)[1] == 6 and sum(1 for e in f if e.get("error")) == 12
    assert not (tmp_path / "c").exists() or not any(
        n.endswith(".ftx") for _, _, fs in os.walk(tmp_path / "c") for n in fs)


def test_a_failed_background_delta_is_never_handed_out_again(monkeypatch, tmp_path, caplog,
                                                             s3_bucket):
    """s3://, publish=background: the upload of round 1's evaluate DELTA fails in the
    background (the full model goes up). Round 1's evaluate clients wait for it (the
    client's max_wait), fall back to the full model and train on it; round 2's train
    phase reuses the full model's publication but never hands out the failed delta again
    (a client that holds its base but not the model would wait for an object that never
    appears, every phase the publication is reused)."""
    from flwr_transports.links.s3 import S3ServerLink

    url, keys = s3_bucket
    real = S3ServerLink._upload_parts

    def failing(self, pname, *args):
        if pname == "r1-evaluate-0-d":
            raise RuntimeError("injected: the store refused the upload")
        return real(self, pname, *args)

    monkeypatch.setattr(S3ServerLink, "_upload_parts", failing)
    monkeypatch.setenv("FLWR_TRANSPORTS_MAX_WAIT", "1")
    monkeypatch.setenv(cache_mod.CACHE_ENV, str(tmp_path / "c"))
    rng = np.random.default_rng(4)
    # a frozen 2 MiB body and a 9.2 MiB head that training moves (float64: FedAvg's
    # dtype): the delta (~ 2/3 of the head) is > 5 MiB, so it goes up as a multipart
    # upload, in the background
    init = ArrayRecord({"body": Array(rng.standard_normal(1 << 18)),
                        "head": Array(rng.standard_normal(1_200_000))})
    grid = InProcessGrid(_app(), n_nodes=1)
    s = offload(FedAvg(min_available_nodes=1, min_train_nodes=1, min_evaluate_nodes=1),
                f"{url}&part_size=5MiB&publish=background", codec="delta",
                aggregation="inner", threshold=0)
    with caplog.at_level(logging.WARNING, logger="flwr_transports"):
        s.start(grid, init, num_rounds=2)
    refs = {"train": [], "evaluate": []}
    for m in grid.sent:
        for rec in m.content.values():
            if is_ref_record(rec):
                refs[m.metadata.message_type].append(parse_ref_record(rec))
    assert s.stats["downlink_deltas"] == 2  # r1 evaluate (failed), r2 evaluate
    assert "r1-evaluate-0-d failed" in caplog.text
    assert refs["evaluate"][0].delta is not None  # the one that failed
    assert "downlink delta not used" in caplog.text  # the client fell back
    # round 2 trains on round 1's evaluate model (reused), without the failed delta
    assert len(refs["train"]) == 2 and refs["train"][1].loc == refs["evaluate"][0].loc
    assert refs["train"][1].delta is None
    assert keys() == []


def test_a_delta_that_fails_to_compute_sends_the_full_model(monkeypatch, tmp_path, caplog,
                                                            reference):
    """tcp://: the server's delta encoder raises (not a refused layout: any error, as its
    worker threads re-raise it) for every model. The phase is not failed: each
    reference names no delta (so no client waits for one), every client that held the
    base fetches the full model at once, the failure is counted and logged once, and
    the run ends with the same model as without the cache."""
    from flwr_transports.codecs import downlink as downlink_mod

    real = downlink_mod.encode

    def failing(payload, codec, **kw):
        if codec == "delta":
            raise RuntimeError("injected: the delta encoder failed")
        return real(payload, codec, **kw)

    monkeypatch.setattr(downlink_mod, "encode", failing)
    ref_res, _ = reference
    with caplog.at_level(logging.WARNING, logger="flwr_transports"):
        s, res, f = _federate(monkeypatch, tmp_path, "fail", str(tmp_path / "c"))
    _same(ref_res.arrays, res.arrays)
    assert s.stats["downlink_deltas"] == 0 and s.stats["downlink_delta_failures"] == 3
    assert _counts(f) == (8, 0, 4)  # 2 train round 1 + 6 evaluate in full; no delta
    assert not any(e.get("error") for e in f)
    assert caplog.text.count("could not be computed") == 1
    assert "downlink delta not used" not in caplog.text  # nothing offered, nothing waited
    assert s.stats["replies_rejected"] == 0
    assert not (tmp_path / "c").exists()
