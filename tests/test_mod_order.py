"""payload_mod with Flower's DP mods, in the order docs/migrate.md gives (and the wrong one).

The ClientApp (real mods, real DP strategy wrappers, a real shm:// link) runs through
the in-process Grid of tests/inproc.py (a test double of the network only).

Right order, as the page says: ``ClientApp(mods=[payload_mod])`` and the DP mod on
the train function. The offloaded run gives the in-band run's model bit for bit, and
the update that reached the server was clipped (so the link carried the clipped reply).

Wrong order (the DP mod before ``payload_mod``): every train reply fails with the
Flower message the page quotes; nothing is aggregated silently.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import LocalDpMod, adaptiveclipping_mod, fixedclipping_mod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    FedAvg,
)
from inproc import InProcessGrid

from flwr_transports import offload, payload_mod

DOC = Path(__file__).resolve().parents[1] / "docs" / "migrate.md"
CLIP = 1.0


def _task():
    path = Path(__file__).parent / "apps" / "plain_app" / "plain_app" / "task.py"
    spec = importlib.util.spec_from_file_location("plain_app_task_mod_order", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TASK = _task()


def _train(msg: Message, ctx) -> Message:
    model = dict(zip(("w", "b"), msg.content["arrays"].to_numpy_ndarrays(), strict=True))
    x, y = TASK.load_data(int(ctx.node_config["partition-id"]))
    new = TASK.train(model, x, y, steps=2, lr=0.05)
    return Message(RecordDict({
        "arrays": ArrayRecord(list(new.values())),
        "metrics": MetricRecord({"num-examples": len(x)}),
    }), reply_to=msg)


def _evaluate(msg: Message, ctx) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 64})}), reply_to=msg)


def _app(app_mods: list, train_mods: list) -> ClientApp:
    app = ClientApp(mods=app_mods)
    app.train(mods=train_mods)(_train)
    app.evaluate()(_evaluate)
    return app


def _dp_strategy(kind: str):
    inner = FedAvg(fraction_evaluate=1.0, min_available_nodes=2)
    if kind == "fixed":
        return DifferentialPrivacyClientSideFixedClipping(
            inner, noise_multiplier=0.0, clipping_norm=CLIP, num_sampled_clients=2)
    if kind == "adaptive":
        return DifferentialPrivacyClientSideAdaptiveClipping(
            inner, noise_multiplier=0.0, num_sampled_clients=2, initial_clipping_norm=CLIP)
    return inner


def _dp_mod(kind: str):
    if kind == "fixed":
        return fixedclipping_mod
    if kind == "adaptive":
        return adaptiveclipping_mod
    # a huge epsilon: noise ~1e-9, clipping is what the test can see
    return LocalDpMod(clipping_norm=CLIP, sensitivity=1.0, epsilon=1e9, delta=1e-5)


def _run(kind: str, transport: str, app: ClientApp):
    strategy = offload(_dp_strategy(kind), transport=transport)
    initial = ArrayRecord(list(TASK.init_model().values()))
    grid = InProcessGrid(app, n_nodes=2)
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=1)
    return result, strategy, grid


@pytest.mark.parametrize("kind", ["fixed", "adaptive", "local"])
def test_payload_mod_first_gives_the_in_band_model_and_clips(kind):
    init = list(TASK.init_model().values())
    models = {}
    for transport in ("inband", "shm://"):
        if kind == "local":  # LocalDpMod adds noise: same seed for both runs
            np.random.seed(0)
        result, strategy, _ = _run(kind, transport, _app([payload_mod], [_dp_mod(kind)]))
        assert strategy.stats["replies_rejected"] == 0
        models[transport] = result.arrays.to_numpy_ndarrays()
        assert models[transport], f"{transport}: nothing aggregated"
    stats = strategy.stats
    assert stats["link_bytes_received"] >= 2 * sum(a.nbytes for a in init)  # replies offloaded
    if kind != "local":
        for a, b in zip(models["inband"], models["shm://"], strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)  # streaming aggregation
    else:
        for a, b in zip(models["inband"], models["shm://"], strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    delta = np.sqrt(sum(float(np.sum((m - i).astype(np.float64) ** 2))
                        for m, i in zip(models["shm://"], init, strict=True)))
    # unclipped, one round of training moves the model by far more than CLIP
    unclipped = TASK.train(dict(zip(("w", "b"), init, strict=True)), *TASK.load_data(0), 2, 0.05)
    assert np.sqrt(sum(float(np.sum((u - i) ** 2))
                       for u, i in zip(unclipped.values(), init, strict=True))) > 10 * CLIP
    assert delta <= CLIP * 1.001, delta


@pytest.mark.parametrize(("kind", "message"), [
    ("fixed", "fixedclipping_mod expects exactly one ConfigRecord, but found 2 ConfigRecord(s)."),
    ("adaptive",
     "adaptiveclipping_mod expects exactly one ConfigRecord, but found 2 ConfigRecord(s)."),
    ("local", "add flwr_transports.payload_mod as the FIRST mod of your ClientApp"),
])
def test_dp_mod_before_payload_mod_fails_every_train_reply(kind, message):
    train_errors: list[str] = []

    class Watch(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            replies = super().send_and_receive(messages, timeout=timeout)
            if messages and messages[0].metadata.message_type.startswith("train"):
                train_errors.extend(r.error.reason for r in replies if r.has_error())
                assert all(r.has_error() for r in replies), "a train reply got through"
            return replies

    strategy = offload(_dp_strategy(kind), transport="shm://")
    app = _app([_dp_mod(kind), payload_mod], [])
    result = strategy.start(grid=Watch(app, n_nodes=2),
                            initial_arrays=ArrayRecord(list(TASK.init_model().values())),
                            num_rounds=1)
    assert len(train_errors) == 2
    assert all(message in e for e in train_errors), train_errors
    # the page quotes the same message
    assert message.split(" but ")[0] in DOC.read_text(encoding="utf-8")
    # nothing was aggregated: no model came out of the round (Flower's Result is empty)
    assert len(result.arrays) == 0
    assert strategy.stats["link_bytes_received"] == 0
