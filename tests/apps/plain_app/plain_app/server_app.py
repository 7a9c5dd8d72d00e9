"""ServerApp: FedAvg over the linear model; saves the final model."""

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from plain_app.task import init_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    num_rounds = int(context.run_config["num-server-rounds"])
    arrays = ArrayRecord(list(init_model().values()))

    strategy = FedAvg(fraction_evaluate=1.0, min_available_nodes=2)
    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=num_rounds)

    path = context.run_config["result-path"] or "final_model.npz"
    np.savez(path, *result.arrays.to_numpy_ndarrays())
