"""The foundation, proven on a REAL local Flower deployment.

One deployment for the whole module: ``flower-superlink`` + 2 ``flower-supernode``
processes on 127.0.0.1 (free ports), and one ``flwr run`` per transport of
examples/quickstart-offload (2 rounds, ~8 MiB model): ``shm://``, ``file://<tmp>``,
``tcp://127.0.0.1:0``, ``s3://`` against an embedded S3 server (moto), ``shm://`` with
every wrapper and link option in its URL, ``rdma://`` over UCX cma and over UCX tcp
(where NVIDIA NIXL is installed), then ``inband`` (the in-band run goes last so that its
memory high-water mark cannot inflate the offloaded runs' SuperLink RSS figures).

Checked: the final models are bit-identical and equal FedAvg computed
in-process; every round got every reply; the payload bytes went over the link, not
through Flower (wrapper stats) and the SuperLink's memory did not grow with them;
payloads really appeared on the link during the run and nothing is left there
afterwards; no process of the deployment survives it.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

MODEL_MIB = 8.0
ROUNDS = 2
MIB = 1 << 20


@dataclass
class Outcome:
    result: Any  # flwr_transports.testing.deploy.RunResult
    arrays: dict[str, np.ndarray]
    names: list[str]
    summary: dict[str, Any]
    link_names_seen: set[str] = field(default_factory=set)
    events: list[dict[str, Any]] = field(default_factory=list)  # the run's trace


@dataclass
class Federation:
    runs: dict[str, Outcome]
    file_dir: Path
    shm_before: set[str]
    shm_after: set[str]
    alive_after: list[str]
    stray_after: list[str]
    s3_left: list[str] = field(default_factory=list)


def _have_nixl() -> bool:
    return any(importlib.util.find_spec(m) for m in ("nixl_cu12", "nixl_cu13", "nixl"))


# rdma:// runs where NVIDIA NIXL is installed (scripts/test.sh installs it): once with
# UCX's default choice (cma between the ServerApp and ClientApp processes), once over
# UCX's tcp transport
RDMA = ("rdma", "rdma-tcp") if _have_nixl() else ()
OFFLOADED = ("shm", "file", "tcp", "s3", "shm-opts", *RDMA)
#: every wrapper option and every shm:// option in the URL: parsed once at offload(),
#: the wrapper's keys kept, the link built with the rest
SHM_ALL_OPTIONS = ("shm://?threshold=4MiB&max_reply_size=64MiB&reply_slots=1&fetch_workers=2"
                   "&aggregation=inner&mode=640&fsync=false&eager=true")


class _LinkWatcher(threading.Thread):
    """Polls a directory during a run and records the ftx-* names that appear."""

    def __init__(self, root: Path, ftx_names) -> None:
        super().__init__(daemon=True)
        self.root, self._names, self.seen = root, ftx_names, set()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.seen |= self._names(self.root)
            self._halt.wait(0.02)

    def stop(self) -> set[str]:
        self._halt.set()
        self.join(timeout=5)
        return self.seen


def _load_task(app: Path):
    spec = importlib.util.spec_from_file_location(
        "quickstart_offload_task_for_tests", app / "quickstart_offload" / "task.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def federation(tmp_path_factory, quickstart_app, ftx_names) -> Federation:
    import psutil

    from flwr_transports import trace
    from flwr_transports.testing import LocalDeployment

    base = tmp_path_factory.mktemp("deployment")
    tdir = base / "trace"
    file_dir = base / "file-link"
    file_dir.mkdir()
    import boto3
    from moto import server as moto_server

    s3srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3srv.start()
    host, port = s3srv.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    creds = {"AWS_ACCESS_KEY_ID": "itest", "AWS_SECRET_ACCESS_KEY": "itest",
             "AWS_DEFAULT_REGION": "us-east-1"}
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id="itest", aws_secret_access_key="itest")
    s3.create_bucket(Bucket="itest")
    # the transports must change no bit: their runs aggregate with the inner FedAvg
    # (aggregation=inner); "shm-streaming" is the streaming aggregation of the same run
    transports = {"shm": "shm://?aggregation=inner",
                  "file": f"file://{file_dir}?aggregation=inner",
                  "tcp": "tcp://127.0.0.1:0?aggregation=inner",
                  "s3": f"s3://itest/runs?endpoint_url={endpoint}&aggregation=inner",
                  "shm-opts": SHM_ALL_OPTIONS,
                  **({"rdma": "rdma://127.0.0.1:0?aggregation=inner",
                      "rdma-tcp": "rdma://127.0.0.1:0?ucx_tls=tcp&aggregation=inner"}
                     if RDMA else {}),
                  "shm-streaming": "shm://?aggregation=streaming", "inband": "inband"}
    watch_dirs = {"shm": Path("/dev/shm"), "file": file_dir, "shm-opts": Path("/dev/shm"),
                  "shm-streaming": Path("/dev/shm")}

    shm_before = ftx_names()
    runs: dict[str, Outcome] = {}
    dep = LocalDeployment(n_supernodes=2, workdir=base / "deploy",
                          env={**creds, trace.ENV: str(tdir)})
    try:
        with dep:
            ports = [dep.superlink_port, *dep.supernode_ports]
            procs = {p.pid: p.create_time() for p in map(psutil.Process, dep.pids())}
            for name, url in transports.items():
                out = base / f"final-{name}.npz"
                watcher = None
                if name in watch_dirs:
                    watcher = _LinkWatcher(watch_dirs[name], ftx_names)
                    watcher.start()
                res = dep.run(
                    quickstart_app,
                    {
                        "transport": url,
                        "model-mib": MODEL_MIB,
                        "num-server-rounds": ROUNDS,
                        "result-path": str(out),
                    },
                    timeout=480,
                )
                seen = watcher.stop() if watcher else set()
                assert res.ok, f"{name} run failed ({res.status}):\n{res.output[-4000:]}"
                assert out.is_file(), f"{name}: no result file\n{res.output[-4000:]}"
                with np.load(out) as z:
                    names = list(z.keys())
                    arrays = {k: z[k] for k in names}
                summary = json.loads(out.with_suffix(".json").read_text())
                runs[name] = Outcome(res, arrays, names, summary, seen,
                                     trace.read_events(tdir) if tdir.is_dir() else [])
                for p in tdir.glob("*"):
                    p.unlink()
                procs.update({pid: ctime for pid, (_, ctime) in res.processes.items()})

        s3_left = [o["Key"] for o in s3.list_objects_v2(Bucket="itest").get("Contents", [])]
        s3_left += [u["Key"] for u in s3.list_multipart_uploads(Bucket="itest").get("Uploads", [])]
    finally:
        s3srv.stop()

    # --- after the deployment stopped: what is still there?
    alive = []
    for pid, ctime in procs.items():
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - ctime) < 0.01 and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{pid} {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            pass
    stray = []
    needles = [f"127.0.0.1:{port}" for port in ports]
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if any(n in cmd for n in needles) and "pytest" not in cmd:
            stray.append(f"{p.info['pid']} {cmd[:120]}")
    return Federation(runs, file_dir, shm_before, ftx_names(), alive, stray, s3_left)


@pytest.mark.integration
def test_final_model_identical_across_transports(federation):
    ref = federation.runs["inband"]
    assert len(ref.names) == 6
    for name in OFFLOADED:
        run = federation.runs[name]
        assert run.names == ref.names, name
        for key in ref.names:
            a, b = run.arrays[key], ref.arrays[key]
            assert a.dtype == b.dtype and a.shape == b.shape, (name, key)
            assert np.array_equal(a, b), f"{name}: array {key!r} differs from in-band"


@pytest.mark.integration
def test_final_model_equals_fedavg_computed_in_process(federation, quickstart_app):
    """The deployment result is exactly FedAvg of the deterministic client updates."""
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    task = _load_task(quickstart_app)
    model = task.build_model(MODEL_MIB)
    initial = {k: v.copy() for k, v in model.items()}
    for _ in range(ROUNDS):
        replies = [
            RecordDict(
                {
                    "arrays": ArrayRecord(
                        {k: Array(v) for k, v in task.local_update(model, pid).items()}
                    ),
                    "metrics": MetricRecord({"num-examples": 10 * (pid + 1)}),
                }
            )
            for pid in (0, 1)
        ]
        agg = aggregate_arrayrecords(replies, "num-examples")
        model = {k: a.numpy() for k, a in agg.items()}

    got = federation.runs["inband"]
    assert got.names == list(model)
    for key, expected in model.items():
        assert got.arrays[key].dtype == expected.dtype, key
        assert np.array_equal(got.arrays[key], expected), key
    # and the rounds did change the model (+0.005 per round in expectation)
    assert not np.array_equal(got.arrays["layer0.weight"], initial["layer0.weight"])
    assert got.arrays["output.scale"].shape == ()


@pytest.mark.integration
def test_streaming_aggregation_matches_inner(federation):
    """The same deployment and run, aggregated while uploads land (the ServerApp folds
    each reply from /dev/shm into one running sum) vs by Flower's FedAvg on decoded
    replies: same arrays within float32 rounding, same metrics."""
    inner, stream = federation.runs["shm"], federation.runs["shm-streaming"]
    assert stream.names == inner.names
    for key in inner.names:
        a, b = inner.arrays[key], stream.arrays[key]
        assert a.dtype == b.dtype and a.shape == b.shape, key
        scale = max(float(np.max(np.abs(a))) if a.size else 0.0, 1e-30)
        assert float(np.max(np.abs(a - b))) / scale <= 1e-6 if a.size else True, key
    # round 1's training starts from the same model: the same metrics; later, clients
    # work on global models one float32 rounding apart, so their losses may differ there
    assert stream.summary["train_metrics"]["1"] == inner.summary["train_metrics"]["1"]
    for kind in ("train_metrics", "evaluate_metrics"):
        m_in, m_st = inner.summary[kind], stream.summary[kind]
        assert m_st.keys() == m_in.keys(), kind
        for r in m_in:
            assert m_st[r] == pytest.approx(m_in[r], rel=1e-5), (kind, r)
    st = stream.summary["stats"]
    assert st["agg_streamed_rounds"] == ROUNDS
    assert st["agg_eager_folds"] >= 1  # folded on landing, not when the replies came
    assert st["agg_rebuilds"] == 0 and st["replies_rejected"] == 0
    assert inner.summary["stats"]["agg_streamed_rounds"] == 0
    assert len(st["agg_tail_s"]) == ROUNDS


@pytest.mark.integration
@pytest.mark.parametrize("name", [*OFFLOADED, "shm-streaming", "inband"])
def test_every_round_got_every_reply(federation, name):
    summary = federation.runs[name].summary
    calls = summary["calls"]
    assert [c["type"] for c in calls] == ["train", "evaluate"] * ROUNDS
    for c in calls:
        assert (c["sent"], c["replies"], c["errors"]) == (2, 2, 0), c
    assert sorted(summary["train_metrics"]) == [str(r) for r in range(1, ROUNDS + 1)]
    assert summary["stats"].get("replies_rejected", 0) == 0
    assert len(summary["per_round_s"]) == ROUNDS


@pytest.mark.integration
def test_payload_went_over_the_link_not_through_flower(federation):
    model_bytes = federation.runs["inband"].summary["model_bytes"]
    assert model_bytes >= MODEL_MIB * MIB * 0.99
    # per round: the model to 2 nodes for train and for evaluate, 2 updates back
    inband = federation.runs["inband"].summary["stats"]
    assert inband["inband_bytes_sent"] >= ROUNDS * 2 * model_bytes
    assert inband["inband_bytes_received"] >= ROUNDS * 2 * model_bytes * 0.99
    assert inband["link_bytes_sent"] == inband["link_bytes_received"] == 0
    for name in OFFLOADED:
        stats = federation.runs[name].summary["stats"]
        assert stats["link_bytes_sent"] >= ROUNDS * model_bytes, (name, stats)
        assert stats["link_bytes_received"] >= ROUNDS * 2 * model_bytes * 0.99, (name, stats)
        # only references and tickets cross Flower
        assert stats["inband_bytes_sent"] < 64 * 1024, (name, stats)
        assert stats["inband_bytes_received"] < 64 * 1024, (name, stats)


@pytest.mark.integration
def test_superlink_memory_does_not_grow_with_offloaded_payloads(federation):
    """SuperLink RSS growth during a run: in-band grows by several model sizes."""
    model_bytes = federation.runs["inband"].summary["model_bytes"]

    def growth(name: str) -> int:
        r = federation.runs[name].result
        return r.superlink_peak_rss - r.superlink_rss_before

    inband = growth("inband")
    print(
        "SuperLink RSS growth during the run (MiB): "
        + ", ".join(f"{n}={growth(n) / MIB:.1f}" for n in (*OFFLOADED, "inband"))
        + f"; model {model_bytes / MIB:.1f} MiB"
    )
    # the meter sees the payload crossing the SuperLink in-band ...
    assert inband > 2 * model_bytes, f"in-band growth only {inband / MIB:.1f} MiB"
    for name in OFFLOADED:
        g = growth(name)
        peak = federation.runs[name].result.superlink_peak_rss
        # ... and it does not see it when the payload takes the link
        assert g < model_bytes, f"{name}: SuperLink grew {g / MIB:.1f} MiB"
        assert g < inband / 4, (name, g, inband)
        assert peak < federation.runs["inband"].result.superlink_peak_rss, name


@pytest.mark.integration
@pytest.mark.parametrize("name", ["shm", "file", "shm-opts"])
def test_payloads_used_the_link_and_nothing_is_left_there(federation, name):
    run = federation.runs[name]
    servers = run.result.pids_of("flwr-serverapp")
    assert servers, f"the run's flwr-serverapp was not seen: {run.result.processes}"
    prefixes = tuple(f"ftx-{pid}-" for pid in servers)
    ours = {n for n in run.link_names_seen if n.lstrip(".").startswith(prefixes)}
    assert ours, f"no ftx-<serverapp pid>-* object seen on the {name} link during the run"
    if name.startswith("shm"):
        left = {n for n in federation.shm_after if n.lstrip(".").startswith(prefixes)}
        assert not left, f"left in /dev/shm: {sorted(left)}"
        new = federation.shm_after - federation.shm_before
        assert not (new & run.link_names_seen), sorted(new & run.link_names_seen)
    else:
        assert sorted(p.name for p in federation.file_dir.iterdir()) == []


@pytest.mark.integration
def test_nothing_left_in_the_bucket(federation):
    assert federation.s3_left == []


@pytest.mark.integration
def test_no_process_left_behind(federation):
    assert federation.alive_after == []
    assert federation.stray_after == []


# --- the harness itself (fast, no deployment) -------------------------------------


def test_run_config_toml_quotes_and_validates():
    import tomllib

    from flwr_transports.testing.deploy import run_config_toml

    cfg = {
        "transport": "file:///tmp/a dir/with \"quotes\" and 'single'",
        "model-mib": 8.0,
        "num-server-rounds": 2,
        "flag": True,
        "path": "C:\\x\n",
    }
    assert tomllib.loads(run_config_toml(cfg)) == cfg
    for bad in ({"a b": 1}, {"x=1 y": 1}, {"": 1}, {"k": [1]}, {"k": float("nan")}):
        with pytest.raises((ValueError, TypeError)):
            run_config_toml(bad)


def test_startup_failure_raises_with_log_tail(tmp_path, monkeypatch):
    import psutil  # noqa: F401 - a dev dependency: missing is a failure

    from flwr_transports.testing import deploy

    fake = tmp_path / "fake-superlink"
    fake.write_text("#!/bin/sh\necho 'boom: cannot bind' >&2\nexit 3\n")
    fake.chmod(0o755)
    real_exe = deploy.LocalDeployment._exe
    monkeypatch.setattr(
        deploy.LocalDeployment,
        "_exe",
        lambda self, name: str(fake) if name == "flower-superlink" else real_exe(self, name),
    )
    dep = deploy.LocalDeployment(n_supernodes=1, workdir=tmp_path / "w", startup_timeout=20)
    with pytest.raises(deploy.DeploymentError) as err:
        dep.start()
    msg = str(err.value)
    assert "exited with code 3" in msg and "boom: cannot bind" in msg
    assert dep.pids() == []


FLOWER_PULL_S = 3.0  # HttpGrid.send_and_receive: time.sleep(3) between pulls


@pytest.mark.integration
@pytest.mark.parametrize("name", ("shm", "file", "tcp", "s3", *RDMA))
def test_the_receive_loop_returns_before_flowers_pull_on_every_link(federation, name):
    """Issue 24, on every link (this module's runs are traced): a phase's replies cannot
    be on the SuperLink before the clients' last traced event of that phase ended, and
    Flower's ``send_and_receive`` pulls only at push + 0, 3, 6, ... s, so it could not
    have returned before the first of those after that moment; offload's receive loop
    did, in at least one phase, and every phase got every reply. Asserted from the
    trace's timestamps, not from wall time (tests/integration/test_receive_deployment.py
    checks the pulls themselves over tcp:// and shm://)."""
    import math

    events = federation.runs[name].events
    recv = [e for e in events if e["ev"] == "receive"]
    assert len(recv) == 2 * ROUNDS, f"{name}: {len(recv)} receive events"
    earlier = []
    for e in recv:
        ends = [x["t1"] for x in events if x.get("role") == "client"
                and x.get("round") == e.get("round") and x.get("phase") == e.get("phase")]
        assert ends and e["replies"] == 2 and e["missing"] == 0, (name, e)
        push = e["t0"]
        flower = push + FLOWER_PULL_S * math.ceil(max(max(ends) - push, 0.0) / FLOWER_PULL_S)
        earlier.append(e["t1"] < flower)
    assert any(earlier), (name, [(round(e["t1"] - e["t0"], 2)) for e in recv])
    assert not [e for e in federation.runs["inband"].events if e["ev"] == "receive"]
