"""Deterministic ClientApps used by the in-process unit tests."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flwr_transports import payload_mod


def _train(msg: Message, ctx) -> Message:
    arrs = msg.content["arrays"].to_numpy_ndarrays()
    pid = int(ctx.node_config["partition-id"])
    new = [(a + (pid + 1) * 0.25).astype(a.dtype) for a in arrs]
    return Message(RecordDict({"arrays": ArrayRecord(new),
                               "metrics": MetricRecord({"num-examples": 10 * (pid + 1)})}),
                   reply_to=msg)


def _evaluate(msg: Message, ctx) -> Message:
    arrs = msg.content["arrays"].to_numpy_ndarrays()
    loss = float(sum(float(np.abs(a).sum()) for a in arrs))
    return Message(RecordDict({"metrics": MetricRecord({"loss": loss, "num-examples": 1})}),
                   reply_to=msg)


def make_app(with_mod: bool = True) -> ClientApp:
    app = ClientApp(mods=[payload_mod] if with_mod else [])
    app.train()(_train)
    app.evaluate()(_evaluate)
    return app


def initial_arrays(n: int = 300_000) -> ArrayRecord:
    rng = np.random.default_rng(42)
    return ArrayRecord([rng.standard_normal(n).astype(np.float32),
                        rng.standard_normal((50, 40)), np.arange(6, dtype=np.int64)])
