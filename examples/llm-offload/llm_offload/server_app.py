"""ServerApp: FedAvg over bf16 weights, wrapped by ``offload`` (transport from run config).

The global model travels as bf16 ``torch.raw`` Arrays both ways; ``upcast`` lets
Flower's numpy FedAvg average the replies in float32 and rounds the result back to
bf16. With ``result-dir`` set, the ServerApp writes ``summary.json`` (round times,
losses, link statistics, a digest of the global model after each round) and
``final.pt`` there; with ``dump-clients`` also ``global-r<N>.pt`` for every round.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterable
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flwr_transports import offload
from flwr_transports.torch import arrays_to_state_dict, state_dict_to_arrays, upcast

from .client_app import record_digest
from .model import initial_state_dict, n_params, preset

app = ServerApp()


class TimedGrid(Grid):
    """Delegating Grid that records how long each send_and_receive takes."""

    def __init__(self, inner: Grid) -> None:
        self._inner = inner
        self.calls: list[dict] = []

    def set_run(self, run) -> None:
        self._inner.set_run(run)

    @property
    def run(self):
        return self._inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return self._inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._inner.get_node_ids()

    def get_nodes(self):
        return self._inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        kind = messages[0].metadata.message_type if messages else ""
        t0 = time.perf_counter()
        replies = list(self._inner.send_and_receive(messages, timeout=timeout))
        self.calls.append({"type": kind, "replies": len(replies),
                           "errors": sum(1 for r in replies if r.has_error()),
                           "start": t0, "end": time.perf_counter()})
        return replies


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    size = str(cfg["model-size"])
    num_rounds = int(cfg["num-server-rounds"])
    transport = str(cfg.get("transport", "inband"))
    n_nodes = int(cfg["min-nodes"])
    result_dir = str(cfg.get("result-dir", "") or "")
    dump = bool(cfg.get("dump-clients", False))

    mcfg = preset(size)
    init = initial_state_dict(size, seed=int(cfg["seed"]))
    initial = state_dict_to_arrays(init, copy=False)  # the server never modifies init
    model_bytes = sum(len(a.data) for a in initial.values())
    log(INFO, "llm-offload: model-size=%s, %.1f M parameters, %.1f MiB of bf16 weights, "
        "transport=%s", size, n_params(mcfg) / 1e6, model_bytes / 2**20, transport)

    strategy = offload(
        upcast(FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=n_nodes,
                      min_evaluate_nodes=n_nodes, min_available_nodes=n_nodes)),
        transport=transport,
    )
    digests: dict[int, str] = {}

    def after_round(server_round: int, arrays: ArrayRecord) -> None:
        # called with the global model before round 1 (0) and after each round
        digests[server_round] = record_digest(arrays)
        if result_dir and dump:
            torch.save(arrays_to_state_dict(arrays, copy=True),
                       Path(result_dir) / f"global-r{server_round}.pt")

    timed = TimedGrid(grid)
    t_start = time.perf_counter()
    result = strategy.start(grid=timed, initial_arrays=initial, num_rounds=num_rounds,
                            evaluate_fn=after_round)
    total = time.perf_counter() - t_start

    ends = [c["end"] for c in timed.calls if c["type"].startswith("evaluate")]
    round_s = [b - a for a, b in itertools.pairwise([t_start, *ends])]
    train_s = [c["end"] - c["start"] for c in timed.calls if c["type"].startswith("train")]
    evaluate_s = [c["end"] - c["start"] for c in timed.calls if c["type"].startswith("evaluate")]
    train = {int(r): dict(m) for r, m in result.train_metrics_clientapp.items()}
    evals = {int(r): dict(m) for r, m in result.evaluate_metrics_clientapp.items()}
    for r in range(1, num_rounds + 1):
        log(INFO, "llm-offload: round %d: %.1f s (train %.1f s), train-loss %.4f, eval-loss %.4f",
            r, round_s[r - 1] if r <= len(round_s) else float("nan"),
            train_s[r - 1] if r <= len(train_s) else float("nan"),
            train.get(r, {}).get("train-loss", float("nan")),
            evals.get(r, {}).get("eval-loss", float("nan")))
    if not result_dir:
        return
    out = Path(result_dir)
    if not out.is_absolute():
        raise ValueError(f"result-dir must be absolute, got {result_dir!r}")
    out.mkdir(parents=True, exist_ok=True)
    torch.save(arrays_to_state_dict(result.arrays, copy=True), out / "final.pt")
    summary = {
        "transport": transport, "model_size": size, "n_params": n_params(mcfg),
        "model_bytes": model_bytes, "num_rounds": num_rounds, "total_s": total,
        "round_s": round_s, "train_call_s": train_s, "evaluate_call_s": evaluate_s,
        "train_metrics": train, "evaluate_metrics": evals,
        "digests": digests, "final_digest": record_digest(result.arrays),
        "final_dtypes": sorted({a.dtype for a in result.arrays.values()}),
        "stats": dict(getattr(strategy, "stats", {}) or {}),
    }
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=float), encoding="utf-8")
    os.replace(tmp, out / "summary.json")
