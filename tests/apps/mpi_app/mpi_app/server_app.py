"""ServerApp: FedAvg or FedAdam over the deterministic ClientApp; saves the final model."""

from __future__ import annotations

import itertools
import json
import random
import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg

from .model import initial_arrays

app = ServerApp()


def make_strategy(name: str):
    if name == "fedavg":
        return FedAvg(fraction_train=1.0, fraction_evaluate=1.0)
    if name == "fedadam":
        return FedAdam(fraction_train=1.0, fraction_evaluate=1.0, eta=0.1, eta_l=0.1)
    raise ValueError(f"unknown strategy {name!r}")


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    if cfg["mode"] == "grid":
        grid_checks(grid, context)
        return
    random.seed(int(cfg["seed"]))
    strategy = make_strategy(str(cfg["strategy"]))
    stamps: list[float] = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord):
        stamps.append(time.perf_counter())

    result = strategy.start(
        grid=grid,
        initial_arrays=initial_arrays(str(cfg["model"]), float(cfg["model-mib"])),
        num_rounds=int(cfg["num-server-rounds"]),
        timeout=float(cfg["reply-timeout"]),
        evaluate_fn=evaluate_fn,
    )
    if cfg["out-path"]:
        arrays = {k: v.numpy() for k, v in result.arrays.items()}
        np.savez(str(cfg["out-path"]), **{f"a{i}": a for i, a in enumerate(arrays.values())})
        keys = list(arrays)
        train = {str(r): dict(m) for r, m in result.train_metrics_clientapp.items()}
        evals = {str(r): dict(m) for r, m in result.evaluate_metrics_clientapp.items()}
        with open(str(cfg["out-path"]) + ".json", "w", encoding="utf-8") as f:
            json.dump({"keys": keys, "train": train, "evaluate": evals}, f)
    if cfg["timings-path"]:
        rounds = [b - a for a, b in itertools.pairwise(stamps)]
        with open(str(cfg["timings-path"]), "w", encoding="utf-8") as f:
            json.dump({"round_s": rounds}, f)


def _payload() -> RecordDict:
    return RecordDict(
        {
            "arrays": initial_arrays("payload"),
            "config": ConfigRecord(
                {
                    "blob": b"\x00\x01raw bytes\xff",
                    "big-blob": bytes(range(256)) * 1000,
                    "blobs": [b"a", b"", b"ccc"],
                    "text": "h\u00e9llo",
                    "flag": True,
                    "ints": [1, 2, 3],
                    "floats": [0.1, float("inf")],
                    "empty": [],
                }
            ),
            "metrics": MetricRecord({"x": 1, "y": 2.5, "zs": [1.5, -2.0]}),
        }
    )


def grid_checks(grid: Grid, context: Context) -> None:
    """Exercise the Grid API directly (push/pull, get_node_ids, timeouts)."""
    out: dict = {}
    nodes = sorted(grid.get_node_ids())
    out["nodes"] = nodes
    out["run_id_matches"] = grid.run.run_id == context.run_id
    sent = _payload()
    msgs = [Message(_payload(), n, "query", group_id="g1") for n in nodes]
    ids = list(grid.push_messages(msgs))
    replies: list[Message] = []
    deadline = time.monotonic() + 60
    while len(replies) < len(ids) and time.monotonic() < deadline:
        replies.extend(grid.pull_messages(ids))
        time.sleep(0.01)
    out["n_replies"] = len(replies)
    checks = []
    for r in replies:
        c = r.content
        same_arrays = all(
            a.dtype == b.dtype and a.shape == b.shape and a.stype == b.stype and a.data == b.data
            for a, b in zip(c["arrays"].values(), sent["arrays"].values(), strict=True)
        ) and list(c["arrays"].keys()) == list(sent["arrays"].keys())
        checks.append(
            {
                "src": r.metadata.src_node_id,
                "reply_to_known": r.metadata.reply_to_message_id in ids,
                "group": r.metadata.group_id,
                "arrays": same_arrays,
                "config": dict(c["config"]) == dict(sent["config"]),
                "metrics": dict(c["metrics"]) == dict(sent["metrics"]),
                "who": dict(c["who"]),
            }
        )
    out["replies"] = checks
    # send_and_receive with a timeout shorter than the work: returns what it has
    slow = [
        Message(RecordDict({"config": ConfigRecord({"sleep": 1.5})}), n, "query.slow")
        for n in nodes
    ]
    t0 = time.monotonic()
    early = list(grid.send_and_receive(slow, timeout=0.3))
    out["early_replies"] = len(early)
    out["early_waited"] = time.monotonic() - t0
    # the late replies are still delivered, as Flower does, to pull_messages
    late_ids = [m.metadata.message_id for m in slow]
    late: list[Message] = []
    deadline = time.monotonic() + 60
    while len(late) < len(late_ids) and time.monotonic() < deadline:
        late.extend(grid.pull_messages(late_ids))
        time.sleep(0.01)
    out["late_replies"] = len(late)
    # an unknown node id is refused with a clear error
    try:
        grid.push_messages([Message(RecordDict(), 99, "query")])
        out["unknown_node"] = "accepted"
    except ValueError as exc:
        out["unknown_node"] = str(exc)
    with open(str(cfg_path(context)), "w", encoding="utf-8") as f:
        json.dump(out, f)


def cfg_path(context: Context) -> str:
    return str(context.run_config["out-path"])
