"""ServerApp: offload(FedAvg) with every reply's fate recorded to ``result-path``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flwr_transports import offload

app = ServerApp()


def build_model(model_mib: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    n = int(model_mib * (1 << 20)) // 4
    return {"w": rng.standard_normal(n, dtype=np.float32),
            "b": np.arange(16, dtype=np.float32)}


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    inner = FedAvg(fraction_evaluate=0.0, min_available_nodes=2, min_train_nodes=2)
    strategy = offload(inner, transport=str(cfg["transport"]))
    rounds: list[dict] = []
    orig = inner.aggregate_train

    def spy(server_round, replies):
        replies = list(replies)
        rounds.append({
            "round": server_round, "t": time.time(),
            "ok": [r.metadata.src_node_id for r in replies if not r.has_error()],
            "errors": [[r.metadata.src_node_id, r.error.code, r.error.reason]
                       for r in replies if r.has_error()],
        })
        return orig(server_round, replies)

    inner.aggregate_train = spy
    init = ArrayRecord({k: Array(v) for k, v in build_model(float(cfg["model-mib"])).items()})
    t0 = time.time()
    result = strategy.start(grid, init, num_rounds=int(cfg["num-server-rounds"]), timeout=300)
    out = str(cfg.get("result-path", ""))
    if out:
        np.savez(out, **{k: a.numpy() for k, a in result.arrays.items()})
        Path(out).with_suffix(".json").write_text(json.dumps(
            {"rounds": rounds, "stats": strategy.stats, "t0": t0, "t1": time.time()}))
