"""aggregation=ray (flwr_transports.aggregation.ray_shards) on a real local Ray cluster
(started once for the module, 2 CPUs) and a real embedded S3 server (moto).

Real strategies, real ClientApps with payload_mod, the in-process grid standing in for
the network (tests/inproc.py): the model Ray's shard actors fold straight from the
store equals ``aggregation=streaming``'s within float rounding, every round, with a
digest lie, an error reply, a lost node and a weight lie in round 2; an actor killed
mid-round is replaced and its shard re-folded; nothing is left in the bucket or as a
Ray actor after the run.
"""

from __future__ import annotations

import itertools
import time
import uuid

import numpy as np
import pytest
from moto_store import moto_endpoint as _moto

ray = pytest.importorskip("ray", reason="aggregation=ray needs the ray extra")
import moto.server  # noqa: F401 - a dev dependency: missing is a failure
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian
from test_aggregation import FaultyGrid, _app, _compare

from flwr_transports import offload
from flwr_transports.aggregation.ray_shards import cut, windows_of
from flwr_transports.codec import encode

CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
         "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local Ray cluster for the module (Ray starts slowly); its session files are
    removed with it."""
    import shutil

    tmp = tmp_path_factory.mktemp("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=200 * 2**20, configure_logging=False, _temp_dir=str(tmp))
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def store():
    with _moto() as endpoint:
        yield endpoint


@pytest.fixture
def bucket(store):
    import boto3

    s3 = boto3.client("s3", endpoint_url=store, region_name="us-east-1")
    name = f"ftx-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    yield s3, name


def _leftovers(s3, bucket):
    objs = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    ups = [u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    return objs, ups


def _gone(names, timeout=20.0) -> bool:
    """No actor of these names is alive (ray.kill is asynchronous)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        alive = []
        for n in names:
            try:
                ray.get_actor(n)
                alive.append(n)
            except ValueError:
                pass
        if not alive:
            return True
        time.sleep(0.2)
    return False


def _big() -> ArrayRecord:
    """~21 MiB: two 16 MiB windows, an array straddling them, every fold kind."""
    r = np.random.default_rng(7)
    return ArrayRecord({"w": Array(r.standard_normal((2300, 2301)).astype(np.float32)),
                        "b": Array(r.standard_normal(1001)),
                        "h": Array(r.standard_normal(3000).astype(np.float16)),
                        "steps": Array(np.arange(6, dtype=np.int64))})


# -- unit: the cut -----------------------------------------------------------------------
def test_cut_covers_every_element_once_and_every_window():
    rec = _big()
    plan_src = encode(rec, {"flwr_transports.weight": "123"}).to_bytes()
    from flwr_transports.aggregation import plan_payload

    plan = plan_payload(lambda o, n: plan_src[o:o + n], len(plan_src))
    for k in (1, 2, 3, 7):
        shards = cut(plan, k)
        assert 1 <= len(shards) <= min(k, 2)
        for idx, a in enumerate(plan.arrays):  # each element owned by exactly one shard
            spans = sorted(s[idx] for s in shards if idx in s)
            assert spans[0][0] == 0 and spans[-1][1] == a.count
            assert all(x[1] == y[0] for x, y in itertools.pairwise(spans))
        wins = [windows_of(plan, shards, j) for j in range(len(shards))]
        assert wins[0][0] == 0 and wins[-1][1] == 2
        assert all(x[1] >= y[0] for x, y in itertools.pairwise(wins))  # no window unread


# -- strategy level on Ray ---------------------------------------------------------------
def _grid(n_nodes=5, faulty=True):
    return FaultyGrid(_app(), n_nodes=n_nodes, faulty=faulty)


def _ray_run(strategy, url, grid, hook=None):
    s = offload(strategy, transport=url)
    if hook is not None:
        s._ray.after_submit = hook
    # each reply waits until its upload landed on the link (and went to the shard
    # owners), as in a deployment where Flower takes seconds to deliver it
    grid.stream = lambda: s._streams.get(grid.round)
    import random

    random.seed(1234)
    res = s.start(grid, _big(), num_rounds=2)
    return s, res


def test_ray_equals_streaming_with_hostile_replies(cluster, bucket):
    """Round 2: a digest lie (rejected), an error reply, a lost node and a weight lie
    (in-band weight counts): the shard sums are rebuilt from the store without them."""
    s3, b = bucket
    url = f"s3://{b}/runs?endpoint_url={_endpoint(s3)}"
    s_st, r_st = _ray_run(FedAvg(), f"{url}&aggregation=streaming", _grid())
    s_ray, r_ray = _ray_run(FedAvg(), f"{url}&aggregation=ray&ray_shards=2", _grid())
    assert s_ray._ray is not None and s_ray.stats["agg_streamed_rounds"] == 2
    assert s_ray.stats["replies_rejected"] == s_st.stats["replies_rejected"] == 1
    # uploads were folded by the shard owners as they landed; round 2's (a digest lie,
    # an error reply, a lost node, a weight lie) do not all count: ONE rebuild
    assert s_ray.stats["agg_eager_folds"] >= 5
    assert s_ray.stats["agg_rebuilds"] == 1
    _compare(r_st, r_ray)
    assert _leftovers(s3, b) == ([], [])
    assert len(s_ray._ray.history) == 2 and _gone(s_ray._ray.history)


def test_actor_killed_mid_round_is_replaced_and_refolded(cluster, bucket, monkeypatch):
    """Round 1: shard owner 1 is killed while the uploads are being folded; round 2:
    owner 0 is killed right before the mean is collected. Each is replaced and its
    shard re-folded from the store: the same model as streaming."""
    from flwr_transports.aggregation.ray_shards import RayRoundStream

    s3, b = bucket
    url = f"s3://{b}/runs?endpoint_url={_endpoint(s3)}"
    killed = []

    def kill(n, cl):
        if n == 1 and not killed:  # round 1, after the second upload's folds went out
            killed.append(cl.names[1])
            ray.kill(cl.actors[1], no_restart=True)

    assemble = RayRoundStream.assemble

    def kill_then_assemble(self, plan, total):
        if self.round == 2:
            killed.append(self.cluster.names[0])
            ray.kill(self.cluster.actors[0], no_restart=True)
        return assemble(self, plan, total)

    monkeypatch.setattr(RayRoundStream, "assemble", kill_then_assemble)

    _, r_st = _ray_run(FedAvg(), f"{url}&aggregation=streaming", _grid(3, faulty=False))
    s_ray, r_ray = _ray_run(FedAvg(), f"{url}&aggregation=ray&ray_shards=2",
                            _grid(3, faulty=False), hook=kill)
    assert len(killed) == 2 and s_ray._ray.restarts >= 2
    _compare(r_st, r_ray)
    assert _leftovers(s3, b) == ([], [])
    assert _gone(s_ray._ray.history)


def test_fedadam_on_ray_equals_streaming(cluster, bucket):
    """The server-side step runs on the mean assembled from the shards."""
    s3, b = bucket
    url = f"s3://{b}/runs?endpoint_url={_endpoint(s3)}"
    _, r_st = _ray_run(FedAdam(), f"{url}&aggregation=streaming", _grid(3, faulty=False))
    _, r_ray = _ray_run(FedAdam(), f"{url}&aggregation=ray", _grid(3, faulty=False))
    _compare(r_st, r_ray, tol=1e-5)
    assert _leftovers(s3, b) == ([], [])


def test_ray_is_only_for_the_weighted_mean_and_s3(cluster, tmp_path, caplog):
    s = offload(FedMedian(), transport=f"file://{tmp_path}", aggregation="ray")
    assert not s.streaming and s._ray is None
    s = offload(FedAvg(), transport=f"file://{tmp_path}", aggregation="ray")
    assert s.streaming and s._ray is None  # streams in the ServerApp, says why


def _endpoint(s3) -> str:
    return s3.meta.endpoint_url


def test_losing_the_cluster_fails_the_run_and_leaves_nothing(cluster, bucket):
    """The ServerApp loses its Ray (here: its connection shut down mid-round): the run
    fails with RayClusterError naming what happened, and the bucket is left empty.
    (Last in the module: it ends the module's Ray.)"""
    from flwr_transports.aggregation.ray_shards import RayClusterError

    s3, b = bucket
    url = f"s3://{b}/runs?endpoint_url={_endpoint(s3)}&aggregation=ray&ray_shards=2"

    def lose(n, cl):
        if n == 0:
            ray.shutdown()

    with pytest.raises(RayClusterError, match="Ray cluster"):
        _ray_run(FedAvg(), url, _grid(2, faulty=False), hook=lose)
    assert _leftovers(s3, b) == ([], [])
