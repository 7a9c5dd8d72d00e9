"""FDA strategy + fda_mod, in process.

The network is replaced by InProcessGrid (a test double of SuperLink/SuperNodes that
serializes every message and keeps one persistent Context per node); the strategy, the
mod and the user's ClientApp are the real ones.
"""

from __future__ import annotations

import itertools
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg, FedProx

from flwr_transports.strategies import FDA, fda_mod
from flwr_transports.strategies import fda_protocol as P
from flwr_transports.testing import InProcessGrid
from flwr_transports.testing import set_task_identity as ensure_task_identity

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import fda_demo as D  # noqa: E402 - the demo task lives with the FDA benchmark

logging.getLogger("flwr").setLevel(logging.WARNING)

K = 4


@pytest.fixture(scope="module")
def split():
    return D.make_data(num_clients=K, per_client=300, dim=20, seed=3)


def _init():
    return D.init_params(dim=20, hidden=16, seed=3)


def _eval_fn(split):
    return lambda rnd, arrays: MetricRecord({"acc": D.accuracy(arrays, *split.test)})


def _same(a: ArrayRecord, b: ArrayRecord) -> bool:
    return list(a.keys()) == list(b.keys()) and all(
        np.array_equal(a[k].numpy(), b[k].numpy()) for k in a
    )


@pytest.mark.parametrize("variant", ["naive", "linear", "sketch"])
@pytest.mark.parametrize("inner_cls", [FedAvg, FedProx])
def test_theta_zero_is_exactly_fedavg(split, variant, inner_cls):
    rounds = 4
    g1 = InProcessGrid(D.make_client_app(split, mods=[fda_mod]), K)
    ref = inner_cls(min_available_nodes=K).start(
        g1, _init(), num_rounds=rounds, evaluate_fn=_eval_fn(split)
    )
    g2 = InProcessGrid(D.make_client_app(split, mods=[fda_mod]), K)
    fda = FDA(inner_cls(min_available_nodes=K), threshold=0.0, variant=variant, sketch_width=64)
    res = fda.start(g2, _init(), num_rounds=rounds, evaluate_fn=_eval_fn(split))

    assert _same(ref.arrays, res.arrays)
    assert ref.evaluate_metrics_serverapp == res.evaluate_metrics_serverapp
    assert ref.evaluate_metrics_clientapp == res.evaluate_metrics_clientapp
    for rnd, metrics in ref.train_metrics_clientapp.items():
        assert metrics["train_loss"] == res.train_metrics_clientapp[rnd]["train_loss"]
        assert res.train_metrics_clientapp[rnd]["fda.sync"] == 1
    assert fda.stats["syncs"] == rounds and fda.stats["steps"] == rounds
    # the model got better than the initial one (a real learning task)
    assert res.evaluate_metrics_serverapp[rounds]["acc"] > res.evaluate_metrics_serverapp[0]["acc"]


def test_no_sync_keeps_local_models_and_equals_local_sgd(split):
    """Theta = inf: clients keep training their own model; one final average."""
    steps, local_steps, lr = 5, 3, 0.1
    grid = InProcessGrid(D.make_client_app(split, local_steps=local_steps, lr=lr), K)
    grid.app = D.make_client_app(split, local_steps=local_steps, lr=lr, mods=[fda_mod])
    fda = FDA(FedAvg(min_available_nodes=K, fraction_evaluate=0.0), threshold=1e30, variant="naive")
    res = fda.start(grid, _init(), num_rounds=steps)

    # reference: every client runs `steps` train calls from the initial model, then average
    models, weights = [], []
    for pid, (x, y) in enumerate(split.parts):
        p = D.from_record(_init())
        for rnd in range(1, steps + 1):
            p, _ = D.train_steps(p, x, y, local_steps, 32, lr, np.random.default_rng([0, pid, rnd]))
        models.append(p)
        weights.append(len(x))
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    for key in D.KEYS:
        expect = sum(wi * m[key] for wi, m in zip(w, models, strict=True))
        np.testing.assert_allclose(res.arrays[key].numpy(), expect, rtol=1e-5, atol=1e-6)

    # drift grows monotonically without syncs; exactly one (final) sync
    estimates = [h["estimate"] for h in fda.history]
    assert all(b > a for a, b in itertools.pairwise(estimates))
    assert fda.stats["syncs"] == 1
    assert [h["sync"] for h in fda.history] == [0] * steps
    assert fda.history[-1]["final_sync"] == 1
    # the mod's node state holds the local model (not the global one) between steps
    for node, ctx in grid.contexts.items():
        assert P.NODE_LOCAL in ctx.state and P.NODE_BASE in ctx.state
        assert not _same(ctx.state[P.NODE_LOCAL], ctx.state[P.NODE_BASE]), node


def test_bytes_accounting(split):
    steps = 6
    grid = InProcessGrid(D.make_client_app(split, mods=[fda_mod]), K)
    fda = FDA(
        FedAvg(min_available_nodes=K, fraction_evaluate=0.0),
        threshold=1e30,
        variant="naive",
        final_sync=False,
    )
    res = fda.start(grid, _init(), num_rounds=steps)
    model_bytes = _init().count_bytes()
    st = fda.stats
    assert st["syncs"] == 0 and st["sync_bytes_up"] == 0 and st["sync_bytes_down"] == 0
    # step 1 broadcasts the initial model to every node; later steps only tiny configs
    assert fda.history[0]["monitor_bytes_down"] >= K * model_bytes
    for h in fda.history[1:]:
        assert h["monitor_bytes_down"] < K * 400
    for h in fda.history:
        assert h["monitor_bytes_up"] < K * 120  # sqnorm + user metrics only
    assert st["bytes_down"] == sum(h["bytes_down"] for h in fda.history)
    assert st["bytes_up"] == sum(h["bytes_up"] for h in fda.history)
    assert (
        res.train_metrics_clientapp[steps]["fda.total-bytes"] == st["bytes_down"] + st["bytes_up"]
    )
    # a model that only changes at syncs: no sync, so the initial model is returned
    assert _same(res.arrays, _init())

    # with Theta = 0 every step moves the whole model up and down: >= 2 K model sizes
    fda0 = FDA(FedAvg(min_available_nodes=K, fraction_evaluate=0.0), threshold=0.0, variant="naive")
    fda0.start(
        InProcessGrid(D.make_client_app(split, mods=[fda_mod]), K), _init(), num_rounds=steps
    )
    per_step = [h["bytes_down"] + h["bytes_up"] for h in fda0.history]
    assert all(b >= 2 * K * model_bytes for b in per_step)
    # a monitoring step (after the initial broadcast) costs < 10% of a FedAvg round here,
    # even with this tiny 2 KB model
    for h in fda.history[1:]:
        assert h["bytes_down"] + h["bytes_up"] < 0.1 * min(per_step)


@pytest.mark.parametrize("variant", ["naive", "linear", "sketch"])
def test_threshold_triggers_sync_and_reset(split, variant):
    grid = InProcessGrid(D.make_client_app(split, mods=[fda_mod]), K)
    fda = FDA(
        FedAvg(min_available_nodes=K, fraction_evaluate=0.0),
        threshold=1.0,
        variant=variant,
        sketch_width=64,
    )
    res = fda.start(grid, _init(), num_rounds=12, evaluate_fn=_eval_fn(split))
    syncs = [h["sync"] for h in fda.history]
    assert 0 < sum(syncs) < 12, syncs
    for h in fda.history:
        if h["sync"]:
            assert h["estimate"] > 1.0
        else:
            assert h["estimate"] <= 1.0
    # after a sync the drift restarts from the new global model: the estimate drops
    for i, h in enumerate(fda.history[:-1]):
        if h["sync"]:
            assert fda.history[i + 1]["estimate"] < h["estimate"]
    assert (
        res.evaluate_metrics_serverapp[max(res.evaluate_metrics_serverapp)]["acc"]
        > res.evaluate_metrics_serverapp[0]["acc"]
    )


def test_linear_xi_is_direction_of_last_global_update(split):
    grid = InProcessGrid(D.make_client_app(split, mods=[fda_mod]), K)
    fda = FDA(
        FedAvg(min_available_nodes=K, fraction_evaluate=0.0),
        threshold=0.0,
        variant="linear",
        final_sync=False,
    )
    res1 = fda.start(grid, _init(), num_rounds=1)
    # one more step so that the mod receives (and resets to) the new global model
    fda.final_sync = False
    fda.threshold = 1e30
    fda.start(grid, res1.arrays, num_rounds=1)  # new run on the same nodes: broadcast
    delta = P.flatten(res1.arrays) - P.flatten(_init())
    xi_expect = delta / np.linalg.norm(delta)
    for ctx in grid.contexts.values():
        xi = next(iter(ctx.state[P.NODE_XI].values())).numpy()
        np.testing.assert_allclose(xi, xi_expect, rtol=1e-4, atol=1e-6)


def test_adaptive_threshold_calibrates_from_one_step_variance(split):
    grid = InProcessGrid(D.make_client_app(split, mods=[fda_mod]), K)
    fda = FDA(
        FedAvg(min_available_nodes=K, fraction_evaluate=0.0),
        threshold=0.0,
        variant="naive",
        adaptive=True,
        adaptive_rho=4.0,
        adaptive_beta=0.5,
    )
    fda.start(grid, _init(), num_rounds=12)
    h = fda.history
    # Theta <= 0 + adaptive: the first step calibrates Theta = rho * v1 (no sync at step 1)
    assert h[0]["threshold"] == pytest.approx(4.0 * h[0]["estimate"])
    assert h[0]["sync"] == 0
    syncs = [i for i, x in enumerate(h) if x["sync"]]
    assert syncs and len(syncs) < 12
    # after a sync, the next step's estimate recalibrates Theta by the EMA rule
    i = syncs[0] + 1
    expect = 0.5 * h[i - 1]["threshold"] + 0.5 * 4.0 * h[i]["estimate"]
    assert h[i]["threshold"] == pytest.approx(expect)


# --------------------------------------------------------------------------- hostile input
def _ctx(node=5):
    return Context(
        run_id=1, node_id=node, node_config={"partition-id": 0}, state=RecordDict(), run_config={}
    )


def _msg(cfg: dict, arrays: ArrayRecord | None = None, node=5):
    ensure_task_identity()
    content = RecordDict({"config": ConfigRecord(cfg)})
    if arrays is not None:
        content["arrays"] = arrays
    m = Message(content, dst_node_id=node, message_type=MessageType.TRAIN)
    m.metadata.__dict__["_message_id"] = "x1"
    return m


def _echo_train(msg, ctx):
    arrays = msg.content["arrays"]
    new = ArrayRecord({k: Array(v.numpy() + 1.0) for k, v in arrays.items()})
    return Message(
        RecordDict({"arrays": new, "metrics": MetricRecord({"num-examples": 3})}), reply_to=msg
    )


def test_mod_rejects_bad_protocol_input():
    model = ArrayRecord({"w": Array(np.zeros(4, dtype=np.float32))})
    ctx = _ctx()
    bad = [
        {P.PHASE: "explode"},
        {P.PHASE: "monitor", P.VARIANT: "nope"},
        {P.PHASE: "sync"},  # before any training
        {P.PHASE: "monitor", P.VARIANT: "sketch", P.SKETCH_WIDTH: 10**9},
        {P.PHASE: "monitor", P.VARIANT: "sketch", P.SKETCH_DEPTH: "5"},
    ]
    for cfg in bad:
        reply = fda_mod(_msg(cfg, model), ctx, _echo_train)
        assert reply.has_error(), cfg
    # monitoring before any global model
    assert fda_mod(_msg({P.PHASE: "monitor"}, ArrayRecord()), _ctx(), _echo_train).has_error()
    # a reset with a model of a different layout
    ok = fda_mod(_msg({P.PHASE: "monitor"}, model), ctx, _echo_train)
    assert not ok.has_error() and ok.content[P.STATE][P.SQNORM] == pytest.approx(4.0)
    other = ArrayRecord({"w": Array(np.zeros(5, dtype=np.float32))})
    # a new global model of another layout resets the node (a new model family)
    assert not fda_mod(
        _msg({P.PHASE: "monitor", P.VARIANT: "linear"}, other), ctx, _echo_train
    ).has_error()
    assert ctx.state[P.NODE_BASE]["w"].numpy().shape == (5,)
    # ... but a PREV that does not match the new global is rejected
    prev_bad = _msg({P.PHASE: "monitor", P.VARIANT: "linear"}, model)
    prev_bad.content[P.PREV] = other
    bad = fda_mod(prev_bad, ctx, _echo_train)
    assert bad.has_error() and "prev" in bad.error.reason.lower()
    # the reset phase is gone: the server never sent it
    assert fda_mod(_msg({P.PHASE: "reset"}, model), ctx, _echo_train).has_error()


def test_mod_passes_through_non_fda_messages():
    model = ArrayRecord({"w": Array(np.zeros(4, dtype=np.float32))})
    ctx = _ctx()
    reply = fda_mod(_msg({"lr": 0.1}, model), ctx, _echo_train)
    assert np.array_equal(reply.content["arrays"]["w"].numpy(), np.ones(4, dtype=np.float32))
    assert len(ctx.state) == 0


def test_mod_keeps_state_and_sync_returns_local_model():
    model = ArrayRecord({"w": Array(np.zeros(4, dtype=np.float32))})
    ctx = _ctx()
    fda_mod(_msg({P.PHASE: "monitor", "server-round": 1}, model), ctx, _echo_train)
    r2 = fda_mod(_msg({P.PHASE: "monitor", "server-round": 2}, ArrayRecord()), ctx, _echo_train)
    assert r2.content[P.STATE][P.SQNORM] == pytest.approx(16.0)  # d = 2 everywhere
    assert not r2.content.array_records  # local state only
    sync = fda_mod(_msg({P.PHASE: "sync"}), ctx, _echo_train)
    np.testing.assert_array_equal(sync.content["arrays"]["w"].numpy(), np.full(4, 2.0))
    assert sync.content["metrics"]["num-examples"] == 3


def test_server_ignores_malformed_states(split):
    """A node replying with a bogus local state is left out of the estimate and sync."""

    def evil_mod(msg, ctx, call_next):
        reply = call_next(msg, ctx)
        if (
            ctx.node_config["partition-id"] == 0
            and reply.has_content()
            and P.STATE in reply.content
        ):
            reply.content[P.STATE] = MetricRecord({P.SQNORM: -1.0})
        return reply

    app = D.make_client_app(split, mods=[evil_mod, fda_mod])
    grid = InProcessGrid(app, K)
    fda = FDA(FedAvg(min_available_nodes=K, fraction_evaluate=0.0), threshold=0.0, variant="naive")
    fda.start(grid, _init(), num_rounds=2)
    assert all(h["nodes"] == K - 1 for h in fda.history)
    assert fda.stats["syncs"] == 2


def test_constructor_validation():
    with pytest.raises(ValueError):
        FDA(FedAvg(), variant="cubic")
    with pytest.raises(ValueError):
        FDA(FedAvg(), threshold=float("nan"))
    with pytest.raises(ValueError):
        FDA(FedAvg(), variant="sketch", sketch_width=0)
    with pytest.raises(TypeError):
        FDA(object())  # type: ignore[arg-type]


def test_client_app_without_mod_is_unchanged(split):
    """The same ClientApp (no mods) keeps working with plain FedAvg."""
    app = D.make_client_app(split)
    assert isinstance(app, ClientApp)
    res = FedAvg(min_available_nodes=K, fraction_evaluate=0.0).start(
        InProcessGrid(app, K), _init(), num_rounds=1
    )
    assert not _same(res.arrays, _init())


class _LateJoinGrid(InProcessGrid):
    """The last node only shows up after ``join_after`` send_and_receive calls."""

    def __init__(self, *args, join_after: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0
        self.join_after = join_after

    def get_node_ids(self):
        ids = list(self.node_ids)
        return ids if self.calls >= self.join_after else ids[:-1]

    def send_and_receive(self, messages, *, timeout=None):
        self.calls += 1
        return super().send_and_receive(messages, timeout=timeout)


def test_late_joiner_gets_global_and_previous_model(split):
    # Theta = 0: step = (monitor, sync). The 4th node appears at step 3's monitor call.
    grid = _LateJoinGrid(D.make_client_app(split, mods=[fda_mod]), K, join_after=4)
    fda = FDA(
        FedAvg(min_available_nodes=K - 1, min_train_nodes=K - 1, fraction_evaluate=0.0),
        threshold=0.0,
        variant="linear",
        final_sync=False,
    )
    fda.start(grid, _init(), num_rounds=3)
    assert [h["nodes"] for h in fda.history] == [K - 1, K - 1, K]
    xis = [next(iter(ctx.state[P.NODE_XI].values())).numpy() for ctx in grid.contexts.values()]
    for xi in xis[1:]:
        np.testing.assert_array_equal(xi, xis[0])  # the joiner's xi equals everyone's


def test_composes_with_offload_file_link(split, tmp_path):
    """FDA(offload(FedAvg), ...) with mods=[payload_mod, fda_mod]: Theta = 0 is still
    exactly FedAvg, model payloads travel over the file:// link, nothing is left on it."""
    from flwr_transports import offload, payload_mod

    link_dir = tmp_path / "link"
    link_dir.mkdir()
    ref = FedAvg(min_available_nodes=K, fraction_evaluate=0.0).start(
        InProcessGrid(D.make_client_app(split), K), _init(), num_rounds=3
    )
    inner = offload(
        FedAvg(min_available_nodes=K, fraction_evaluate=0.0), f"file://{link_dir}", threshold=1,
        aggregation="inner",  # bit-exact FedAvg (streaming is exact only to float rounding)
    )
    fda = FDA(inner, threshold=0.0, variant="linear")
    app = D.make_client_app(split, mods=[payload_mod, fda_mod])
    res = fda.start(InProcessGrid(app, K), _init(), num_rounds=3)
    assert _same(ref.arrays, res.arrays)
    model = _init().count_bytes()
    # 3 broadcasts down and 3 syncs up went over the link, not in band
    assert fda.stats["link_bytes_sent"] >= 3 * model
    assert fda.stats["link_bytes_received"] >= 3 * K * model
    assert fda.stats["sync_bytes_up"] < 3 * K * model  # only references in band
    assert list(link_dir.iterdir()) == []


def test_composes_with_offload_streaming_aggregation(split, tmp_path):
    """FDA(offload(FedAvg)) with the default aggregation (streaming over the link): the
    syncs are folded as they land; FedAvg's result up to float32 rounding."""
    from flwr_transports import offload, payload_mod

    link_dir = tmp_path / "link"
    link_dir.mkdir()
    ref = FedAvg(min_available_nodes=K, fraction_evaluate=0.0).start(
        InProcessGrid(D.make_client_app(split), K), _init(), num_rounds=3
    )
    inner = offload(
        FedAvg(min_available_nodes=K, fraction_evaluate=0.0), f"file://{link_dir}", threshold=1
    )
    fda = FDA(inner, threshold=0.0, variant="linear")
    app = D.make_client_app(split, mods=[payload_mod, fda_mod])
    res = fda.start(InProcessGrid(app, K), _init(), num_rounds=3)
    assert inner.stats["agg_streamed_rounds"] == 3
    for k in ref.arrays:
        a, b = ref.arrays[k].numpy(), res.arrays[k].numpy()
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6 * max(float(np.max(np.abs(a))), 1))
    assert list(link_dir.iterdir()) == []


def test_max_period_forces_syncs(split):
    grid = InProcessGrid(D.make_client_app(split, mods=[fda_mod]), K)
    fda = FDA(
        FedAvg(min_available_nodes=K, fraction_evaluate=0.0),
        threshold=1e30,
        variant="naive",
        max_period=3,
        final_sync=False,
    )
    fda.start(grid, _init(), num_rounds=9)
    assert [h["sync"] for h in fda.history] == [0, 0, 1] * 3
    assert all(h.get("forced") == 1 for h in fda.history if h["sync"])
    with pytest.raises(ValueError):
        FDA(FedAvg(), max_period=0)
