"""ServerApp: FedAvg wrapped by flwr_transports.offload, with timings."""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flwr_transports import offload
from flwr_transports.flower.receive import polls_replies

from .task import build_model, load_trained

app = ServerApp()


class TimedGrid(Grid):
    """Delegating Grid that records when each send_and_receive ends.

    A round = everything between the end of the previous round's evaluate call and
    the end of this round's evaluate call: configure_train (where offloading puts
    the payload on its link), the train round trip, aggregate_train (where replies
    are fetched and verified), configure_evaluate and the evaluate round trip.

    Offload runs its own receive loop through push_messages / pull_messages when the
    grid underneath is Flower's deployment grid (``send_and_receive_polls``); a call
    is then timed from its push to the last pull that waited for its replies.
    """

    def __init__(self, inner: Grid) -> None:
        self._inner = inner
        self.calls: list[dict] = []
        self._by_id: dict[str, dict] = {}  # pushed message id -> its call (receive loop)

    @property
    def send_and_receive_polls(self) -> bool:
        """This grid's send_and_receive is the inner grid's push + pull loop."""
        return polls_replies(self._inner)

    def set_run(self, run) -> None:
        self._inner.set_run(run)

    @property
    def run(self):
        return self._inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self._inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._inner.get_node_ids()

    def get_nodes(self):
        return self._inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        t0 = time.perf_counter()
        ids = list(self._inner.push_messages(messages))
        call = {"type": messages[0].metadata.message_type if messages else "",
                "sent": len(messages), "replies": 0, "errors": 0, "start": t0, "end": t0}
        self.calls.append(call)
        self._by_id.update(dict.fromkeys(ids, call))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        message_ids = list(message_ids)
        replies = list(self._inner.pull_messages(message_ids))
        t1 = time.perf_counter()
        for mid in message_ids:
            if mid in self._by_id:
                self._by_id[mid]["end"] = t1
        for r in replies:
            call = self._by_id.pop(r.metadata.reply_to_message_id, None)
            if call is not None:
                call["replies"] += 1
                call["errors"] += int(r.has_error())
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        kind = messages[0].metadata.message_type if messages else ""
        t0 = time.perf_counter()
        replies = list(self._inner.send_and_receive(messages, timeout=timeout))
        t1 = time.perf_counter()
        self.calls.append(
            {
                "type": kind,
                "sent": len(messages),
                "replies": len(replies),
                "errors": sum(1 for r in replies if r.has_error()),
                "start": t0,
                "end": t1,
            }
        )
        return replies


def _per_round_seconds(t_start: float, calls: list[dict]) -> list[float]:
    ends = [c["end"] for c in calls if c["type"].startswith("evaluate")]
    bounds = [t_start, *ends]
    return [b - a for a, b in itertools.pairwise(bounds)]


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    num_rounds = int(cfg["num-server-rounds"])
    model_mib = float(cfg["model-mib"])
    transport = str(cfg.get("transport", "inband"))
    result_path = str(cfg.get("result-path", "") or "")
    fraction_train = float(cfg.get("fraction-train", 1.0))

    weights_dir = str(cfg.get("weights-dir", "") or "")
    model = load_trained(weights_dir) if weights_dir else build_model(model_mib)
    initial = ArrayRecord({k: Array(np.asarray(v)) for k, v in model.items()})
    del model
    inner = FedAvg(
        fraction_train=fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=2,
        min_evaluate_nodes=2,
        min_available_nodes=2,
    )
    strategy = offload(inner, transport=transport)

    timed = TimedGrid(grid)
    t_start = time.perf_counter()
    result = strategy.start(grid=timed, initial_arrays=initial, num_rounds=num_rounds)
    total = time.perf_counter() - t_start

    if not result_path:
        return
    path = Path(result_path)
    if not path.is_absolute():
        raise ValueError(f"result-path must be absolute, got {result_path!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    final = {name: arr.numpy() for name, arr in result.arrays.items()}
    # np.savez writes the arrays in insertion order; names are ours (no path chars).
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **final)
    os.replace(tmp, path)

    per_round = _per_round_seconds(t_start, timed.calls)
    summary = {
        "transport": transport,
        "num_rounds": num_rounds,
        "model_mib": model_mib,
        "model_bytes": int(sum(a.nbytes for a in final.values())),
        "total_s": total,
        "round_s_mean": total / max(1, num_rounds),
        "per_round_s": per_round,
        "calls": [
            {k: v for k, v in c.items() if k not in ("start", "end")}
            | {"seconds": c["end"] - c["start"]}
            for c in timed.calls
        ],
        "arrays": {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in final.items()},
        "train_metrics": {str(r): dict(m) for r, m in result.train_metrics_clientapp.items()},
        "evaluate_metrics": {str(r): dict(m) for r, m in result.evaluate_metrics_clientapp.items()},
        "stats": dict(getattr(strategy, "stats", {}) or {}),
    }
    json_path = path.with_suffix(".json")
    json_tmp = json_path.with_name(json_path.name + ".tmp")
    json_tmp.write_text(json.dumps(summary, indent=2, default=float), encoding="utf-8")
    os.replace(json_tmp, json_path)
