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
import os
import time
import uuid

import numpy as np
import pytest
from moto_store import moto_endpoint as _moto

ray = pytest.importorskip("ray", reason="aggregation=ray needs the ray extra")
import moto.server  # noqa: F401 - a dev dependency: missing is a failure
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian
from test_aggregation import FaultyGrid, _app, _compare, _max_rel

from flwr_transports import offload
from flwr_transports.aggregation.ray_shards import cut, windows_of
from flwr_transports.codec import decode, encode

CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
         "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local Ray cluster for the module (Ray starts slowly); its session files are
    removed with it."""
    import shutil

    tmp = tmp_path_factory.mktemp("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=400 * 2**20, configure_logging=False, _temp_dir=str(tmp))
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


def _ray_run(strategy, url, grid, hook=None, rounds=2, initial=None):
    s = offload(strategy, transport=url)
    if hook is not None:
        s._ray.after_submit = hook
    # each reply waits until its upload landed on the link (and went to the shard
    # owners), as in a deployment where Flower takes seconds to deliver it
    grid.stream = lambda: s._streams.get(grid.round)
    import random

    random.seed(1234)
    res = s.start(grid, _big() if initial is None else initial, num_rounds=rounds)
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


def test_an_upload_changed_in_the_store_before_a_refold_is_never_counted(
        cluster, bucket, monkeypatch):
    """Round 1: after the replies were folded and verified, one upload is overwritten in
    the store (one byte in shard 0's windows) and owner 0 is killed before the mean is
    collected: its successor's re-fold reads windows that no longer hash to the reply's
    digest, and the round fails (it cannot give the sum the verified bytes gave) instead
    of counting the changed bytes; the bucket is left empty."""
    from urllib.parse import unquote, urlsplit

    from flwr_transports.aggregation.ray_shards import WINDOW, RayRoundStream, StoreChangedError

    s3, b = bucket
    url = f"s3://{b}/runs?endpoint_url={_endpoint(s3)}&aggregation=ray&ray_shards=2"
    changed = []
    assemble = RayRoundStream.assemble

    def change_kill_assemble(self, plan, total):
        _first, jobs = self._final
        a, p, remote = jobs[-1]
        path = unquote(urlsplit(remote["url"]).path).lstrip("/")
        bkt, key = path.split("/", 1)
        body = bytearray(s3.get_object(Bucket=bkt, Key=key)["Body"].read())
        _t0, t1 = windows_of(p, self.shards, 0)
        at = min(t1 * WINDOW, len(body)) - 100  # in shard 0's windows (data, not header)
        body[at] ^= 0xFF
        s3.put_object(Bucket=bkt, Key=key, Body=bytes(body))
        changed.append(a.index)
        ray.kill(self.cluster.actors[0], no_restart=True)
        return assemble(self, plan, total)

    monkeypatch.setattr(RayRoundStream, "assemble", change_kill_assemble)
    with pytest.raises(StoreChangedError, match=r"changed in the store after it was verified"):
        _ray_run(FedAvg(), url, _grid(3, faulty=False))
    assert len(changed) == 1
    assert _leftovers(s3, b) == ([], [])


def test_fedadam_on_ray_equals_streaming(cluster, bucket, monkeypatch):
    """FedAdam's step runs on the shard owners, on the sums they folded from the store
    (its moments live there, not in the ServerApp): the same model as streaming,
    where Flower's FedAdam steps in the ServerApp. The owners write each new model to
    the store themselves (ray_model=store): the ServerApp never collects it. Round 2:
    owner 1 is killed after its step, before its part is written: its successor serves
    the new model from the state that step left, and writes the part."""
    from flwr_transports.aggregation.ray_step import ShardStep

    def collected(*a, **k):
        raise AssertionError("the ServerApp collected the new model")

    monkeypatch.setattr(ShardStep, "_collect", collected)
    s3, b = bucket
    url = f"s3://{b}/runs?endpoint_url={_endpoint(s3)}"
    _, r_st = _ray_run(FedAdam(), f"{url}&aggregation=streaming", _grid(3, faulty=False))
    killed = []

    def kill(todo, cl):
        if cl.step.steps == 1 and not killed:  # round 2, after the owners' step
            killed.append(cl.names[1])
            ray.kill(cl.actors[1], no_restart=True)

    s_ray, r_ray = _ray_run(FedAdam(), f"{url}&aggregation=ray", _grid(3, faulty=False),
                            hook=lambda n, cl: setattr(cl, "before_write", kill))
    assert killed and s_ray._ray.restarts == 1
    step = s_ray._trainer
    assert step is not s_ray.inner and step.steps == 2 and step.seeded == 1
    assert s_ray.stats["agg_streamed_rounds"] == 2
    assert s_ray.inner.m_t is None and s_ray.inner.current_arrays is None
    _compare(r_st, r_ray, tol=1e-5)
    assert _leftovers(s3, b) == ([], [])
    assert _gone(s_ray._ray.history)


def test_owners_write_the_model_clients_decode_the_same_as_streaming(
        cluster, bucket, monkeypatch):
    """ray_model=store (the default): each round's model is written to the store by the
    shard owners as the parts of one multipart upload and handed out by reference: its
    digest is encode()'s of the same record, a client reading it gets, bit for bit, the
    model aggregation=streaming computes, and the ServerApp never assembles it. Round 2:
    shard owner 1 is killed before any part is uploaded (replaced: its shard re-folded
    from the store, the round still right). Result.arrays is read back once at the end.
    Again with encrypt=true: the owners seal the parts with the object's key from the
    ServerApp; clients decrypt the model (within float rounding of streaming's: the
    replies are folded in another order when nothing is folded on landing). Nothing is left in the bucket (objects or
    unfinished uploads) or as a Ray actor."""
    from flwr_transports.aggregation.ray_shards import RayRoundStream
    from flwr_transports.flower import wrapper
    from flwr_transports.links.s3 import S3ClientLink

    s3, b = bucket
    url = f"s3://{b}/runs?endpoint_url={_endpoint(s3)}"
    seen: dict[str, list] = {"streaming": [], "store": []}
    agg = wrapper.OffloadStrategy.aggregate_train

    def keep(self, rnd, replies):
        out = agg(self, rnd, replies)
        if self.aggregation == "streaming":
            seen["streaming"].append(out[0])
        return out

    written, sealed = [], []
    complete = wrapper._OwnerSink.complete

    def read_as_a_client(self, up, etags, lay, digest):
        stub = complete(self, up, etags, lay, digest)
        _name, pub = self._w._owned_of(stub)
        stored = s3.head_object(Bucket=b, Key=pub.loc["key"])["ContentLength"]
        sealed.append(("enc" in pub.loc, stored - pub.raw_size, -(-pub.raw_size // 2**20)))
        src = S3ClientLink().open(pub.loc, pub.raw_size)  # what a client does
        try:
            seen["store"].append(decode(src.read, pub.raw_size, pub.digest))
        finally:
            src.close()
        written.append((digest, len(etags)))
        return stub

    def assembled(*a, **k):
        raise AssertionError("the ServerApp assembled the model")

    killed = []

    def kill(todo, cl):
        if len(written) == 1 and not killed:  # round 2, before any part is uploaded
            killed.append(cl.names[1])
            ray.kill(cl.actors[1], no_restart=True)

    monkeypatch.setattr(wrapper.OffloadStrategy, "aggregate_train", keep)
    monkeypatch.setattr(wrapper._OwnerSink, "complete", read_as_a_client)
    monkeypatch.setattr(RayRoundStream, "_collect_shard", assembled)
    _, r_st = _ray_run(FedAvg(), f"{url}&aggregation=streaming", _grid(3, faulty=False))

    s_ray, r_ray = _ray_run(FedAvg(), f"{url}&aggregation=ray&ray_shards=2",
                            _grid(3, faulty=False),
                            hook=lambda n, cl: setattr(cl, "before_write", kill))
    assert len(written) == 2 and killed and s_ray._ray.restarts >= 1
    assert all(parts == 2 for _d, parts in written)  # ~21 MiB: two 16 MiB windows
    for rnd, (mine, theirs) in enumerate(zip(seen["store"], seen["streaming"],
                                             strict=True), 1):
        assert encode(mine).digest == written[rnd - 1][0]  # the digest is encode()'s
        for k in theirs:  # FedAvg: the same sums, the same model, bit for bit
            x, y = theirs[k].numpy(), mine[k].numpy()
            assert x.dtype == y.dtype and np.array_equal(x, y), (rnd, k)
    assert encode(r_ray.arrays).digest == written[-1][0]  # Result.arrays, read back
    _compare(r_st, r_ray, tol=0)
    assert _leftovers(s3, b) == ([], [])
    assert _gone(s_ray._ray.history)
    assert [x[:2] for x in sealed] == [(False, 0)] * 2
    s_enc = offload(FedAvg(), f"{url}&aggregation=ray&ray_shards=2&encrypt=true")
    # (encrypted uploads are not folded on landing: nothing to wait for)
    r_enc = s_enc.start(_grid(3, faulty=False), _big(), num_rounds=2)
    # sealed: one 16-byte GCM tag per 1 MiB chunk of the payload
    assert len(written) == 4
    for enc, extra, chunks in sealed[2:]:
        assert enc and extra == 16 * chunks, sealed
    for mine, theirs in zip(seen["store"][2:], seen["streaming"], strict=True):
        for k in theirs:  # folded in another order (at settle time): float rounding
            assert _max_rel(theirs[k].numpy(), mine[k].numpy()) <= 1e-6, k
    _compare(r_st, r_enc)
    assert _leftovers(s3, b) == ([], [])
    assert _gone(s_enc._ray.history)


def test_final_model_store_keeps_the_last_model_outside_the_run(cluster, bucket):
    """final_model=store: the owners' last object is copied inside the store to a key
    outside the run's ftx- keys; Result.arrays is its reference; load_model reads it
    back, verified, bit for bit what the same run without the option returns. Nothing
    else is left in the bucket. A hostile or stale reference fails clearly."""
    from flwr_transports import load_model
    from flwr_transports.codec import PayloadError
    from flwr_transports.flower import wrapper
    from flwr_transports.stored import StoredModelError, parse_stored_ref, stored_ref

    s3, b = bucket
    url = f"s3://{b}/runs?endpoint_url={_endpoint(s3)}&aggregation=ray&ray_shards=2"
    _, r_mat = _ray_run(FedAvg(), url, _grid(3, faulty=False), rounds=1)
    assert _leftovers(s3, b) == ([], [])
    _, r = _ray_run(FedAvg(), f"{url}&final_model=store", _grid(3, faulty=False), rounds=1)
    ref = parse_stored_ref(r.arrays)
    assert ref["bucket"] == b and ref["key"].startswith("runs/final/ftx-")
    assert _leftovers(s3, b) == ([ref["key"]], [])  # only the kept model
    assert s3.head_object(Bucket=b, Key=ref["key"])["ContentLength"] == ref["size"]
    assert ref["digest"] == encode(r_mat.arrays).digest
    got = load_model(url, r.arrays)
    assert list(got.keys()) == list(r_mat.arrays.keys())
    for k in got:
        x, y = got[k].numpy(), r_mat.arrays[k].numpy()
        assert x.dtype == y.dtype and np.array_equal(x, y), k
    # hostile references: wrong digest, wrong size, missing object, other bucket, junk
    bad = dict(ref, digest="sha256t:" + "0" * 64)
    with pytest.raises(PayloadError, match="digest"):
        load_model(url, stored_ref(**{k: bad[k] for k in
                                      ("bucket", "key", "digest", "size", "n_arrays")}))
    with pytest.raises(StoredModelError, match="bytes, the reference says"):
        load_model(url, stored_ref(b, ref["key"], ref["digest"], ref["size"] + 1, 4))
    with pytest.raises(StoredModelError, match="no such object"):
        load_model(url, stored_ref(b, "runs/final/nope.ftx", ref["digest"], ref["size"], 4))
    with pytest.raises(StoredModelError, match="pass the run's URL"):
        load_model(url, stored_ref("elsewhere", ref["key"], ref["digest"], ref["size"], 4))
    with pytest.raises(StoredModelError, match="not a stored-model reference"):
        load_model(url, r_mat.arrays)
    # the kept model as the next run's initial_arrays: published by reference (copied
    # in the store, never read by the ServerApp); the clients train from it (round 1's
    # noise added to it, not to _big()), the original stays, the new one is kept too
    def never(*a, **k):
        raise AssertionError("the ServerApp read the model")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(wrapper.OffloadStrategy, "_materialise", never)
        s_c, r_c = _ray_run(FedAvg(), f"{url}&final_model=store&final_key=kept/c.ftx",
                            _grid(3, faulty=False), rounds=1, initial=r.arrays)
    assert s_c.stats["replies_rejected"] == 0
    assert sorted(_leftovers(s3, b)[0]) == sorted([ref["key"], "kept/c.ftx"])
    got_c, start = load_model(url, r_c.arrays), _big()
    for k in ("w", "b"):
        want = got[k].numpy() + (r_mat.arrays[k].numpy() - start[k].numpy())
        assert np.allclose(got_c[k].numpy(), want, rtol=0, atol=1e-5), k
    s3.delete_object(Bucket=b, Key="kept/c.ftx")
    hostile = [(stored_ref(b, "runs/final/nope.ftx", ref["digest"], ref["size"], 4),
                "no such object"),
               (stored_ref(b, ref["key"], ref["digest"], ref["size"] - 1, 4),
                "bytes, the reference says"),
               (stored_ref(b, ref["key"], ref["digest"], ref["size"], 5), "does not match"),
               (stored_ref("elsewhere", ref["key"], ref["digest"], ref["size"], 4),
                "the transport's is")]
    for bad_ref, why in hostile:
        with pytest.raises(StoredModelError, match=why):
            offload(FedAvg(), url).start(_grid(3, faulty=False), bad_ref, num_rounds=1)
        assert _leftovers(s3, b) == ([ref["key"]], [])
    with pytest.raises(StoredModelError, match="server step on the shard owners"):
        offload(FedAdam(), url).start(_grid(3, faulty=False), r.arrays, num_rounds=1)
    s3.delete_object(Bucket=b, Key=ref["key"])
    for key in ("runs/ftx-x", "/abs", "a/ftx-b/c"):  # inside the run's keys, absolute
        with pytest.raises(ValueError, match="final_key"):
            offload(FedAvg(), f"{url}&final_model=store&final_key={key}")
    assert _leftovers(s3, b) == ([], [])
    with pytest.raises(ValueError, match="final_model=store needs"):
        offload(FedAvg(), f"{url}&final_model=store&ray_model=server")


def test_a_final_model_above_copy_objects_limit_is_copied_in_parts(bucket, monkeypatch):
    """Above S3's 5 GiB CopyObject limit the final model is copied with UploadPartCopy
    (here the limits made small: 3 parts of at most 5 MiB): the kept object is the same
    bytes, load_model verifies them; no unfinished upload is left."""
    from flwr_transports import load_model
    from flwr_transports.links import s3 as s3link
    from flwr_transports.stored import stored_ref

    s3, b = bucket
    url = f"s3://{b}/runs?endpoint_url={_endpoint(s3)}&publish=sync"
    monkeypatch.setattr(s3link, "COPY_MAX", 0)
    monkeypatch.setattr(s3link, "COPY_PART", 5 * 2**20)
    rec = ArrayRecord({"w": Array(np.random.default_rng(3).standard_normal(
        3 * 2**20 + 5).astype(np.float32))})
    payload = encode(rec)
    link = s3link.S3ServerLink(url, 7)
    try:
        link.publish("m", payload)
        key = link.keep_published("m", payload.size, "kept/m.ftx")
    finally:
        link.close()
    assert _leftovers(s3, b) == (["kept/m.ftx"], [])
    got = load_model(url, stored_ref(b, key, payload.digest, payload.size, 1))
    assert np.array_equal(got["w"].numpy(), rec["w"].numpy())
    s3.delete_object(Bucket=b, Key=key)


class _Damped(FedAvg):
    """A strategy that streams (declared), computes on the mean itself and reads the
    model it sends for evaluation."""

    streaming_aggregation = True

    def configure_evaluate(self, server_round, arrays, config, grid):
        config["b0"] = float(arrays["b"].numpy()[0])
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            arrays = ArrayRecord({k: Array(np.asarray(a.numpy() * 0.5)) for k, a in
                                  arrays.items()})
        return arrays, metrics


def test_an_evaluate_fn_gets_the_model_assembled_in_the_serverapp(cluster, bucket, caplog):
    """Flower hands an evaluate_fn the model's arrays every round, and a strategy may
    compute on the mean in its own aggregate_train: then the ServerApp assembles the
    model (as with ray_model=server) and says why, once; the owners write nothing."""
    import logging

    s3, b = bucket
    url = f"s3://{b}/runs?endpoint_url={_endpoint(s3)}&aggregation=ray&ray_shards=2"
    got = []

    def evaluate(rnd, arrays):
        got.append((rnd, float(arrays["b"].numpy().sum())))  # real data, every round

    s = offload(_Damped(), url)
    with caplog.at_level(logging.INFO, logger="flwr_transports"):
        r = s.start(_grid(3, faulty=False), _big(), num_rounds=2, evaluate_fn=evaluate)
    assert [n for n, _ in got] == [0, 1, 2]
    assert got[2][1] == float(r.arrays["b"].numpy().sum())
    said = [m for m in caplog.messages if "an evaluate_fn reads the model" in m]
    assert len(said) == 1 and "assembled in the ServerApp" in said[0]
    assert "_Damped.aggregate_train computes on the mean" in said[0]
    assert "_Damped.configure_evaluate is the app's own" in said[0]
    assert s.stats["agg_streamed_rounds"] == 2
    assert _leftovers(s3, b) == ([], [])


# -- the server step on the shard owners -------------------------------------------------
def _model() -> ArrayRecord:
    """~0.6 MiB, every dtype FedAvg averages; the owners' partition (cut at 64 KiB in the
    test) falls inside "w"."""
    r = np.random.default_rng(3)
    return ArrayRecord({"w": Array(r.standard_normal((300, 500)).astype(np.float32)),
                        "b": Array(r.standard_normal(1001)),
                        "h": Array(r.standard_normal(3000).astype(np.float16)),
                        "steps": Array(np.arange(6, dtype=np.int64))})


def _replies(msgs, arrays, rnd):
    """One reply per message, the same for both strategies: the model plus noise (in
    its dtype), weight 10 * node + round."""
    from flwr.app import Message, MetricRecord, RecordDict

    out = []
    for msg in sorted(msgs, key=lambda m: m.metadata.dst_node_id):
        node = msg.metadata.dst_node_id
        r = np.random.default_rng(100 * rnd + node)
        rec = ArrayRecord({k: Array((v.numpy() + r.standard_normal(v.shape)).astype(
            v.numpy().dtype)) for k, v in arrays.items()})
        out.append(Message(RecordDict({"arrays": rec, "metrics": MetricRecord(
            {"num-examples": 10 * (node - 100) + rnd})}), reply_to=msg))
    return out


STEPPED = {
    "FedAdam": lambda: __import__("flwr.serverapp.strategy", fromlist=["x"]).FedAdam(
        eta=0.05, beta_1=0.8, beta_2=0.95, tau=1e-2),
    "FedYogi": lambda: __import__("flwr.serverapp.strategy", fromlist=["x"]).FedYogi(
        eta=0.03, tau=1e-2),
    "FedAdagrad": lambda: __import__("flwr.serverapp.strategy", fromlist=["x"]).FedAdagrad(
        eta=0.2),
    "FedAvgM": lambda: __import__("flwr.serverapp.strategy", fromlist=["x"]).FedAvgM(
        server_learning_rate=0.7, server_momentum=0.9),
}


def test_server_step_on_the_owners_equals_flowers_classes(cluster, monkeypatch):
    """FedAdam, FedYogi, FedAdagrad and FedAvgM (non-default hyper-parameters, eta
    changed by the app after round 2) stepped by 3 shard owners, 4 rounds, against
    Flower's own class given the same replies: bit-identical arrays and dtypes every
    round (the mean here is Flower's, from decoded replies; the step elementwise). The
    optimiser state never enters the ServerApp. FedAdam's owner 1 is killed after round
    2 (its successor steps from the same state), owner 2 after its round-4 step, while
    the new model is collected (its successor serves it from the state that step
    left)."""
    from flwr.app import ConfigRecord
    from inproc import InProcessGrid
    from test_aggregation import _app as app

    from flwr_transports.aggregation import ray_step
    from flwr_transports.aggregation.ray_shards import RayCluster

    monkeypatch.setattr(ray_step, "STEP_GRAIN", 64 << 10)
    collect = ray_step.ShardStep._collect

    def kill_then_collect(self, j, info, bodies, chunk):
        if self._round == 4 and j == 2 and not self._killed:
            self._killed = True
            ray.kill(self.cluster.actors[2], no_restart=True)
        return collect(self, j, info, bodies, chunk)

    monkeypatch.setattr(ray_step.ShardStep, "_collect", kill_then_collect)
    grid = InProcessGrid(app(), n_nodes=3)
    rc = RayCluster(shards=3)
    try:
        for name, make in STEPPED.items():
            rc.pinned = rc.step = None
            flower, mine = make(), make()
            step, why = ray_step.shard_trainer(mine, rc)
            step._killed = name != "FedAdam"  # (restarts are slow: one class is enough)
            assert isinstance(step, ray_step.ShardStep) and "shard owners" in why, name
            a_f = a_o = _model()
            for rnd in range(1, 5):
                if rnd == 3 and name != "FedAvgM":  # read every round, as Flower does
                    flower.eta = mine.eta = flower.eta / 2
                msgs = list(flower.configure_train(rnd, a_f, ConfigRecord(), grid))
                list(step.configure_train(rnd, a_o, ConfigRecord(), grid))
                a_f, _ = flower.aggregate_train(rnd, _replies(msgs, a_f, rnd))
                step._round = rnd
                a_o, _ = step.aggregate_train(rnd, _replies(msgs, a_o, rnd))
                for k in a_f:
                    x, y = a_f[k].numpy(), a_o[k].numpy()
                    assert x.dtype == y.dtype and np.array_equal(x, y), (name, rnd, k)
                if rnd == 2 and name == "FedAdam":
                    ray.kill(rc.actors[1], no_restart=True)
            assert len(rc.pinned[1]) == 3 and step.steps == 4
            # the owners stepped from their own result after round 1
            assert step.seeded == 1
            # no optimiser state in the ServerApp's strategy
            assert all(getattr(mine, a, None) is None for a in
                       ("m_t", "v_t", "momentum_vector", "current_arrays")), name
        assert rc.restarts == 2
    finally:
        rc.close()
    assert _gone(rc.history)


def test_which_server_steps_run_on_the_owners(caplog):
    """The one decision: Flower's own classes step on the owners; a subclass that
    replaces the step, state the strategy already holds, a hyper-parameter the owners
    cannot take keep the step in the ServerApp, and the log line says why."""
    from flwr.serverapp.strategy import FedAdagrad, FedAvgM, FedProx, FedYogi

    from flwr_transports.aggregation.ray_step import shard_step_decision

    class MyAdam(FedAdam):
        streaming_aggregation = True

        def aggregate_train(self, server_round, replies):
            return super().aggregate_train(server_round, replies)

    class Renamed(FedYogi):  # same step, another name: still Flower's code
        pass

    held = FedAdam()
    held.m_t = {"w": np.zeros(1)}
    weird = FedAdagrad()
    weird.eta = float("nan")
    assert shard_step_decision(FedAdam())[0] == "adam"
    assert shard_step_decision(Renamed())[0] == "yogi"
    assert shard_step_decision(FedAvgM(server_momentum=0.5))[0] == "avgm"
    assert shard_step_decision(FedAvg()) == (None, "")
    assert shard_step_decision(FedProx()) == (None, "")
    assert shard_step_decision(FedAvgM()) == (None, "")  # no server step: the mean
    assert "overrides aggregate_train" in shard_step_decision(MyAdam())[1]
    assert "already holds optimiser state (m_t)" in shard_step_decision(held)[1]
    assert "eta is not a finite real number" in shard_step_decision(weird)[1]
    with caplog.at_level("INFO", logger="flwr_transports"):
        s = offload(MyAdam(), transport="s3://b/p?aggregation=ray")
    assert s._ray is not None and s._ray.step is None and s._trainer is s.inner
    assert "server step stays in the ServerApp: MyAdam overrides aggregate_train" in (
        caplog.text)
    s = offload(FedAdam(), transport="s3://b/p?aggregation=ray")
    assert s._trainer is s._ray.step and s._trainer.kind == "adam"
    # decided again on the first model sent, before any state exists: a Fortran-ordered
    # array keeps the step in the ServerApp (Flower's own configure_train then runs)
    from flwr.app import ConfigRecord
    from inproc import InProcessGrid
    from test_aggregation import _app as app

    step = s._trainer
    rec = ArrayRecord({"w": Array(np.asfortranarray(np.ones((3, 4), np.float32)))})
    with caplog.at_level("INFO", logger="flwr_transports"):
        list(step.configure_train(1, rec, ConfigRecord(), InProcessGrid(app(), n_nodes=2)))
    assert step.off and s._ray.step is None and s.inner.current_arrays is not None
    assert "FedAdam's server step stays in the ServerApp: array 'w': Fortran" in caplog.text


def test_ray_is_only_for_the_weighted_mean_and_s3_and_file(cluster, tmp_path, caplog):
    s = offload(FedMedian(), transport=f"file://{tmp_path}", aggregation="ray")
    assert not s.streaming and s._ray is None
    s = offload(FedAvg(), transport="shm://", aggregation="ray")
    assert s.streaming and s._ray is None  # streams in the ServerApp, says why
    s = offload(FedAvg(), transport=f"file://{tmp_path}", aggregation="ray")
    assert s.streaming and s._ray is not None and s._ray.sink is None  # model: ServerApp
    with pytest.raises(ValueError, match="final_model=store needs an s3://"):
        offload(FedAvg(), transport=f"file://{tmp_path}?aggregation=ray&final_model=store")


# -- file:// on a (here: local) shared filesystem ----------------------------------------
def _ftx_files(d) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_file_ray_equals_streaming_with_hostile_replies(cluster, tmp_path, monkeypatch):
    """file:// with aggregation=ray: the owners pread each accepted upload's windows
    from the path the link issued; round 2's digest lie is excluded exactly (its root
    never matches), with the error reply, lost node and weight lie, and owner 0 is
    killed before round 2's mean is collected (its successor re-folds its shard from
    the files): the same model as streaming in the ServerApp, nothing left in the
    directory or as a Ray actor."""
    from flwr_transports.aggregation.ray_shards import RayRoundStream

    d = tmp_path / "shared"
    d.mkdir()
    url = f"file://{d}?threshold=0"
    assemble = RayRoundStream.assemble
    killed = []

    def kill_then_assemble(self, plan, total):
        if self.round == 2:
            killed.append(self.cluster.names[0])
            ray.kill(self.cluster.actors[0], no_restart=True)
        return assemble(self, plan, total)

    monkeypatch.setattr(RayRoundStream, "assemble", kill_then_assemble)
    s_st, r_st = _ray_run(FedAvg(), f"{url}&aggregation=streaming", _grid())
    s_ray, r_ray = _ray_run(FedAvg(), f"{url}&aggregation=ray&ray_shards=2", _grid())
    assert s_ray._ray is not None and s_ray.stats["agg_streamed_rounds"] == 2
    assert len(killed) == 1 and s_ray._ray.restarts == 1
    assert s_ray.stats["replies_rejected"] == s_st.stats["replies_rejected"] == 1
    assert s_ray.stats["agg_eager_folds"] >= 5  # folded by the owners as they landed
    assert s_ray.stats["agg_rebuilds"] == 1
    _compare(r_st, r_ray)
    assert _ftx_files(d) == []
    assert len(s_ray._ray.history) == 3 and _gone(s_ray._ray.history)


def test_file_ray_upload_replaced_before_a_refold_fails_the_round(
        cluster, tmp_path, monkeypatch):
    """After the replies were verified, one upload file is REPLACED (a new file renamed
    over the slot path, one byte flipped in shard 0's windows: what a client with write
    access to the directory could do) and owner 0 is killed: the re-fold reads bytes
    that do not hash to the verified leaves and the round fails with StoreChangedError
    instead of counting them. Nothing left in the directory."""
    from flwr_transports.aggregation.ray_shards import WINDOW, RayRoundStream, StoreChangedError

    d = tmp_path / "shared"
    d.mkdir()
    url = f"file://{d}?threshold=0"
    assemble = RayRoundStream.assemble
    changed = []

    def kill_then_assemble(self, plan, total):
        if not changed:
            _first, jobs = self._final
            a, p, remote = jobs[-1]
            body = bytearray(open(remote["path"], "rb").read())  # noqa: SIM115
            _t0, t1 = windows_of(p, self.shards, 0)
            body[min(t1 * WINDOW, len(body)) - 100] ^= 0xFF
            tmp = remote["path"] + ".new"
            with open(tmp, "wb") as f:
                f.write(body)
            os.chmod(tmp, 0o600)
            os.rename(tmp, remote["path"])
            changed.append(a.index)
        ray.kill(self.cluster.actors[0], no_restart=True)
        return assemble(self, plan, total)

    monkeypatch.setattr(RayRoundStream, "assemble", kill_then_assemble)
    with pytest.raises(StoreChangedError, match=r"changed in the store after it was verified"):
        _ray_run(FedAvg(), f"{url}&aggregation=ray&ray_shards=2", _grid(3, faulty=False),
                 rounds=1)
    assert len(changed) == 1
    assert _ftx_files(d) == []


def test_file_ray_owner_that_does_not_see_the_file_fails_clearly(cluster, tmp_path,
                                                                   monkeypatch):
    """An owner whose node does not share the filesystem (here: it is told another,
    missing path) fails the run with NotSharedError naming the cause; no hang, nothing
    left behind."""
    from flwr_transports.aggregation import ray_shards

    d = tmp_path / "shared"
    d.mkdir()
    real = ray_shards.ShardOwner.fold

    def elsewhere(self, remote, *a, **k):  # runs in the actor: a node without the mount
        if remote.get("kind") == "file":
            remote = {**remote, "path": "/nonexistent-ftx-mount/" + remote["label"]}
        return real(self, remote, *a, **k)

    monkeypatch.setattr(ray_shards, "_ACTOR", None)
    monkeypatch.setattr(ray_shards.ShardOwner, "fold", elsewhere)
    real_ns = ray_shards._not_shared

    def seen_here(cause, remote, j, rnd):  # the ServerApp still sees the real file
        return real_ns(cause, {**remote, "path": str(d)}, j, rnd)

    monkeypatch.setattr(ray_shards, "_not_shared", seen_here)
    s = offload(FedAvg(), transport=f"file://{d}?threshold=0&aggregation=ray&ray_shards=2")
    with pytest.raises(ray_shards.NotSharedError, match="same path") as got:
        s.start(_grid(faulty=False), _big(), num_rounds=1)
    assert "/nonexistent-ftx-mount/" in str(got.value)  # the owner's own view
    assert _ftx_files(d) == []
    assert s._ray.history and _gone(s._ray.history)


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
