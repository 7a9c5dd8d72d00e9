"""ClientApp: a deterministic 'training' step w <- w + (partition-id + 1), wrapped by fda_mod.

The train function itself is stateless; only fda_mod's node state can make the model
keep moving away from the global one across rounds (each round may run in a fresh
flwr-clientapp process: the reply reports the process id).
"""

from __future__ import annotations

import os

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flwr_transports.strategies import fda_mod

app = ClientApp(mods=[fda_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    step = float(context.node_config["partition-id"]) + 1.0
    w = msg.content["arrays"]["w"].numpy() + np.float32(step)
    metrics = MetricRecord({"num-examples": 10, "pid": os.getpid()})
    content = RecordDict({"arrays": ArrayRecord({"w": Array(w)}), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    w = msg.content["arrays"]["w"].numpy()
    metrics = MetricRecord({"w-mean": float(np.mean(w)), "num-examples": 10})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
