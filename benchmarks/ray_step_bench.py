"""aggregation=ray: a server optimiser's step (FedAdam by default) on the shard owners vs
Flower's own class in the ServerApp, on the same mean, several rounds (state carried).

* ``flower``: Flower's ``FedAdam.aggregate_train`` in this process, the mean handed to
  it (what ``aggregation=streaming``/``ray`` without the owners' step runs: the step
  and its state ``current_arrays``/``m_t``/``v_t`` in the ServerApp);
* ``K=k``: :class:`~flwr_transports.aggregation.ray_step.ShardStep` with k shard
  actors on a local Ray cluster: the mean's slices go to the owners (``ray.put``: the
  path of a round aggregated from decoded replies; a streamed round has the sums on
  the owners already), each steps its shard with Flower's expressions, returns its
  new state to the object store, and the new model is collected here.

Reported: seconds per round's step, and whether the models agree bit for bit.

    python benchmarks/ray_step_bench.py --mib 64 --rounds 3 --shards 1,2 --strategy FedAdam
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shards", default="1,2")
    ap.add_argument("--strategy", default="FedAdam",
                    choices=["FedAdam", "FedYogi", "FedAdagrad", "FedAvgM"])
    args = ap.parse_args()

    import flwr.serverapp.strategy as fs
    import ray
    from flwr.app import Array, ArrayRecord

    from flwr_transports.aggregation.ray_shards import RayCluster
    from flwr_transports.aggregation.ray_step import shard_trainer

    def make():
        cls = getattr(fs, args.strategy)
        return cls(server_momentum=0.9) if args.strategy == "FedAvgM" else cls()

    n = (args.mib << 20) // 4
    rng = np.random.default_rng(0)
    model = ArrayRecord({"w": Array(rng.standard_normal(n).astype(np.float32))})

    def mean_of(rec, rnd):
        r = np.random.default_rng(rnd)
        return ArrayRecord({k: Array((v.numpy() + r.standard_normal(v.shape) * 0.01
                                      ).astype(v.numpy().dtype)) for k, v in rec.items()})

    tmp = tempfile.mkdtemp(prefix="ftx-ray-step-")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=max(2 << 30, 24 * (args.mib << 20)), configure_logging=False,
             _temp_dir=tmp)
    results = {}
    try:
        for k in [0] + [int(x) for x in args.shards.split(",")]:
            s, rc = make(), None
            if k:
                rc = RayCluster(shards=k)
                s, why = shard_trainer(s, rc)
                assert rc.step is not None, why
            a, out = model, []
            for rnd in range(1, args.rounds + 1):
                if k:
                    s._sent(a)  # what ShardStep.configure_train notes
                elif hasattr(s, "m_t"):  # FedOpt.configure_train's copy of the model sent
                    s.current_arrays = {n_: v.numpy() for n_, v in a.items()}
                elif s.current_arrays is None:  # FedAvgM.configure_train
                    s.current_arrays = a
                mean = mean_of(a, rnd)
                t0 = time.perf_counter()
                if k:
                    a = s.from_mean(rnd, mean)
                else:  # Flower's class, its mean handed over
                    a = _flower_step(s, rnd, mean)
                dt = time.perf_counter() - t0
                out.append(a)
                label = "flower (ServerApp)" if not k else f"shard owners K={k}"
                print(f"{args.strategy} {args.mib} MiB {label}: round {rnd} step {dt:.2f} s",
                      flush=True)
            results[k] = out
            if rc is not None:
                rc.close()
        for k, models in results.items():
            if k:
                same = all(np.array_equal(x["w"].numpy(), y["w"].numpy())
                           for x, y in zip(models, results[0], strict=True))
                print(f"K={k}: bit-identical to Flower's {args.strategy} every round: {same}")
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def _flower_step(s, rnd, mean):
    """Flower's own aggregate_train with its FedAvg part reduced to handing over
    ``mean`` (no replies to check)."""
    from flwr.serverapp.strategy import FedAvg

    orig = FedAvg.aggregate_train
    FedAvg.aggregate_train = lambda self, r, replies: (mean, None)
    try:
        return type(s).aggregate_train(s, rnd, [])[0]
    finally:
        FedAvg.aggregate_train = orig


if __name__ == "__main__":
    main()
