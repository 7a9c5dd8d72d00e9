"""ServerApp with its own main loop (no Strategy), offloaded with offload_grid():

1. train: push one message per node (one shared RecordDict), pull the replies in two
   batches (first node's reply, then the rest), average them by hand;
2. query: send_and_receive with a timeout the slow node misses;
3. evaluate: send_and_receive with the averaged model, no timeout.
"""

from __future__ import annotations

import json
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from flwr_transports import offload_grid

app = ServerApp()


def _model(mib: float) -> ArrayRecord:
    rng = np.random.default_rng(7)
    n = int(mib * 2**20 / 4)
    return ArrayRecord({"w": Array(rng.standard_normal(n).astype(np.float32)),
                        "b": Array(np.arange(10, dtype=np.float64)),
                        "step": Array(np.array(3, dtype=np.int64))})


def _wait(grid: Grid, ids: list[str], deadline: float) -> list:
    got = []
    while ids and time.time() < deadline:
        new = list(grid.pull_messages(ids))
        got += new
        done = {m.metadata.reply_to_message_id for m in new}
        ids = [i for i in ids if i not in done]
        if ids:
            time.sleep(0.5)
    return got


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    with offload_grid(grid, str(cfg["transport"])) as g:
        nodes = []
        while len(nodes) < 2:
            nodes = sorted(g.get_node_ids())
            time.sleep(0.2)
        arrays = _model(float(cfg["model-mib"]))
        content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})})
        msgs = [Message(content, dst_node_id=n, message_type="train") for n in nodes]
        ids = list(g.push_messages(msgs))
        deadline = time.time() + 300
        first = _wait(g, ids[:1], deadline)
        rest = _wait(g, ids[1:], deadline)
        replies = sorted(first + rest, key=lambda m: m.metadata.src_node_id)
        errors = [m.error.reason for m in replies if m.has_error()]
        replies = [m for m in replies if m.has_content()]
        w = np.array([float(m.content["metrics"]["num-examples"]) for m in replies])
        agg = {}
        for key in arrays:
            stack = [m.content["arrays"][key].numpy().astype(np.float64) for m in replies]
            agg[key] = np.asarray(sum(x * wi for x, wi in zip(stack, w, strict=True)) / w.sum(),
                                  dtype=arrays[key].numpy().dtype)
        queries = list(g.send_and_receive(
            [Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes],
            timeout=float(cfg["query-timeout"])))
        if cfg["release-path"]:
            open(str(cfg["release-path"]), "w").close()  # the slow node may answer now
        evals = list(g.send_and_receive(
            [Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in agg.items()})}),
                     dst_node_id=n, message_type="evaluate") for n in nodes]))
        stats = dict(g.stats)
    if cfg["result-path"]:
        np.savez(str(cfg["result-path"]), **agg)
        summary = {
            "train_replies": len(replies), "train_errors": errors,
            "first_batch": [m.metadata.src_node_id for m in first],
            "query_replies": sorted(int(m.content["metrics"]["pid"]) for m in queries
                                    if m.has_content()),
            "eval_l1": sorted(float(m.content["metrics"]["l1"]) for m in evals
                              if m.has_content()),
            "stats": stats,
        }
        with open(str(cfg["result-path"]) + ".json", "w") as f:
            json.dump(summary, f)
