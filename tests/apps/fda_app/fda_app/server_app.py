"""ServerApp: FDA(FedAvg) over the deployment; writes what happened to ``result-path``."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flwr_transports.strategies import FDA

app = ServerApp()


class RecordingGrid(Grid):
    """Delegating Grid that keeps the metric records of every reply."""

    def __init__(self, inner: Grid) -> None:
        self._inner = inner
        self.replies: list[dict] = []
        self.calls = 0

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

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout=None):
        self.calls += 1
        replies = list(self._inner.send_and_receive(messages, timeout=timeout))
        for r in replies:
            entry = {
                "call": self.calls,
                "node": r.metadata.src_node_id,
                "error": r.error.reason if r.has_error() else None,
            }
            if r.has_content():
                for key, rec in r.content.metric_records.items():
                    entry[key] = dict(rec.items())
                entry["arrays"] = list(r.content.array_records.keys())
            self.replies.append(entry)
        return replies


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    dim = int(cfg["dim"])
    init = ArrayRecord({"w": Array(np.zeros(dim, dtype=np.float32))})
    rgrid = RecordingGrid(grid)
    fda = FDA(
        FedAvg(fraction_evaluate=0.0, min_available_nodes=2, min_train_nodes=2),
        threshold=float(cfg["threshold"]),
        variant=str(cfg["variant"]),
    )
    result = fda.start(rgrid, init, num_rounds=int(cfg["num-steps"]), timeout=120)
    out = str(cfg.get("result-path", ""))
    if out:
        Path(out).write_text(
            json.dumps(
                {
                    "history": fda.history,
                    "stats": fda.stats,
                    "final": result.arrays["w"].numpy().tolist(),
                    "replies": rgrid.replies,
                },
                default=float,
            )
        )
