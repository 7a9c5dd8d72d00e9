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

Reported: seconds per round's step, and whether the models agree bit for bit, for
``--repeat`` runs of the whole set (each run steps from scratch; load average before and
after each). ``--json PATH`` writes them with the commit, Flower's version and the command
line: ``ftx-bench render``'s view ``ray-step`` makes docs/aggregation.md's table of it.

    python benchmarks/ray_step_bench.py --mib 64 --rounds 3 --shards 1,2 --repeat 3 \
        --json docs/bench-data/ray-step.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=False, capture_output=True,
                          text=True).stdout.strip()


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shards", default="1,2")
    ap.add_argument("--strategy", default="FedAdam",
                    choices=["FedAdam", "FedYogi", "FedAdagrad", "FedAvgM"])
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs of the whole set (Flower's class and every K), default 3")
    ap.add_argument("--json", help="write the figures (and their provenance) here")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")

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

    store = max(2 << 30, 24 * (args.mib << 20))
    shards = [int(x) for x in args.shards.split(",")]
    doc = {"kind": "ray-step", "strategy": args.strategy, "mib": args.mib,
           "rounds": args.rounds, "shards": shards, "repeat": args.repeat,
           "object_store_bytes": store, "ray_num_cpus": 2,
           "commit": _git("rev-parse", "HEAD"),
           "dirty": _git("diff", "--name-only", "HEAD").splitlines(),
           "flwr_version": _version("flwr"), "ray_version": _version("ray"),
           "numpy_version": np.__version__, "cpus": os.cpu_count(),
           "time_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
           "command": " ".join(["python", *sys.argv]), "runs": []}
    tmp = tempfile.mkdtemp(prefix="ftx-ray-step-")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=store, configure_logging=False, _temp_dir=tmp)
    try:
        for rep in range(1, args.repeat + 1):
            run = {"load_before": _load(), "step_s": {}, "bit_identical": {}}
            results = {}
            for k in [0] + shards:
                s, rc = make(), None
                if k:
                    rc = RayCluster(shards=k)
                    s, why = shard_trainer(s, rc)
                    assert rc.step is not None, why
                a, out, times = model, [], []
                label = "flower" if not k else f"K={k}"
                for rnd in range(1, args.rounds + 1):
                    if k:
                        s._sent(a)  # what ShardStep.configure_train notes
                    elif hasattr(s, "m_t"):  # FedOpt.configure_train's copy of the model
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
                    times.append(dt)
                    print(f"repeat {rep}: {args.strategy} {args.mib} MiB {label}: round {rnd} "
                          f"step {dt:.2f} s", flush=True)
                results[k] = out
                run["step_s"][label] = times
                if rc is not None:
                    rc.close()
            for k, models in results.items():
                if k:
                    same = all(np.array_equal(x["w"].numpy(), y["w"].numpy())
                               for x, y in zip(models, results[0], strict=True))
                    run["bit_identical"][f"K={k}"] = same
                    print(f"repeat {rep}: K={k}: bit-identical to Flower's {args.strategy} "
                          f"every round: {same}", flush=True)
            del results
            run["load_after"] = _load()
            doc["runs"].append(run)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        print("wrote", args.json)


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


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
