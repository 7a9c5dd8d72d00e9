"""offload_grid(): offloading at the Grid, for any ServerApp (in-process; the real
deployment is in tests/integration/test_grid_app.py).

Checked: a custom main loop (push, pull in two batches, send_and_receive with a timeout
and a node that answers late) gives exactly the in-band results with the payloads on
the link and nothing left there; a late reply is rejected; strategies that override
start() and FDA work through the adapter (in both orders); the strategy matrix gives
the same models through the strategy wrapper and the grid adapter.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from flwr_transports import offload, offload_grid, payload_mod
from flwr_transports.flower.wrapper import REJECTED_REPLY_CODE, OffloadGrid
from flwr_transports.strategies import FDA, fda_mod

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import fda_demo as D  # noqa: E402
from apps_inproc import initial_arrays, make_app  # noqa: E402
from inproc import InProcessGrid  # noqa: E402


def _mine(root: str) -> list[str]:
    return [e for e in os.listdir(root) if e.lstrip(".").startswith(f"ftx-{os.getpid()}-")]


@pytest.fixture
def linkdir(tmp_path):
    d = tmp_path / "link"
    d.mkdir()
    return d


def _train_msgs(grid, arrays: ArrayRecord, rnd: int) -> list[Message]:
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": rnd})})
    # ONE RecordDict shared by every message: encoded and published once
    return [grid.create_message(content, "train", n, str(rnd)) for n in grid.get_node_ids()]


def _main_loop(grid, rounds: int = 2) -> tuple[list[list[np.ndarray]], list[float]]:
    """A hand-written ServerApp loop: push/pull in two batches, then send_and_receive."""
    arrays = initial_arrays()
    models, weights = [], []
    for rnd in range(1, rounds + 1):
        ids = list(grid.push_messages(_train_msgs(grid, arrays, rnd)))
        replies = list(grid.pull_messages(ids[:1])) + list(grid.pull_messages(ids[1:]))
        assert len(replies) == len(ids) and not any(r.has_error() for r in replies)
        replies.sort(key=lambda r: r.metadata.src_node_id)
        w = [r.content["metrics"]["num-examples"] for r in replies]
        nd = [r.content["arrays"].to_numpy_ndarrays() for r in replies]
        mean = [sum(x[i] * (wi / sum(w)) for x, wi in zip(nd, w, strict=True)).astype(
            nd[0][i].dtype) for i in range(len(nd[0]))]
        arrays = ArrayRecord(mean)
        models.append(mean)
        weights.append(sum(w))
        evals = list(grid.send_and_receive(
            [grid.create_message(RecordDict({"arrays": arrays}), "evaluate", n, str(rnd))
             for n in grid.get_node_ids()], timeout=60))
        assert len(evals) == len(ids) and not any(r.has_error() for r in evals)
    return models, weights


def test_custom_main_loop_is_identical_to_inband(linkdir):
    want, _ = _main_loop(InProcessGrid(make_app(with_mod=False), 3))
    before = set(_mine("/dev/shm"))
    for transport in ("shm://", f"file://{linkdir}", "tcp://127.0.0.1:0"):
        with offload_grid(InProcessGrid(make_app(), 3), transport) as grid:
            got, _ = _main_loop(grid)
            stats = dict(grid.stats)
        for g, w in zip(got, want, strict=True):
            for a, b in zip(g, w, strict=True):
                assert a.dtype == b.dtype and np.array_equal(a, b), transport
        model = initial_arrays().count_bytes()
        # per round: the model once for 3 train + once for 3 evaluate messages, 3 updates
        assert stats["link_bytes_sent"] >= 2 * 2 * model, (transport, stats)
        assert stats["link_bytes_received"] >= 2 * 3 * model * 0.99, (transport, stats)
        assert stats["inband_bytes_sent"] < 64 * 1024 and stats["replies_rejected"] == 0
        assert list(linkdir.iterdir()) == []
        assert set(_mine("/dev/shm")) == before


class _LateGrid(InProcessGrid):
    """Holds back node 102's replies from the first ``hold`` pulls (a slow node)."""

    def __init__(self, *a, hold: int = 10**9, **kw):
        super().__init__(*a, **kw)
        self.hold, self.held = hold, {}

    def pull_messages(self, message_ids):
        ids = list(message_ids)
        out = []
        for r in super().pull_messages(ids):
            if r.metadata.src_node_id == 102 and self.hold > 0:
                self.held[r.metadata.reply_to_message_id] = r
            else:
                out.append(r)
        self.hold -= 1
        if self.hold <= 0:
            out += [self.held.pop(i) for i in ids if i in self.held]
        return out


def test_timeout_leaves_the_slow_node_out_and_rejects_its_late_reply(linkdir):
    grid = _LateGrid(make_app(), 2)
    og = OffloadGrid(grid, f"file://{linkdir}")
    msgs = _train_msgs(og, initial_arrays(), 1)
    replies = list(og.send_and_receive(msgs, timeout=0.3))
    assert [r.metadata.src_node_id for r in replies] == [101]
    assert not replies[0].has_error() and "arrays" in replies[0].content
    assert list(linkdir.iterdir()) == []  # the slow node's upload slot was retired
    # the late reply turns up in a later pull: its ticket is gone, it is rejected
    grid.hold = 0
    late = list(og.pull_messages(list(grid.held)))
    assert len(late) == 1 and late[0].has_error()
    assert late[0].error.code == REJECTED_REPLY_CODE
    assert "never issued" in late[0].error.reason
    assert og.stats["replies_rejected"] == 1
    og.close()
    assert list(linkdir.iterdir()) == []


def test_pulls_spread_over_calls_keep_the_batch_open(linkdir):
    """A reply pulled in a later call is still accepted; the batch retires only when
    its last reply is in."""
    grid = _LateGrid(make_app(), 2, hold=3)
    with offload_grid(grid, f"file://{linkdir}") as og:
        ids = list(og.push_messages(_train_msgs(og, initial_arrays(), 1)))
        first = list(og.pull_messages(ids))
        assert [r.metadata.src_node_id for r in first] == [101]
        assert list(og.pull_messages(ids[1:])) == []  # still held back
        second = list(og.pull_messages(ids[1:]))
        assert [r.metadata.src_node_id for r in second] == [102]
        assert not second[0].has_error() and "arrays" in second[0].content
        assert og._open == {} and og.stats["replies_rejected"] == 0
    assert list(linkdir.iterdir()) == []


class _OwnLoop(FedAvg):
    """A strategy with its own start(): two plain FedAvg runs back to back."""

    def start(self, grid, initial_arrays, num_rounds=3, timeout=3600, **kw):
        first = FedAvg.start(self, grid, initial_arrays, num_rounds=1, timeout=timeout, **kw)
        return FedAvg.start(self, grid, first.arrays, num_rounds=num_rounds - 1,
                            timeout=timeout, **kw)


def test_strategy_that_overrides_start_goes_through_the_adapter(linkdir):
    ref = _OwnLoop().start(InProcessGrid(make_app(), 2), initial_arrays(), num_rounds=3)
    s = offload(_OwnLoop(), f"file://{linkdir}")
    got = s.start(InProcessGrid(make_app(), 2), initial_arrays(), num_rounds=3)
    for a, b in zip(got.arrays.to_numpy_ndarrays(), ref.arrays.to_numpy_ndarrays(),
                    strict=True):
        assert np.array_equal(a, b)
    assert s.stats["link_bytes_received"] >= 3 * 2 * initial_arrays().count_bytes() * 0.99
    assert list(linkdir.iterdir()) == []


@pytest.mark.parametrize("order", ["fda-over-grid", "offload-of-fda"])
def test_fda_through_the_adapter_in_either_order(order, linkdir):
    k = 3
    split = D.make_data(num_clients=k, per_client=200, dim=20, seed=5)
    init = D.init_params(dim=20, hidden=16, seed=5)

    def fda():
        return FDA(FedAvg(min_available_nodes=k, fraction_evaluate=0.0), threshold=0.0,
                   variant="linear")

    ref = fda().start(InProcessGrid(D.make_client_app(split, mods=[fda_mod]), k), init,
                      num_rounds=3)
    app = D.make_client_app(split, mods=[payload_mod, fda_mod])
    if order == "fda-over-grid":
        with offload_grid(InProcessGrid(app, k), f"file://{linkdir}", threshold=1) as og:
            got = fda().start(og, init, num_rounds=3)
            stats = dict(og.stats)
    else:
        s = offload(fda(), f"file://{linkdir}", threshold=1)
        got = s.start(InProcessGrid(app, k), init, num_rounds=3)
        stats = s.stats
    assert list(got.arrays.keys()) == list(ref.arrays.keys())
    for key in ref.arrays:
        assert np.array_equal(got.arrays[key].numpy(), ref.arrays[key].numpy()), key
    assert stats["link_bytes_received"] >= 3 * k * init.count_bytes() * 0.99
    assert list(linkdir.iterdir()) == []


STRATEGIES = {
    "fedavg": lambda: FedAvg(),
    "fedprox": lambda: FedProx(proximal_mu=0.1),
    "fedadam": lambda: FedAdam(eta=0.05),
}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_strategy_matrix_same_through_wrapper_and_adapter(name, linkdir):
    ref = STRATEGIES[name]().start(InProcessGrid(make_app(with_mod=False), 2),
                                   initial_arrays(), num_rounds=2)
    s = offload(STRATEGIES[name](), f"file://{linkdir}", aggregation="inner")
    via_wrapper = s.start(InProcessGrid(make_app(), 2), initial_arrays(), num_rounds=2)
    with offload_grid(InProcessGrid(make_app(), 2), f"file://{linkdir}") as og:
        via_grid = STRATEGIES[name]().start(og, initial_arrays(), num_rounds=2)
        grid_stats = dict(og.stats)
    for res in (via_wrapper, via_grid):
        for a, b in zip(res.arrays.to_numpy_ndarrays(), ref.arrays.to_numpy_ndarrays(),
                        strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b), name
        assert res.train_metrics_clientapp == ref.train_metrics_clientapp
    counts = ("inband_bytes_sent", "inband_bytes_received", "link_bytes_sent",
              "link_bytes_received", "replies_rejected")
    assert {k: s.stats[k] for k in counts} == {k: grid_stats[k] for k in counts}
    assert list(linkdir.iterdir()) == []


def test_adapter_refuses_double_wrapping_and_non_grids(linkdir):
    og = offload_grid(InProcessGrid(make_app(), 2), f"file://{linkdir}")
    with pytest.raises(TypeError, match="already wrapped"):
        offload_grid(og, "shm://")
    with pytest.raises(TypeError, match="Grid"):
        offload_grid(object(), "shm://")
    og.close()


def test_inband_adapter_is_a_pass_through():
    grid = InProcessGrid(make_app(), 2)
    with offload_grid(grid, "inband") as og:
        msgs = _train_msgs(og, initial_arrays(), 1)
        replies = list(og.send_and_receive(msgs, timeout=10))
    assert len(replies) == 2 and all("arrays" in r.content for r in replies)
    assert og.stats["link_bytes_sent"] == 0 and og.stats["inband_bytes_sent"] > 0
    assert og.stats["inband_bytes_received"] >= 2 * initial_arrays().count_bytes()


def test_offload_grid_never_offers_a_downlink_delta(tmp_path, monkeypatch):
    """codec=delta over tcp:// with each client's kept-payload cache on: a user's loop
    (train, then evaluate the new model, twice) through offload_grid gets the in-band
    models, its replies coded delta (the uplink codec works), but no downlink delta is
    ever offered: the wrapper cannot tell which push is the last (so clients could not
    be told to drop a kept base) nor which model each node holds (docs/codecs.md).
    Every reference names no delta and is not marked keep, every fetch is the full
    model, the server holds no downlink base and no client keeps anything."""
    from flwr_transports import trace
    from flwr_transports.flower import cache as cache_mod
    from flwr_transports.refs import TICKET_KEY, Ticket, is_ref_record, parse_ref_record

    tdir, cdir = tmp_path / "trace", tmp_path / "cache"
    tdir.mkdir()
    monkeypatch.setenv(trace.ENV, str(tdir))
    monkeypatch.setenv(cache_mod.CACHE_ENV, str(cdir))
    want, _ = _main_loop(InProcessGrid(make_app(with_mod=False), 2))
    inner = InProcessGrid(make_app(), 2)
    with offload_grid(inner, "tcp://127.0.0.1:0?codec=delta", threshold=0) as grid:
        assert grid._downlink is None  # nothing to offer from, no base held
        got, _ = _main_loop(grid)
        stats = dict(grid.stats)
    for g, w in zip(got, want, strict=True):
        for x, y in zip(g, w, strict=True):
            assert x.dtype == y.dtype and np.array_equal(x, y)
    refs = [parse_ref_record(rec) for m in inner.sent for rec in m.content.values()
            if is_ref_record(rec)]
    assert len(refs) == 8  # 2 rounds x (train + evaluate) x 2 nodes
    assert all(r.delta is None and not r.keep and r.codec == "lossless" for r in refs)
    assert all(Ticket.from_record(m.content[TICKET_KEY]).codec == "delta"
               for m in inner.sent)  # replies coded delta against the model received
    assert stats["downlink_deltas"] == 0 and stats["replies_rejected"] == 0
    fetches = [e for e in trace.read_events(tdir) if e["ev"] == "fetch"
               and e.get("role") == "client"]
    assert len(fetches) == 8 and not any(e.get("delta") or e.get("cached") for e in fetches)
    assert not cdir.exists() or not any(f.endswith(".ftx") for _, _, fs in os.walk(cdir)
                                        for f in fs)
