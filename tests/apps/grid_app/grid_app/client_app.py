"""ClientApp: deterministic updates; the node with partition-id 1 is slow on queries."""

from __future__ import annotations

import os
import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flwr_transports import payload_mod

app = ClientApp(mods=[payload_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    arrays = msg.content["arrays"]
    new = ArrayRecord({k: Array(np.asarray(a.numpy() + np.float32(0.25 * (pid + 1)),
                                        dtype=a.dtype)) for k, a in arrays.items()})
    metrics = MetricRecord({"num-examples": 10 * (pid + 1)})
    return Message(RecordDict({"arrays": new, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    total = float(sum(float(np.abs(a.numpy()).sum()) for a in msg.content["arrays"].values()))
    return Message(RecordDict({"metrics": MetricRecord({"l1": total})}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    release = str(context.run_config["release-path"])
    if pid == 1 and release:  # slow until the server has given up on this reply
        deadline = time.time() + 120
        while not os.path.exists(release) and time.time() < deadline:
            time.sleep(0.2)
    return Message(RecordDict({"metrics": MetricRecord({"pid": pid})}), reply_to=msg)
