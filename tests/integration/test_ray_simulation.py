"""aggregation=ray under Flower's Simulation runtime (slow: Ray starts twice).

``flwr.simulation.run_simulation`` starts the ServerApp's thread and then its own Ray
(the ClientApps are Ray actors holding the CPUs): the shard actors must run on THAT
Ray (not a second one raced into existence by the ServerApp), reserve no CPU, and give
the model ``aggregation=streaming`` gives; nothing is left in the bucket.
"""

from __future__ import annotations

import shutil
import tempfile

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ray = pytest.importorskip("ray", reason="the Simulation runtime needs Ray")
from moto import server as moto_server

CREDS = {"AWS_ACCESS_KEY_ID": "sim", "AWS_SECRET_ACCESS_KEY": "sim",
         "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def test_ray_aggregation_reuses_the_simulation_ray(monkeypatch):
    import boto3
    from flwr.app import Array, ArrayRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation
    from test_aggregation import _app

    from flwr_transports import offload

    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="sim")
    tmp = tempfile.mkdtemp(prefix="ftx-sim-ray-")
    out: dict = {}

    def server(agg: str) -> ServerApp:
        app = ServerApp()

        @app.main()
        def main(grid: Grid, context: Context) -> None:
            s = offload(FedAvg(), f"s3://sim/runs?endpoint_url={endpoint}&aggregation={agg}"
                        "&ray_shards=2")
            r = np.random.default_rng(7)
            init = ArrayRecord({"w": Array(r.standard_normal((2300, 2301)).astype(np.float32)),
                                "b": Array(r.standard_normal(1001))})
            res = s.start(grid, init, num_rounds=2)
            out[agg] = {k: v.numpy() for k, v in res.arrays.items()}
            if s._ray is not None:
                out["actors"] = list(s._ray.history)
                out["folds"] = s.stats["agg_eager_folds"] + s.stats["agg_settle_folds"]

        return app

    try:
        for agg in ("streaming", "ray"):
            run_simulation(server_app=server(agg), client_app=_app(), num_supernodes=2,
                           backend_config={"client_resources": {"num_cpus": 1},
                                           "init_args": {"num_cpus": 2, "_temp_dir": tmp}})
        left = s3.list_objects_v2(Bucket="sim").get("Contents", [])
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    assert not ray.is_initialized()
    assert len(out["actors"]) == 2 and out["folds"] == 4  # 2 rounds x 2 ClientApps
    assert out["ray"].keys() == out["streaming"].keys()
    for k, b in out["streaming"].items():
        np.testing.assert_allclose(out["ray"][k], b, rtol=1e-6, atol=1e-7)
    assert left == []
