"""ServerApp: FedAvg or FedAdam over the deterministic ClientApp; saves the final model."""

from __future__ import annotations

import itertools
import json
import random
import time

import numpy as np
from flwr.app import ArrayRecord, Context
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
