"""offload() + payload_mod with real strategies, real links and a real ClientApp.

The network between ServerApp and ClientApps is the in-process grid (tests/inproc.py);
the real Flower deployment is in tests/integration/.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from apps_inproc import initial_arrays, make_app
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
)
from inproc import InProcessGrid

from flwr_transports import offload, offload_grid
from flwr_transports.codec import encode
from flwr_transports.flower.wrapper import REJECTED_REPLY_CODE
from flwr_transports.refs import REF_ARRAY, REF_STYPE, is_ref_record


def _strategies():
    return {
        "fedavg": lambda: FedAvg(),
        "fedprox": lambda: FedProx(proximal_mu=0.1),
        "fedadam": lambda: FedAdam(eta=0.05),
        "dp-fixed": lambda: DifferentialPrivacyServerSideFixedClipping(
            FedAvg(), noise_multiplier=0.0, clipping_norm=1e6, num_sampled_clients=2),
    }


def _ftx_entries(root: str) -> list[str]:
    """The link objects of THIS process (other test runs may share /dev/shm)."""
    mine = f"ftx-{os.getpid()}-"
    return [e for e in os.listdir(root) if e.lstrip(".").startswith(mine)]


@pytest.fixture
def filedir(tmp_path):
    d = tmp_path / "payloads"
    d.mkdir()
    return str(d)


def _run(transport, strategy=None, grid=None, rounds=2, **opts):
    s = offload(strategy or FedAvg(), transport=transport, **opts)
    g = grid or InProcessGrid(make_app())
    res = s.start(g, initial_arrays(), num_rounds=rounds)
    return s, res


def _same(a: ArrayRecord, b: ArrayRecord):
    assert list(a.keys()) == list(b.keys())
    for x, y in zip(a.to_numpy_ndarrays(), b.to_numpy_ndarrays()):
        assert x.dtype == y.dtype and np.array_equal(x, y)


@pytest.mark.parametrize("name", list(_strategies()))
def test_same_aggregate_as_inband(name, filedir):
    before = set(_ftx_entries("/dev/shm"))
    ref_strategy = _strategies()[name]()
    _, base = _run("inband", ref_strategy)
    for transport in ("shm://", f"file://{filedir}"):
        # the transport changes no bit (streaming aggregation is compared in
        # tests/test_aggregation.py, within float rounding)
        s, res = _run(transport, _strategies()[name](), aggregation="inner")
        _same(base.arrays, res.arrays)
        assert s.stats["link_bytes_sent"] > 1_000_000
        assert s.stats["inband_bytes_sent"] < 50_000  # only references and tickets
        assert s.stats["link_bytes_received"] > 1_000_000
    assert set(_ftx_entries("/dev/shm")) == before
    assert _ftx_entries(filedir) == []


def test_messages_carry_reference_not_payload(filedir):
    grid = InProcessGrid(make_app())
    _run(f"file://{filedir}", grid=grid, rounds=1)
    train_msgs = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(train_msgs) == 2
    refs = [m.content["arrays"] for m in train_msgs]
    assert all(is_ref_record(r) for r in refs)
    assert refs[0] is refs[1]  # encoded and published ONCE for all nodes
    tickets = [json.loads(m.content["flwr_transports.ticket"]["ticket"]) for m in train_msgs]
    assert {t["node"] for t in tickets} == set(grid.node_ids)
    assert tickets[0]["id"] != tickets[1]["id"]


def test_small_records_stay_inband(filedir):
    s, res = _run(f"file://{filedir}", threshold="64MiB")
    assert s.stats["link_bytes_sent"] == 0 and s.stats["link_bytes_received"] == 0
    _, base = _run("inband")
    _same(base.arrays, res.arrays)


def test_client_without_mod_gets_clear_error(filedir):
    grid = InProcessGrid(make_app(with_mod=False))
    s = offload(FedAvg(), transport=f"file://{filedir}")
    replies = []
    orig = s.inner.aggregate_train

    def spy(rnd, reps):
        reps = list(reps)
        replies.extend(reps)
        return orig(rnd, reps)

    s.inner.aggregate_train = spy
    s.start(grid, initial_arrays(), num_rounds=1)
    assert replies and all(r.has_error() for r in replies)
    assert all("flwr_transports.payload_mod" in r.error.reason for r in replies)


# ---------------------------------------------------------------- hostile replies

def _ref_doc(rec: ArrayRecord) -> dict:
    return json.loads(rec[REF_ARRAY].data)


def _ref_rec(doc: dict) -> ArrayRecord:
    data = json.dumps(doc).encode()
    return ArrayRecord({REF_ARRAY: Array(dtype="uint8", shape=(len(data),), stype=REF_STYPE,
                                         data=data)})


def _tampered_run(tamper, transport, path="strategy", **opts):
    """Run 1 round where node 0's reply is tampered; return the offloader (its
    ``stats``), result, grid, errors. ``path``: through the strategy wrapper
    (``offload``) or the grid adapter (``offload_grid``): one machinery, same checks."""
    grid = InProcessGrid(make_app(), tamper=tamper)
    inner = FedAvg()
    errors = []
    orig = inner.aggregate_train

    def spy(rnd, reps):
        reps = list(reps)
        errors.extend(r for r in reps if r.has_error())
        return orig(rnd, reps)

    inner.aggregate_train = spy
    if path == "strategy":
        s = offload(inner, transport=transport, **opts)
        res = s.start(grid, initial_arrays(), num_rounds=1)
    else:
        with offload_grid(grid, transport, **opts) as s:
            res = inner.start(s, initial_arrays(), num_rounds=1)
    return s, res, grid, errors


def _spy_errors(s) -> list:
    errs: list = []
    orig = s.inner.aggregate_train

    def spy(rnd, reps):
        reps = list(reps)
        errs.extend(r for r in reps if r.has_error())
        return orig(rnd, reps)

    s.inner.aggregate_train = spy
    return errs


def _only_node1_result():
    """What FedAvg gives when only node 1 (partition 1) contributes."""
    return [(a + 0.5).astype(a.dtype) for a in initial_arrays().to_numpy_ndarrays()]


def _edit(field_fn):
    def tamper(node, reply):
        if node == 101 and reply.has_content() and is_ref_record(reply.content.get("arrays")):
            doc = _ref_doc(reply.content["arrays"])
            field_fn(doc, reply)
            reply.content["arrays"] = _ref_rec(doc)
        return reply
    return tamper


CASES = {
    "unknown-ticket": (lambda d, r: d.update(ticket="f" * 32), "never issued"),
    "no-ticket": (lambda d, r: [d.pop(k) for k in ("ticket", "slot", "key")], "no ticket"),
    "outside-root": (lambda d, r: d["loc"].update(path="/etc/passwd"), "outside the link's root"),
    "dotdot": (lambda d, r: d["loc"].update(path=d["loc"]["path"] + "/../../etc/passwd"),
               "outside the link's root"),
    "other-slot-path": (lambda d, r: d["loc"].update(path=d["loc"]["path"][:-4] + "beef"),
                        "not the location issued"),
    "size-above-cap": (lambda d, r: d.update(size=10**12), "above the cap"),
    "size-lie": (lambda d, r: d.update(size=d["size"] - 1), "bytes, the reference says"),
    "digest-mismatch": (lambda d, r: d.update(digest="sha256t:" + "0" * 64), "digest mismatch"),
    "bad-slot": (lambda d, r: d.update(slot=7), "slot"),
    "key-mismatch": (lambda d, r: d.update(key="other"), "sits at"),
    "bad-json-type": (lambda d, r: d.update(size="12"), "invalid size"),
    "bad-version": (lambda d, r: d.update(v=99), "codec version"),
}


@pytest.mark.parametrize("path", ["strategy", "grid"])
@pytest.mark.parametrize("case", list(CASES))
def test_rejected_reference_is_a_failed_reply(case, path, filedir):
    fn, msg = CASES[case]
    s, res, _, errors = _tampered_run(_edit(fn), f"file://{filedir}", path)
    assert len(errors) == 1 and errors[0].error.code == REJECTED_REPLY_CODE
    assert msg in errors[0].error.reason, errors[0].error.reason
    assert s.stats["replies_rejected"] == 1
    # the round went on with the honest node only
    for got, want in zip(res.arrays.to_numpy_ndarrays(), _only_node1_result()):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert _ftx_entries(filedir) == []


def test_reference_for_another_node_rejected(filedir):
    class SwapGrid(InProcessGrid):
        """Node 101 presents node 102's (valid) reference as its own."""

        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages, timeout=timeout)
            by_node = {r.metadata.src_node_id: r for r in replies}
            a, b = by_node.get(101), by_node.get(102)
            if a and b and a.has_content() and is_ref_record(b.content.get("arrays")):
                a.content["arrays"] = b.content["arrays"]
            return replies

    s = offload(FedAvg(), transport=f"file://{filedir}")
    errs = _spy_errors(s)
    s.start(SwapGrid(make_app()), initial_arrays(), num_rounds=1)
    assert len(errs) == 1 and "issued to node 102" in errs[0].error.reason


def test_stale_ticket_from_previous_round_rejected(filedir):
    stash = {}

    def tamper(node, reply):
        if node == 101 and reply.has_content() and is_ref_record(reply.content.get("arrays")):
            if "ref" not in stash:
                stash["ref"] = reply.content["arrays"]
            else:
                reply.content["arrays"] = stash["ref"]
        return reply

    grid = InProcessGrid(make_app(), tamper=tamper)
    s = offload(FedAvg(), transport=f"file://{filedir}")
    errs = _spy_errors(s)
    s.start(grid, initial_arrays(), num_rounds=2)
    assert len(errs) == 1 and "never issued" in errs[0].error.reason  # spent tickets are forgotten


def test_payload_changed_after_upload_is_caught(filedir):
    def tamper(node, reply):
        if node == 101 and reply.has_content() and is_ref_record(reply.content.get("arrays")):
            path = _ref_doc(reply.content["arrays"])["loc"]["path"]
            with open(path, "r+b") as f:  # same size, one byte flipped
                f.seek(-1, 2)
                b = f.read(1)
                f.seek(-1, 2)
                f.write(bytes([b[0] ^ 0xFF]))
        return reply

    # eager=false: the server reads the file only when the reply is processed, after
    # the change (with eager decoding it may have decoded the original already: see
    # test_eager_decode_keeps_the_bytes_that_match_the_claimed_digest)
    _, _, _, errors = _tampered_run(tamper, f"file://{filedir}?eager=false")
    assert len(errors) == 1 and "digest mismatch" in errors[0].error.reason


def test_eager_decode_keeps_the_bytes_that_match_the_claimed_digest(filedir):
    """A reply file is decoded as soon as it appears; a later change to the file
    cannot reach the record the server uses, and the record is used only if the
    bytes decoded match the digest the reply claims."""
    import time

    from flwr_transports.codec import check_digest
    from flwr_transports.links import client_link, server_link

    link = server_link(f"file://{filedir}", 5, {})
    try:
        rec = ArrayRecord([np.arange(50_000, dtype=np.float32)])
        payload = encode(rec)
        slot = link.issue_slot("r1-n1-s0", 1 << 20)
        loc = client_link("file").upload(slot, payload)
        deadline = time.monotonic() + 10
        while slot["path"] not in link._eager.results and time.monotonic() < deadline:
            time.sleep(0.01)
        link._eager.results[slot["path"]][1].result(10)  # decoded (not only queued)
        with open(slot["path"], "r+b") as f:  # changed after the server decoded it
            f.seek(-1, 2)
            f.write(b"\x00")
        with link.open_upload(slot, loc, payload.size) as src:
            arrays, got = src.predecoded()
        check_digest(got, payload.digest)
        np.testing.assert_array_equal(arrays.to_numpy_ndarrays()[0], np.arange(50_000))
        # an oversized file is not decoded eagerly (the slot's cap bounds the work)
        small = link.issue_slot("r1-n2-s0", 1024)
        client_link("file").upload(small, payload)
        deadline = time.monotonic() + 10  # until the watcher has seen (and skipped) it
        while small["path"] in link._eager.watch and time.monotonic() < deadline:
            time.sleep(0.01)
        assert small["path"] not in link._eager.watch
        assert small["path"] not in link._eager.results
        link.discard_slot(slot)
        link.discard_slot(small)
    finally:
        link.close()
    assert _ftx_entries(filedir) == []


def test_symlink_in_slot_refused(filedir):
    def tamper(node, reply):
        if node == 101 and reply.has_content() and is_ref_record(reply.content.get("arrays")):
            path = _ref_doc(reply.content["arrays"])["loc"]["path"]
            os.unlink(path)
            os.symlink("/etc/hostname", path)
        return reply

    _, _, _, errors = _tampered_run(tamper, f"file://{filedir}")
    assert len(errors) == 1 and "symbolic link" in errors[0].error.reason
    assert _ftx_entries(filedir) == []


def test_shm_name_outside_namespace_refused():
    def tamper(node, reply):
        if node == 101 and reply.has_content() and is_ref_record(reply.content.get("arrays")):
            doc = _ref_doc(reply.content["arrays"])
            doc["loc"]["name"] = "../etc/passwd"
            reply.content["arrays"] = _ref_rec(doc)
        return reply

    _, _, _, errors = _tampered_run(tamper, "shm://")
    assert len(errors) == 1 and "invalid shm:// segment name" in errors[0].error.reason


# ---------------------------------------------------------------- lifecycle / options

def test_everything_removed_when_run_raises(filedir):
    class Boom(InProcessGrid):
        calls = 0

        def send_and_receive(self, messages, *, timeout=None):
            Boom.calls += 1
            if Boom.calls == 3:  # round 2 train: payloads are published, then we crash
                list(messages)
                raise RuntimeError("grid died")
            return super().send_and_receive(messages, timeout=timeout)

    s = offload(FedAvg(), transport=f"file://{filedir}")
    with pytest.raises(RuntimeError, match="grid died"):
        s.start(Boom(make_app()), initial_arrays(), num_rounds=3)
    assert _ftx_entries(filedir) == []


@pytest.mark.parametrize("transport, kwargs, msg", [
    ("ftp://x", {}, "unknown transport scheme"),
    ("shm://?colour=blue", {}, "unknown option"),
    ("inband", {"mode": "600"}, r"transport 'inband': mode \(link options: none"),
    ("shm://", {"reply_slots": 99}, "reply_slots"),
])
def test_bad_configuration_fails_fast(transport, kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        offload(FedAvg(), transport=transport, **kwargs)


def test_wrapper_requires_message_api_strategy():
    with pytest.raises(TypeError, match="Message-API"):
        offload(object(), transport="shm://")


def test_url_options_and_kwargs(filedir):
    s = offload(FedAvg(), transport=f"file://{filedir}?threshold=2MiB&mode=640", reply_slots=1)
    assert s.threshold == 2 * 2**20 and s.reply_slots == 1
    assert s.link_options == {"mode": 0o640, "fsync": False, "eager": True}
    assert s.fraction_train == 1.0  # inner strategy attributes are visible


def test_wrapper_options_in_the_url_do_not_reach_the_link(filedir):
    """``shm://?threshold=...`` (as README documents) must run, not fail in the link."""
    s, _ = _run(f"file://{filedir}?threshold=1KiB&mode=600&reply_slots=1")
    assert s.threshold == 1024 and s.reply_slots == 1
    assert s.stats["link_bytes_sent"] > 1_000_000 and s.stats["replies_rejected"] == 0
    s, _res = _run("shm://?threshold=1KiB")
    assert s.stats["link_bytes_sent"] > 1_000_000


@pytest.mark.parametrize("transport", ["shm://", "file"])
def test_next_round_reuses_the_evaluate_payload(transport, filedir):
    """FedAvg's evaluate phase of round r and train phase of round r+1 send the same
    global model: it is published once for both (same bytes, same reference), and the
    aggregate is the in-band one."""
    url = f"file://{filedir}" if transport == "file" else transport
    grid = InProcessGrid(make_app())
    s, res = _run(url, grid=grid, rounds=3, aggregation="inner")  # bit identity
    _, base = _run("inband", rounds=3)
    _same(base.arrays, res.arrays)
    # 3 train + 3 evaluate phases, 3 distinct models sent after the initial one:
    # train 1 (initial), evaluate 1 = train 2, evaluate 2 = train 3, evaluate 3
    assert s.stats["link_publishes"] == 4
    assert s.stats["link_publishes_reused"] == 2
    # every phase still carried a reference (none fell back to in-band)
    sent = [m for m in grid.sent if "arrays" in m.content]
    assert len(sent) == 12 and all(is_ref_record(m.content["arrays"]) for m in sent)
    assert _ftx_entries(filedir) == []
    if transport == "shm://":
        assert _ftx_entries("/dev/shm") == []


def test_reuse_only_for_the_same_bytes(filedir):
    """A strategy whose model changes between evaluate and the next train round gets a
    fresh publish (nothing reused), and nothing is left behind."""

    class Shift(FedAvg):
        def configure_train(self, server_round, arrays, config, grid):
            nd = [a + np.float32(1.0) for a in arrays.to_numpy_ndarrays()]
            arrays = ArrayRecord(nd) if not hasattr(arrays, "keys") else ArrayRecord(
                dict(zip(arrays.keys(), [Array(x) for x in nd])))
            return super().configure_train(server_round, arrays, config, grid)

    s, _ = _run(f"file://{filedir}", strategy=Shift(), rounds=2)
    assert s.stats["link_publishes_reused"] == 0
    assert s.stats["link_publishes"] == 4
    assert _ftx_entries(filedir) == []
