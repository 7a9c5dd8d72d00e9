"""offload_grid() in a REAL deployment: a ServerApp with its own main loop (no Strategy):
push + pull in two batches, send_and_receive with a timeout that the slow node misses,
send_and_receive without timeout. Run over every link here and in-band, on one
deployment (SuperLink + 2 SuperNodes on loopback): identical results, payloads on the
link, the slow node left out, nothing left behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

APP = Path(__file__).resolve().parent.parent / "apps" / "grid_app"
MODEL_MIB = 4.0


def _dead_owner(names) -> list[str]:
    """Names whose owning process is gone (other test runs may share /dev/shm)."""
    from flwr_transports.links.base import owner_pid, pid_alive

    return sorted(n for n in names if not pid_alive(owner_pid(n) or 0))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ftx_names):
    import boto3
    import psutil  # noqa: F401 - a dev dependency: missing is a failure
    from moto.server import ThreadedMotoServer

    from flwr_transports.testing import LocalDeployment

    base = tmp_path_factory.mktemp("grid-app")
    file_dir = base / "file-link"
    file_dir.mkdir()
    s3srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3srv.start()
    host, port = s3srv.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    creds = {"AWS_ACCESS_KEY_ID": "itest", "AWS_SECRET_ACCESS_KEY": "itest",
             "AWS_DEFAULT_REGION": "us-east-1"}
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id="itest", aws_secret_access_key="itest")
    s3.create_bucket(Bucket="grid")
    transports = {"shm": "shm://", "file": f"file://{file_dir}", "tcp": "tcp://127.0.0.1:0",
                  "s3": f"s3://grid/runs?endpoint_url={endpoint}", "inband": "inband"}
    shm_before = ftx_names()
    out = {}
    try:
        with LocalDeployment(n_supernodes=2, workdir=base / "deploy", env=creds) as dep:
            for name, url in transports.items():
                result = base / f"{name}.npz"
                res = dep.run(APP, {"transport": url, "model-mib": MODEL_MIB,
                                    "result-path": str(result),
                                    "release-path": str(base / f"{name}.release")},
                              timeout=300)
                assert res.ok, f"{name}: {res.status}\n{res.output[-4000:]}"
                with np.load(result) as z:
                    arrays = {k: z[k] for k in z.files}
                summary = json.loads(Path(str(result) + ".json").read_text())
                out[name] = (arrays, summary)
        s3_left = [o["Key"] for o in s3.list_objects_v2(Bucket="grid").get("Contents", [])]
        s3_left += [u["Key"] for u in
                    s3.list_multipart_uploads(Bucket="grid").get("Uploads", [])]
    finally:
        s3srv.stop()
    return {"runs": out, "file_left": sorted(p.name for p in file_dir.iterdir()),
            "shm_new": _dead_owner(ftx_names() - shm_before), "s3_left": s3_left}


@pytest.mark.integration
@pytest.mark.parametrize("name", ["shm", "file", "tcp", "s3"])
def test_custom_main_loop_identical_to_inband(runs, name):
    ref, ref_summary = runs["runs"]["inband"]
    got, summary = runs["runs"][name]
    assert list(got) == list(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and np.array_equal(got[k], ref[k]), (name, k)
    assert summary["eval_l1"] == ref_summary["eval_l1"]
    assert summary["train_replies"] == 2 and summary["train_errors"] == []
    assert len(summary["first_batch"]) == 1  # the replies came in two pulls


@pytest.mark.integration
@pytest.mark.parametrize("name", ["shm", "file", "tcp", "s3", "inband"])
def test_the_slow_node_misses_the_timeout(runs, name):
    assert runs["runs"][name][1]["query_replies"] == [0]


@pytest.mark.integration
@pytest.mark.parametrize("name", ["shm", "file", "tcp", "s3"])
def test_payloads_went_over_the_link(runs, name):
    stats = runs["runs"][name][1]["stats"]
    model = MODEL_MIB * 2**20
    # the model once for train (shared record), once for evaluate; 2 updates back
    assert stats["link_bytes_sent"] >= 2 * model * 0.99, stats
    assert stats["link_bytes_received"] >= 2 * model * 0.99, stats
    assert stats["inband_bytes_sent"] < 64 * 1024, stats
    assert stats["replies_rejected"] == 0


@pytest.mark.integration
def test_nothing_left_behind(runs):
    assert runs["file_left"] == []
    assert runs["shm_new"] == []
    assert runs["s3_left"] == []
