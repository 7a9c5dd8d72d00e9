"""Streaming aggregation (flwr_transports.aggregation) against Flower's own FedAvg.

Unit level: the fold of encoded payloads equals Flower's ``aggregate_arrayrecords``
over the same replies (every dtype FedAvg averages, arrays straddling the 16 MiB
digest windows), its digest is the codec's, fold order does not matter, a payload
rewritten while it is read is refused. Strategy level (real strategies, real links,
real ClientApps with payload_mod; the in-process grid stands in for the network):
streaming vs ``inner`` per strategy family with a rejected reply, an error reply, a
missing node and a weight that differs from the one claimed in the same round.
"""

from __future__ import annotations

import io
import json
import os
import random
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
)
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from inproc import InProcessGrid

from flwr_transports import offload, payload_mod
from flwr_transports.aggregation import (
    WEIGHT_META,
    Source,
    Unfoldable,
    WeightedSum,
    plan_payload,
    streaming_decision,
)
from flwr_transports.codec import PayloadError, encode
from flwr_transports.flower.wrapper import REJECTED_REPLY_CODE
from flwr_transports.refs import REF_ARRAY, REF_STYPE, is_ref_record

MiB = 1 << 20


# -- unit: the fold ------------------------------------------------------------------
def _record(seed: int, big: bool = False) -> ArrayRecord:
    r = np.random.default_rng(seed)
    arrs = {
        "odd": Array(r.integers(0, 255, size=(7 * MiB + 3) if big else 1001, dtype=np.uint8)),
        "w": Array(r.standard_normal((300 if big else 30, 1001)).astype(np.float32)),
        "fortran": Array(np.asfortranarray(r.standard_normal((50, 70)))),
        "half": Array(r.standard_normal(1001).astype(np.float16)),
        "int": Array(r.integers(-5, 5, size=33, dtype=np.int32)),
        "bool": Array(r.integers(0, 2, size=17).astype(bool)),
        "scalar": Array(np.array(3.5 + seed, dtype=np.float32)),
        "empty": Array(np.zeros((0, 3), dtype=np.float32)),
        "complex": Array((r.standard_normal(10) + 1j).astype(np.complex64)),
        "bigendian": Array(r.standard_normal(100).astype(">f4")),
        "f64": Array(r.standard_normal(2_000_001 if big else 2001)),
    }
    return ArrayRecord(arrs)


def _fold_all(records, weights, order=None):
    acc = None
    digests = []
    for i in order or range(len(records)):
        payload = encode(records[i], {WEIGHT_META: json.dumps(weights[i])})
        src = Source.from_bytes(payload.to_bytes())
        plan = plan_payload(src.read, src.size)
        assert plan.weight == weights[i]
        acc = acc or WeightedSum(plan)
        digests.append((acc.fold(src, plan, weights[i]), payload.digest))
    return acc.mean(), digests


def _flower(records, weights):
    contents = [RecordDict({"a": r, "m": MetricRecord({"num-examples": w})})
                for r, w in zip(records, weights)]
    return aggregate_arrayrecords(contents, "num-examples")


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    if a.size == 0:
        return 0.0
    scale = float(np.max(np.abs(a.astype(np.complex128))))
    return float(np.max(np.abs(a.astype(np.complex128) - b))) / max(scale, 1e-300)


@pytest.mark.parametrize("big", [False, True], ids=["small", "straddling-16MiB-windows"])
def test_fold_equals_flower_fedavg(big):
    records = [_record(s, big) for s in range(3)]
    weights = [10, 25, 7]
    want = _flower(records, weights)
    got, digests = _fold_all(records, weights)
    assert all(a == b for a, b in digests)  # digest of exactly the bytes folded
    assert list(got.keys()) == list(want.keys())
    for k in want:
        a, b = want[k].numpy(), got[k].numpy()
        assert (a.dtype, a.shape) == (b.dtype, b.shape), k
        assert got[k].dtype == want[k].dtype
        # same .npy header as Flower's Array(np.asarray(v)) writes
        assert got[k].data[:64] == want[k].data[:64], k
        tol = 1e-3 if a.dtype == np.float16 else 1e-6 if a.dtype in (np.float32,
                                                                     np.complex64) else 1e-13
        assert _max_rel(a, b) <= tol, (k, _max_rel(a, b))


def test_fold_order_does_not_matter():
    records = [_record(s) for s in range(4)]
    weights = [3, 1.5, 8, 2]
    a, _ = _fold_all(records, weights, [0, 1, 2, 3])
    b, _ = _fold_all(records, weights, [3, 1, 0, 2])
    for k in a:
        x, y = a[k].numpy(), b[k].numpy()
        assert _max_rel(x, y) <= (1e-3 if x.dtype == np.float16 else 1e-6), k


def _npy(bits: np.ndarray) -> bytes:
    bio = io.BytesIO()
    np.save(bio, bits)
    return bio.getvalue()


def _bf16(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float32).view(np.uint32) >> 16).astype("<u2")


def test_bfloat16_accumulates_in_float32_and_is_written_back():
    r = np.random.default_rng(3)
    vals = [r.standard_normal(5000).astype(np.float32) for _ in range(3)]
    weights = [1, 2, 5]
    recs = [ArrayRecord({"x": Array(dtype="bfloat16", shape=(5000,), stype="numpy.ndarray",
                                    data=_npy(_bf16(v)))}) for v in vals]
    got, _ = _fold_all(recs, weights)
    arr = got["x"]
    assert arr.dtype == "bfloat16" and arr.shape == (5000,)
    bits = np.load(io.BytesIO(arr.data))
    back = (bits.astype(np.uint32) << 16).view(np.float32)
    exact = sum(w * (_bf16(v).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
                for v, w in zip(vals, weights)) / sum(weights)
    assert np.max(np.abs(back - exact) / np.maximum(np.abs(exact), 1e-3)) <= 2 ** -8


class _Flipper(Source):
    """A source whose bytes change after the plan was made (a writer racing the fold)."""

    def __init__(self, buf: bytearray, at: int):
        self.buf, self.at, self.reads = buf, at, 0
        mv = memoryview(buf)
        super().__init__(len(buf), self._read)
        self._mv = mv

    def _read(self, off, n):
        self.reads += 1
        return bytes(self._mv[off:off + n])


def test_payload_rewritten_after_planning_is_refused():
    rec = _record(0)
    buf = bytearray(encode(rec, {WEIGHT_META: "2"}).to_bytes())
    src = _Flipper(buf, 0)
    plan = plan_payload(src.read, src.size)
    acc = WeightedSum(plan)
    # the writer changes the first array's .npy header (its descr) after the plan
    first = plan.arrays[0]
    i = bytes(buf).index(b"descr", first.start)
    buf[i + 9] ^= 0x01
    with pytest.raises(PayloadError, match="changed while it was being read"):
        acc.fold(src, plan, 2)
    assert acc.dirty


def test_unfoldable_payloads_are_named():
    rec = ArrayRecord({"raw": Array(dtype="float32", shape=(2,), stype="custom.raw",
                                    data=b"\0" * 8)})
    src = Source.from_bytes(encode(rec).to_bytes())
    with pytest.raises(Unfoldable, match="stype"):
        plan_payload(src.read, src.size)
    rec = ArrayRecord({"s": Array(np.array(["a", "b"]))})
    src = Source.from_bytes(encode(rec).to_bytes())
    with pytest.raises(Unfoldable, match="not averaged"):
        plan_payload(src.read, src.size)


def test_hostile_headers_are_payload_errors():
    payload = bytearray(encode(_record(1), {WEIGHT_META: "3"}).to_bytes())
    plan = plan_payload(Source.from_bytes(payload).read, len(payload))
    a = plan.arrays[1]
    bad = bytearray(payload)
    bad[a.start:a.start + 6] = b"XNUMPY"  # not a .npy file
    with pytest.raises(PayloadError):
        plan_payload(Source.from_bytes(bad).read, len(bad))
    with pytest.raises(PayloadError):
        plan_payload(Source.from_bytes(payload[:-1]).read, len(payload) - 1)


# -- policy ---------------------------------------------------------------------------
STREAMING = {
    "fedavg": lambda: FedAvg(),
    "fedprox": lambda: FedProx(proximal_mu=0.1),
    "fedavgm": lambda: FedAvgM(server_learning_rate=0.7, server_momentum=0.5),
    "fedadam": lambda: FedAdam(eta=0.05),
    "fedyogi": lambda: FedYogi(eta=0.05),
    "fedadagrad": lambda: FedAdagrad(eta=0.05),
}
INNER = {
    "fedmedian": lambda: FedMedian(),
    "fedtrimmedavg": lambda: FedTrimmedAvg(beta=0.2),
    "krum": lambda: Krum(num_malicious_nodes=0),
    "multikrum": lambda: MultiKrum(num_malicious_nodes=0, num_nodes_to_select=2),
    "bulyan": lambda: Bulyan(num_malicious_nodes=0),
    "qfedavg": lambda: QFedAvg(client_learning_rate=0.1),
    "dp-server-fixed": lambda: DifferentialPrivacyServerSideFixedClipping(
        FedAvg(), noise_multiplier=0.0, clipping_norm=1e6, num_sampled_clients=2),
}


@pytest.mark.parametrize("name", list(STREAMING) + list(INNER))
def test_auto_streams_exactly_the_weighted_mean_family(name):
    s = (STREAMING | INNER)[name]()
    ok, why = streaming_decision(s, "auto")
    assert ok == (name in STREAMING), why
    if name in INNER:
        with pytest.raises(ValueError, match="weighted-mean"):
            streaming_decision(s, "streaming")
    assert streaming_decision(s, "inner")[0] is False


def test_user_strategy_declares_compatibility():
    class Mine(FedAvg):
        def aggregate_train(self, server_round, replies):
            return super().aggregate_train(server_round, replies)

    assert not streaming_decision(Mine(), "auto")[0]
    Mine.streaming_aggregation = True
    assert streaming_decision(Mine(), "auto")[0]

    class NotMine(FedAvg):
        streaming_aggregation = False

    assert not streaming_decision(NotMine(), "auto")[0]
    with pytest.raises(ValueError):
        streaming_decision(FedAvg(), "fastest")


# -- strategy matrix, in process --------------------------------------------------------
def _initial() -> ArrayRecord:
    r = np.random.default_rng(42)
    return ArrayRecord({"w": Array(r.standard_normal((400, 700)).astype(np.float32)),
                        "b": Array(r.standard_normal(1000)),
                        "h": Array(r.standard_normal(3000).astype(np.float16)),
                        "steps": Array(np.arange(6, dtype=np.int64))})


def _app(mods=()) -> ClientApp:
    app = ClientApp(mods=[payload_mod, *mods])

    @app.train()
    def train(msg: Message, ctx) -> Message:
        pid = int(ctx.node_config["partition-id"])
        rnd = int(msg.content["config"]["server-round"])
        r = np.random.default_rng(1000 * rnd + pid)
        new = ArrayRecord({k: Array((v.numpy() + r.standard_normal(v.shape) * 0.1
                                     ).astype(v.numpy().dtype))
                           for k, v in msg.content["arrays"].items()})
        return Message(RecordDict({"arrays": new, "metrics": MetricRecord(
            {"num-examples": 10 * (pid + 1) + rnd, "loss": 1.0 / (pid + rnd),
             "acc": [0.5 + pid / 10, 0.25]})}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, ctx) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"loss": 1.0, "num-examples": 1})}),
                       reply_to=msg)

    return app


def _ref_doc(rec):
    return json.loads(rec[REF_ARRAY].data)


def _ref_rec(doc):
    data = json.dumps(doc).encode()
    return ArrayRecord({REF_ARRAY: Array(dtype="uint8", shape=(len(data),), stype=REF_STYPE,
                                         data=data)})


class FaultyGrid(InProcessGrid):
    """Round 2: node 101's reference lies about its digest (rejected), node 102's
    reply becomes an error AFTER its upload, node 103's reply is lost after its upload
    (a timed-out node), node 104 states another weight in-band than it claimed when
    uploading. Nodes run in ``order``; each reply waits ``settle`` s so the eager fold
    of its upload can happen first."""

    def __init__(self, app, n_nodes=6, order=None, settle=0.05, faulty=True):
        super().__init__(app, n_nodes=n_nodes)
        self.order, self.settle, self.faulty = order, settle, faulty
        self.round = 0
        self.stream = None  # () -> the wrapper's RoundStream of this round (streaming runs)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            self.round += 1
        ids = self.push_messages(messages)
        if self.order:
            ids = [ids[i] for i in self.order]
        out = []
        for n, mid in enumerate(ids, 1):
            reply = self._execute(self._pending.pop(mid))
            if reply.metadata.message_type == "train":
                self._wait_landed(n)
            node = reply.metadata.src_node_id
            if self.faulty and self.round == 2 and reply.metadata.message_type == "train":
                if node == 101:
                    doc = _ref_doc(reply.content["arrays"])
                    doc["digest"] = "sha256t:" + "0" * 64
                    reply.content["arrays"] = _ref_rec(doc)
                elif node == 102:
                    reply = _error_reply(reply)
                elif node == 103:
                    continue
                elif node == 104:
                    mr = reply.content["metrics"]
                    mr["num-examples"] = int(mr["num-examples"]) + 5
            out.append(reply)
        return out


    def _wait_landed(self, n: int) -> None:
        """Let the link see the upload land (and the stream fold it) before the reply is
        handed over, as happens in a deployment where Flower polls every few seconds."""
        stream = self.stream() if self.stream else None
        if stream is None:
            time.sleep(self.settle)
            return
        t0 = time.monotonic()
        while len(stream.landed) < n and time.monotonic() - t0 < 5:
            time.sleep(0.01)


def _error_reply(reply: Message) -> Message:
    from flwr.app import Error

    return Message(metadata=reply.metadata,
                   error=Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="boom"))


def _spy(strategy):
    """Record what the inner strategy's aggregate_train was given."""
    seen = []
    orig = strategy.aggregate_train

    def spy(rnd, replies):
        replies = list(replies)
        seen.append((rnd, sorted((m.metadata.src_node_id, m.has_error(),
                                  m.error.code if m.has_error() else None) for m in replies)))
        return orig(rnd, replies)

    strategy.aggregate_train = spy
    return seen


def _run(strategy, transport, aggregation, grid=None, rounds=2):
    random.seed(1234)  # Flower samples nodes at random: same reply order in every run
    s = offload(strategy, transport=transport, aggregation=aggregation)
    seen = _spy(s.inner)
    grid = grid or FaultyGrid(_app())
    if isinstance(grid, FaultyGrid):  # (file://?eager=false has no landing hook)
        grid.stream = lambda: (s._streams.get(grid.round)
                               if getattr(s.link, "_eager", True) is not None else None)
    res = s.start(grid, _initial(), num_rounds=rounds)
    return s, res, seen


def _ftx(root="/dev/shm"):
    """This process's link names (other processes on the machine have their own)."""
    mine = f"ftx-{os.getpid()}-"
    return {e for e in os.listdir(root) if e.lstrip(".").startswith(mine)}


def _compare(res_a, res_b, tol=1e-6):
    for k in res_a.arrays:
        a, b = res_a.arrays[k].numpy(), res_b.arrays[k].numpy()
        assert a.dtype == b.dtype and a.shape == b.shape, k
        # "h" starts as float16, which Flower's FedAvg sums IN float16 (the stream sums in
        # float32): a few float16 ulps apart, whatever a server step makes of it after
        t = (5e-2 if tol > 1e-6 else 1e-2) if k == "h" else tol
        assert _max_rel(a, b) <= t, (k, _max_rel(a, b))
    assert res_a.train_metrics_clientapp == res_b.train_metrics_clientapp
    assert res_a.evaluate_metrics_clientapp == res_b.evaluate_metrics_clientapp


@pytest.mark.parametrize("name", list(STREAMING))
def test_streaming_matches_inner_with_faults(name, tmp_path):
    before = _ftx()
    s_in, r_in, seen_in = _run(STREAMING[name](), "shm://", "inner")
    s_st, r_st, seen_st = _run(STREAMING[name](), "shm://", "streaming")
    assert s_st.streaming and not s_in.streaming
    assert s_st.stats["agg_streamed_rounds"] == 2
    # every upload (6 per round) was folded while the round was waiting for replies
    assert s_st.stats["agg_eager_folds"] == 12
    # round 2 folded uploads that do not count (digest lie, error reply, lost node) and
    # one with another weight than in-band: ONE rebuild from the link over the 3 that
    # count (node 104 with its in-band weight, as Flower uses it)
    assert s_st.stats["agg_rebuilds"] == 1 and s_st.stats["agg_settle_folds"] == 3
    assert seen_in == seen_st  # the inner strategy saw the same replies and failures
    codes = [c for _, e, c in seen_st[1][1] if e]
    assert sorted(codes) == sorted([REJECTED_REPLY_CODE, ErrorCode.CLIENT_APP_RAISED_EXCEPTION])
    assert len(seen_st[1][1]) == 5  # node 103 never replied
    assert s_in.stats["replies_rejected"] == s_st.stats["replies_rejected"] == 1
    # FedAdam & co. divide the change by its running RMS: rounding of the mean (1e-7)
    # comes out of the server step a few times larger
    _compare(r_in, r_st, tol=1e-5 if name in ("fedadam", "fedyogi", "fedadagrad") else 1e-6)
    assert _ftx() == before


@pytest.mark.parametrize("transport", ["file", "file-no-eager", "tcp"])
def test_streaming_on_other_links(transport, tmp_path):
    d = tmp_path / "links"
    d.mkdir()
    url = {"file": f"file://{d}", "file-no-eager": f"file://{d}?eager=false",
           "tcp": "tcp://127.0.0.1:0"}[transport]
    _, r_in, seen_in = _run(FedAvg(), url, "inner")
    s_st, r_st, seen_st = _run(FedAvg(), url, "auto")
    assert s_st.streaming
    if transport == "file-no-eager":  # no landing hook: folded when the replies arrive
        assert s_st.stats["agg_eager_folds"] == 0 and s_st.stats["agg_settle_folds"] >= 4
    else:
        assert s_st.stats["agg_eager_folds"] >= 1
    assert seen_in == seen_st
    _compare(r_in, r_st)
    assert list(d.iterdir()) == []


def test_landing_order_does_not_matter():
    results = []
    for order in ([0, 1, 2, 3, 4, 5], [5, 3, 1, 0, 4, 2]):
        _, res, _ = _run(FedAvg(), "shm://", "streaming",
                         grid=FaultyGrid(_app(), order=order, faulty=False))
        results.append(res)
    _, ref, _ = _run(FedAvg(), "shm://", "inner", grid=FaultyGrid(_app(), faulty=False))
    _compare(results[0], results[1])
    _compare(ref, results[1])


@pytest.mark.parametrize("name", ["fedmedian", "krum", "dp-server-fixed"])
def test_auto_keeps_inner_for_other_strategies(name):
    s = offload(INNER[name](), transport="shm://")
    assert not s.streaming and s.aggregation == "auto"
    s = offload(INNER[name](), transport="shm://?aggregation=inner")
    assert not s.streaming
    with pytest.raises(ValueError, match="weighted-mean"):
        offload(INNER[name](), transport="shm://", aggregation="streaming")


def test_replies_that_cannot_stream_take_the_inner_path():
    """Below the threshold the arrays stay in-band: the round goes to Flower's FedAvg."""
    random.seed(1234)
    s = offload(FedAvg(), transport="shm://", threshold="1GiB")
    res = s.start(FaultyGrid(_app(), faulty=False), _initial(), num_rounds=1)
    assert s.streaming and s.stats["agg_streamed_rounds"] == 0
    _, ref, _ = _run(FedAvg(), "shm://", "inner", grid=FaultyGrid(_app(), faulty=False),
                     rounds=1)
    _compare(ref, res, tol=0)


def test_strategy_not_using_the_mean_falls_back_to_decoded_replies():
    class Sneaky(FedAvg):
        """Declares compatibility but averages the arrays its own way."""

        streaming_aggregation = True

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            _, metrics = super().aggregate_train(server_round, replies)
            first = next(m for m in replies if not m.has_error())
            return first.content["arrays"], metrics

    s = offload(Sneaky(), transport="shm://")
    res = s.start(FaultyGrid(_app(), faulty=False), _initial(), num_rounds=1)
    # the arrays are the first reply's real arrays, not a placeholder
    assert res.arrays["w"].numpy().shape == (400, 700)
    assert s.stats["agg_streamed_rounds"] == 0

    class Peeks(FedAvg):
        """Declares compatibility but reads a reply's arrays."""

        streaming_aggregation = True

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            norms = [float(np.abs(m.content["arrays"]["w"].numpy()).sum()) for m in replies]
            arrays, metrics = super().aggregate_train(server_round, replies)
            metrics["norm"] = max(norms)
            return arrays, metrics

    random.seed(1234)
    s = offload(Peeks(), transport="shm://")
    res = s.start(FaultyGrid(_app(), faulty=False), _initial(), num_rounds=1)
    assert res.train_metrics_clientapp[1]["norm"] > 1000
    assert s.stats["agg_streamed_rounds"] == 0


def test_is_ref_record_placeholder_never_leaks():
    """The inner strategy's replies carry placeholders, never references."""
    seen = []

    class Look(FedAvg):
        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            seen.extend(is_ref_record(m.content["arrays"]) for m in replies
                        if not m.has_error())
            return super().aggregate_train(server_round, replies)

    Look.streaming_aggregation = True
    offload(Look(), transport="shm://").start(FaultyGrid(_app(), faulty=False), _initial(),
                                              num_rounds=1)
    assert seen and not any(seen)


def test_wrapper_options_in_the_url_do_not_reach_the_link(tmp_path):
    """``?aggregation=`` and ``?threshold=`` ride in the URL next to link options."""
    s = offload(FedAvg(), transport=f"file://{tmp_path}?aggregation=inner&threshold=512KiB"
                                     "&eager=false")
    assert not s.streaming and s.threshold == 512 * 1024
    assert s.link_options == {"mode": 0o600, "fsync": False, "eager": False}
    random.seed(1234)
    res = s.start(FaultyGrid(_app(), faulty=False), _initial(), num_rounds=1)
    assert s.stats["link_bytes_received"] > 0 and res.arrays["w"].numpy().shape == (400, 700)


def test_fold_from_a_store_reads_each_window_once():
    """A source with ranged reads only (s3://): headers, then one read per window."""
    records = [_record(s, big=True) for s in range(2)]
    weights = [1, 3]
    acc = None
    for rec, w in zip(records, weights):
        payload = encode(rec)
        mv = memoryview(payload.to_bytes())
        reads = []

        def read(off, n, mv=mv, reads=reads):
            reads.append(n)
            return bytes(mv[off:off + n])

        src = Source(len(mv), read)
        plan = plan_payload(read, len(mv))
        n_plan = len(reads)
        acc = acc or WeightedSum(plan)
        assert acc.fold(src, plan, w) == payload.digest
        assert len(reads) - n_plan == -(-len(mv) // (16 * MiB))
    got, want = acc.mean(), _flower(records, weights)
    assert _max_rel(want["w"].numpy(), got["w"].numpy()) <= 1e-6


def test_first_upload_with_another_layout_does_not_spoil_the_round():
    """Node 101 uploads FIRST with another layout (an extra array), then its reply is
    refused: its upload is never folded (the sum is laid out like the model the server
    sent, issue 21), the round is still streamed, with no rebuild."""

    def extra_mod(msg, ctx, call_next):  # runs inside payload_mod: before the upload
        reply = call_next(msg, ctx)
        if ctx.node_id == 101 and msg.metadata.message_type == "train":
            reply.content["arrays"]["extra"] = Array(np.zeros(10, dtype=np.float32))
        return reply

    class ExtraArrayGrid(FaultyGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = sorted(messages, key=lambda m: m.metadata.dst_node_id)
            out = super().send_and_receive(messages, timeout=timeout)
            for r in out:  # node 101's reply is then refused (its digest lies)
                if r.metadata.src_node_id == 101 and r.metadata.message_type == "train":
                    doc = _ref_doc(r.content["arrays"])
                    doc["digest"] = "sha256t:" + "1" * 64
                    r.content["arrays"] = _ref_rec(doc)
            return out

    grid = ExtraArrayGrid(_app([extra_mod]), faulty=False)
    s, res, _ = _run(FedAvg(), "shm://", "streaming", grid=grid, rounds=1)
    assert s.stats["replies_rejected"] == 1
    assert s.stats["agg_streamed_rounds"] == 1 and s.stats["agg_rebuilds"] == 0
    assert s.stats["agg_eager_folds"] == 5  # nodes 102-106: never 101's upload
    assert "extra" not in res.arrays


def test_uploads_with_headers_of_different_lengths_fold_exactly():
    """The weight is written in the payload header, so uploads of one round can have
    headers of different lengths (weight 9 vs 10**9): every array then starts at
    another offset. Each fold must use its own payload's offsets (it once used the
    first upload's: a shifted read, an honest reply rejected or a wrong sum)."""
    r = np.random.default_rng(0)
    recs = [ArrayRecord({"w": Array(r.standard_normal(1001).astype(np.float32)),
                         "b": Array(r.standard_normal(7))}) for _ in range(3)]
    weights = [10**9, 9, 123456]
    acc = None
    starts = set()
    for rec, w in zip(recs, weights, strict=True):
        buf = encode(rec, {WEIGHT_META: json.dumps(w)}).to_bytes()
        plan = plan_payload(lambda o, n, b=buf: b[o:o + n], len(buf))
        starts.add(plan.arrays[0].data_start)
        acc = acc or WeightedSum(plan)
        acc.fold(Source.from_bytes(buf), plan, w)
    assert len(starts) > 1  # the headers really differ in length
    got = acc.mean()
    want = aggregate_arrayrecords(
        [RecordDict({"a": rec, "m": MetricRecord({"n": w})})
         for rec, w in zip(recs, weights, strict=True)], "n")
    for k in want:
        np.testing.assert_allclose(got[k].numpy(), want[k].numpy(), rtol=1e-6)
