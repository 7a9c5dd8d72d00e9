"""ClientApp: w <- w + (partition-id + 1) / 1000; partition 0 attacks (hostile_mod)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .attacks import hostile_mod

app = ClientApp(mods=[hostile_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    new = {k: (a.numpy() + np.float32((pid + 1) / 1000)).astype(np.float32)
           for k, a in msg.content["arrays"].items()}
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in new.items()}),
                          "metrics": MetricRecord({"num-examples": 10 * (pid + 1)})})
    return Message(content=content, reply_to=msg)
