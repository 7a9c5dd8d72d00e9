"""aggregation=ray in a REAL local Flower deployment (slow: the ServerApp starts its
own local Ray, as it does when neither RAY_ADDRESS nor ray_address= is set).

``flower-superlink`` + 2 ``flower-supernode`` on 127.0.0.1, examples/quickstart-offload
(FedAvg, 2 rounds, a 40 MiB model: three 16 MiB windows, two shards) over ``s3://`` on
an embedded S3 server (moto), once with ``aggregation=streaming`` and once with
``aggregation=ray&ray_shards=2``: the final models agree within float rounding,
nothing is left in the bucket and no Ray process outlives the run.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL_MIB = 40.0


def _ray_pids(psutil) -> set[int]:
    out = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if "raylet" in cmd or "gcs_server" in cmd or "ray::" in cmd:
            out.add(p.info["pid"])
    return out


def test_ray_deployment_equals_streaming(tmp_path, quickstart_app):
    import psutil
    pytest.importorskip("ray", reason="aggregation=ray needs the ray extra")
    import boto3
    from moto import server as moto_server

    from flwr_transports.testing import LocalDeployment

    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    creds = {"AWS_ACCESS_KEY_ID": "itest", "AWS_SECRET_ACCESS_KEY": "itest",
             "AWS_DEFAULT_REGION": "us-east-1"}
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id="itest", aws_secret_access_key="itest")
    s3.create_bucket(Bucket="raytest")
    ray_before = _ray_pids(psutil)
    env = {**creds, "RAY_ADDRESS": ""} if "RAY_ADDRESS" in os.environ else creds
    got = {}
    try:
        with LocalDeployment(n_supernodes=2, workdir=tmp_path / "deploy", env=env) as dep:
            for name, agg in (("streaming", "aggregation=streaming"),
                              ("ray", "aggregation=ray&ray_shards=2")):
                out = tmp_path / f"final-{name}.npz"
                res = dep.run(quickstart_app, {
                    "transport": f"s3://raytest/runs?endpoint_url={endpoint}&{agg}",
                    "model-mib": MODEL_MIB, "num-server-rounds": 2,
                    "result-path": str(out)}, timeout=600)
                assert res.ok, f"{name} run failed ({res.status}):\n{res.output[-4000:]}"
                with np.load(out) as z:
                    got[name] = {k: z[k] for k in z}
        left = [o["Key"] for o in s3.list_objects_v2(Bucket="raytest").get("Contents", [])]
        left += [u["Key"] for u in
                 s3.list_multipart_uploads(Bucket="raytest").get("Uploads", [])]
    finally:
        srv.stop()
    assert left == []
    assert got["ray"].keys() == got["streaming"].keys()
    for k, b in got["streaming"].items():
        a = got["ray"][k]
        assert a.dtype == b.dtype and a.shape == b.shape, k
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * float(np.max(np.abs(b)) or 1))
    assert _ray_pids(psutil) - ray_before == set()  # the ServerApp's Ray is gone
