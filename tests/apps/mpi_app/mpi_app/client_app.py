"""Deterministic ClientApp: new = arrays + (partition_id + 1) * 0.5."""

from __future__ import annotations

import os
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def _update(arrays: ArrayRecord, pid: int) -> ArrayRecord:
    out = {}
    for key, arr in arrays.items():
        a = arr.numpy()
        if np.issubdtype(a.dtype, np.floating):
            a = np.asarray(a + a.dtype.type((pid + 1) * 0.5))
        out[key] = Array(a)
    return ArrayRecord(out)


@app.train()
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    cfg = context.run_config
    if pid == cfg["fail-partition"]:
        raise RuntimeError(f"partition {pid} fails on purpose")
    if pid == cfg["stall-partition"]:
        time.sleep(3600)
    if pid == cfg["exit-partition"]:
        os._exit(17)
    # node state persists across rounds on this node
    calls = int(context.state["calls"]["n"]) + 1 if "calls" in context.state else 1
    context.state["calls"] = ConfigRecord({"n": calls})
    if cfg["client-work"] == "echo":  # benchmarks: no compute, send the model back as is
        arrays = msg.content["arrays"]
    else:
        arrays = _update(msg.content["arrays"], pid)
    metrics = MetricRecord(
        {
            "num-examples": pid + 1,
            "calls": calls,
            "round": int(msg.content["config"]["server-round"]),
        }
    )
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    total = 0.0
    if context.run_config["client-work"] != "echo":
        total = sum(
            float(np.sum(a.numpy(), dtype=np.float64)) for a in msg.content["arrays"].values()
        )
    metrics = MetricRecord({"num-examples": pid + 1, "checksum": total})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Echo everything back, plus who answered."""
    content = RecordDict(dict(msg.content.items()))
    content["who"] = MetricRecord(
        {
            "partition-id": int(context.node_config["partition-id"]),
            "num-partitions": int(context.node_config["num-partitions"]),
            "node-id": context.node_id,
        }
    )
    return Message(content, reply_to=msg)


@app.query("slow")
def slow(msg: Message, context: Context) -> Message:
    time.sleep(float(msg.content["config"]["sleep"]))
    return Message(RecordDict({"done": MetricRecord({"ok": 1})}), reply_to=msg)
