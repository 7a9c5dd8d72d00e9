"""Issue 15: no reply may crash, stall or starve the ServerApp (regression tests).

A hostile ClientApp (tests/apps/hostile_app/hostile_app/attacks.py, partition 0 =
node 101) attacks the offload wrapper over real links through the in-process grid;
node 102 is honest. Every attack must end in a rejected reply (code 0x4654, the
reason naming what was wrong), and the round's aggregate must be exactly the honest
node's update. The same attacks run in a real deployment in
tests/integration/test_hostile_deployment.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from apps_inproc import _train, initial_arrays
from flwr.app import ArrayRecord
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from inproc import InProcessGrid

from flwr_transports import offload
from flwr_transports.codec import encode
from flwr_transports.flower.wrapper import REJECTED_REPLY_CODE

sys.path.insert(0, str(Path(__file__).parent / "apps" / "hostile_app"))
from hostile_app import attacks


def _ftx(root: str) -> list[str]:
    return [e for e in os.listdir(root) if e.lstrip(".").startswith("ftx-")]


def _ours_in_shm() -> list[str]:
    """ftx- names in /dev/shm created by THIS process (others run tests too)."""
    return [e for e in os.listdir("/dev/shm") if e.lstrip(".").startswith(f"ftx-{os.getpid()}-")]


@pytest.fixture
def filedir(tmp_path):
    d = tmp_path / "payloads"
    d.mkdir()
    return str(d)


def _hostile_app() -> ClientApp:
    app = ClientApp(mods=[attacks.hostile_mod])
    app.train()(_train)
    return app


def _honest_only(rounds: int) -> list[np.ndarray]:
    """FedAvg, computed here, when only node 102 (partition 1) contributes each round."""
    from flwr.app import MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    arrs = initial_arrays()
    for _ in range(rounds):
        upd = [(a + 0.5).astype(a.dtype) for a in arrs.to_numpy_ndarrays()]
        arrs = aggregate_arrayrecords(
            [RecordDict({"arrays": ArrayRecord(upd),
                         "metrics": MetricRecord({"num-examples": 20})})], "num-examples")
    return arrs.to_numpy_ndarrays()


def hostile_run(monkeypatch, transport: str, names: list[str], rounds: int = 1, **opts):
    monkeypatch.setenv("HOSTILE_ATTACKS", ",".join(names))
    s = offload(FedAvg(fraction_evaluate=0.0), transport=transport, **opts)
    errors: list = []
    orig = s.inner.aggregate_train

    def spy(rnd, reps):
        reps = list(reps)
        errors.append([r for r in reps if r.has_error()])
        return orig(rnd, reps)

    s.inner.aggregate_train = spy
    t0 = time.monotonic()
    res = s.start(InProcessGrid(_hostile_app()), initial_arrays(), num_rounds=rounds)
    return s, res, errors, time.monotonic() - t0


def _check(s, res, errors, names, rounds=1):
    assert len(errors) == rounds
    for k, errs in enumerate(errors):
        name = names[k % len(names)]
        assert len(errs) == 1, (name, [e.error.reason for e in errs])
        err = errs[0].error
        assert err.code == REJECTED_REPLY_CODE
        assert "node 101" in err.reason
        want = attacks.EXPECT[name]
        assert want is None or want in err.reason, (name, err.reason)
    assert s.stats["replies_rejected"] == rounds
    assert not s._tickets  # spent tickets are always forgotten
    for got, want in zip(res.arrays.to_numpy_ndarrays(), _honest_only(rounds)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)  # streaming rounding


# --------------------------------------------------------- every attack, every link
LINK_ATTACKS = [(link, a) for link in ("shm", "file", "tcp") for a in attacks.attacks_for(link)
                if a != "flood"]


@pytest.mark.parametrize("link, name", LINK_ATTACKS)
def test_attack_is_a_rejected_reply_and_the_round_goes_on(monkeypatch, filedir, link, name):
    url = {"shm": "shm://", "file": f"file://{filedir}", "tcp": "tcp://127.0.0.1:0"}[link]
    s, res, errors, dt = hostile_run(monkeypatch, url, [name])
    _check(s, res, errors, [name])
    assert dt < 20, f"{name} on {link} took {dt:.1f}s"
    assert _ftx(filedir) == [] and _ours_in_shm() == []


@pytest.fixture(scope="module")
def moto_bucket():
    import boto3
    from moto import server as moto_server

    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
             "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in creds}
    os.environ.update(creds)
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="harden")
    yield s3, f"s3://harden/runs?endpoint_url={endpoint}"
    srv.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.mark.parametrize("name", attacks.attacks_for("s3"))
def test_attack_on_s3_is_a_rejected_reply(monkeypatch, moto_bucket, name):
    s3, url = moto_bucket
    s, res, errors, dt = hostile_run(monkeypatch, url, [name])
    _check(s, res, errors, [name])
    assert dt < 30
    assert s3.list_objects_v2(Bucket="harden").get("KeyCount", 0) == 0
    assert not s3.list_multipart_uploads(Bucket="harden").get("Uploads")


# ----------------------------------------------------- finding 1: deep nesting
def test_deep_json_is_a_clean_rejection_on_both_sides():
    from flwr.app import ConfigRecord

    from flwr_transports.codec import PayloadError, decode_bytes
    from flwr_transports.errors import RejectedInput
    from flwr_transports.refs import Reference, RefError, Ticket

    deep = "[" * 20_000 + "]" * 20_000
    with pytest.raises(RefError, match="nested 20000 levels"):
        Reference.from_json(deep.encode())
    with pytest.raises(RefError, match="nested"):  # the client parses tickets
        Ticket.from_record(ConfigRecord({"ticket": deep}))
    h = ('{"__metadata__":{"format":"flwr-transports/1","flwr_transports":"' + deep
         + '"}}').encode()
    import struct

    with pytest.raises(PayloadError, match="nested") as exc:
        decode_bytes(struct.pack("<Q", len(h)) + h, None)
    assert isinstance(exc.value, RejectedInput) and isinstance(exc.value, ValueError)


def test_unexpected_exception_is_a_rejection_in_production_and_raises_in_tests(
        monkeypatch, filedir):
    """The one rule: in production ANY exception from one reply rejects that reply
    (here a bug injected into the decoder); under FLWR_TRANSPORTS_STRICT (tests) it
    surfaces."""
    from flwr_transports.flower import wrapper

    def buggy(*a, **k):
        raise KeyError("injected bug")

    monkeypatch.setattr(wrapper, "decode", buggy)
    monkeypatch.setenv("FLWR_TRANSPORTS_STRICT", "1")
    with pytest.raises(KeyError, match="injected bug"):
        hostile_run(monkeypatch, f"file://{filedir}?eager=false", [], aggregation="inner")
    monkeypatch.setenv("FLWR_TRANSPORTS_STRICT", "0")
    _s, res, errors, _ = hostile_run(monkeypatch, f"file://{filedir}?eager=false", [],
                                     aggregation="inner")  # the decoder path
    assert len(errors[0]) == 2 and all("injected bug" in e.error.reason for e in errors[0])
    assert res.arrays is not None and _ftx(filedir) == []


# --------------------------------- finding 2: a file that shrinks under the reader
@pytest.mark.parametrize("big_read", [False, True])
def test_file_truncated_while_read_is_a_rejection(tmp_path, monkeypatch, big_read):
    from flwr_transports.codec import decode
    from flwr_transports.links import fs
    from flwr_transports.refs import RefError

    if big_read:  # the > 2 GiB-per-read path (preadv loop), scaled down
        monkeypatch.setattr(fs, "_MAX_PREAD", 4096)
    payload = encode(ArrayRecord([np.arange(100_000, dtype=np.float32)]))
    path = tmp_path / "ftx-1-x"
    path.write_bytes(payload.to_bytes())
    with fs.open_payload(str(path), payload.size) as src:
        os.truncate(path, 1000)  # after the checks, before the reads
        with pytest.raises(RefError, match="shrank while it was read"):
            decode(src.read, payload.size, payload.digest)


def test_truncated_after_eager_decode_is_rejected(monkeypatch, filedir):
    s, res, errors, _ = hostile_run(monkeypatch, f"file://{filedir}", ["truncate"], rounds=2)
    _check(s, res, errors, ["truncate"], rounds=2)


# ------------------------ finding 3: a directory at the slot path, every round
@pytest.mark.parametrize("link", ["shm", "file"])
def test_directory_at_slot_every_round_then_nothing_left(monkeypatch, filedir, link):
    url = "shm://" if link == "shm" else f"file://{filedir}"
    s, res, errors, _ = hostile_run(monkeypatch, url, ["dir-at-slot"], rounds=3)
    _check(s, res, errors, ["dir-at-slot"], rounds=3)
    assert _ftx(filedir) == [] and _ours_in_shm() == []


# ------------------------------ finding 4: a FIFO at the slot path must not block
@pytest.mark.parametrize("link", ["shm", "file"])
@pytest.mark.parametrize("eager", ["true", "false"])
def test_fifo_at_slot_does_not_block(monkeypatch, filedir, link, eager):
    url = ("shm://" if link == "shm" else f"file://{filedir}") + f"?eager={eager}"
    s, res, errors, dt = hostile_run(monkeypatch, url, ["fifo-at-slot"], rounds=2)
    _check(s, res, errors, ["fifo-at-slot"], rounds=2)
    assert dt < 15


def test_cleanup_of_a_slot_never_stops_the_others(tmp_path, caplog):
    from flwr_transports.links import fs

    d = tmp_path / "root"
    d.mkdir()
    (d / "ftx-a").mkdir()
    (d / "ftx-a" / "sub").mkdir()
    (d / "ftx-a" / "sub" / "f").write_text("x")
    (d / "ftx-a" / "sub" / "link").symlink_to(tmp_path / "keep")
    (tmp_path / "keep").write_text("must survive")
    os.mkfifo(d / "ftx-b")
    (d / "ftx-c").write_text("c")
    for name in ("ftx-a", "ftx-b", "ftx-c", "ftx-missing"):
        fs.remove_path(str(d / name))  # never raises
    assert list(d.iterdir()) == []
    assert (tmp_path / "keep").read_text() == "must survive"


# ----------------------------- finding 6: a zombie owner is a dead owner
def test_zombie_owner_counts_as_dead_and_cleanup_removes_its_leftovers(tmp_path):
    from flwr_transports.cleanup import cleanup
    from flwr_transports.links.base import pid_alive, pid_zombie

    child = subprocess.Popen([sys.executable, "-c", "pass"])  # never waited on: a zombie
    deadline = time.monotonic() + 10
    while not pid_zombie(child.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        assert pid_zombie(child.pid) and not pid_alive(child.pid)
        assert pid_alive(os.getpid()) and not pid_zombie(os.getpid())
        d = tmp_path / "shared"
        d.mkdir()
        names = [f"ftx-{child.pid}-3-abcd1234-r1-train-0", f".ftx-{child.pid}-3-abcd1234-x.tmp",
                 f"ftx-{child.pid}-3-abcd1234-slotdir", f"ftx-{os.getpid()}-3-live-r1"]
        for n in names[:2]:
            (d / n).write_bytes(b"x")
        (d / names[2]).mkdir()  # what a hostile client could leave at its slot path
        (d / names[3]).write_bytes(b"live")
        removed = cleanup(f"file://{d}")
        assert sorted(Path(p).name for p in removed) == sorted(names[:3])
        assert [p.name for p in d.iterdir()] == [names[3]]
    finally:
        child.wait()


def test_s3_sweep_warning_separates_endpoint_and_prefix(caplog):
    from flwr_transports.links import s3

    class Cfg:
        bucket, endpoint_url = "b", "http://127.0.0.1:42193"

    class Link:
        cfg, key_prefix = Cfg(), "runs/ftx-16779-1-abcd"
        _published, _slots, _uploading, _owned_ups = {}, {}, {}, {}
        _stop, _hooked, _watcher, _discarder = threading.Event(), threading.Event(), None, None
        s3 = None

        class _read_ahead:
            @staticmethod
            def close():
                pass

        def wait_discarded(self):
            pass

        class http:
            @staticmethod
            def close():
                pass

    def boom(*a, **k):
        raise RuntimeError("store down")

    orig = s3._sweep
    s3._sweep = boom
    try:
        with caplog.at_level("WARNING"):
            s3.S3ServerLink.close(Link())
    finally:
        s3._sweep = orig
    msg = caplog.records[-1].getMessage()
    assert "s3://b/runs/ftx-16779-1-abcd* at http://127.0.0.1:42193" in msg, msg
    assert "42193ftx" not in msg


# ------------------------------------- finding 5: tcp:// connection floods
def _idle_socks(port: int, n: int, payload: bytes = b"") -> list:
    import socket

    out = []
    for _ in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=2)
            if payload:
                s.sendall(payload)
            out.append(s)
        except OSError:
            break
    return out


def _closed_by_server(s, wait: float) -> bool:
    s.settimeout(wait)
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return True
    except TimeoutError:
        return False
    except OSError:
        return True


def _tcp_roundtrip(link, client, name: str, rec: ArrayRecord) -> None:
    from flwr_transports.codec import decode

    p = encode(rec)
    loc = link.publish(name, p)
    with client.open(loc, p.size) as src:
        decode(src.read, p.size, p.digest)
    slot = link.issue_slot(name + "-up", 2 * p.size)
    up = client.upload(slot, p)
    with link.open_upload(slot, up, p.size) as src:
        decode(src.read, p.size, p.digest)
    link.discard_slot(slot)
    link.release(name)


def test_tcp_preauth_deadline_closes_idle_and_trickling_connections():
    from flwr_transports.links import server_link

    link = server_link("tcp://127.0.0.1:0", 1, {})
    try:
        link.server.preauth_timeout = 0.6
        idle = _idle_socks(link.port, 2)
        trickle = _idle_socks(link.port, 1, b"FTXQ")  # a header that never completes
        t0 = time.monotonic()
        for _ in range(3):
            trickle[0].sendall(b"\x01")
            time.sleep(0.3)
        assert all(_closed_by_server(s, 3.0) for s in idle + trickle)
        assert time.monotonic() - t0 < 3.0
        assert link.server.stats["preauth_timeouts"] >= 3
        deadline = time.monotonic() + 5
        while link.server.active and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not link.server.active and not link.server.adm
        for s in idle + trickle:
            s.close()
    finally:
        link.close()


@pytest.mark.parametrize("mode", ["idle", "auth"])
def test_tcp_flood_does_not_starve_an_honest_node(mode):
    """One node holds every connection the server allows (unauthenticated, or with
    its own valid download token); an honest node still downloads and uploads."""

    from flwr_transports.links import client_link, server_link
    from flwr_transports.links.chunks import EVICT_IDLE, OP_INFO, REQ

    link = server_link("tcp://127.0.0.1:0?max_conns=16", 1, {})
    rec = ArrayRecord([np.arange(400_000, dtype=np.float32)])
    try:
        hostile = link.publish("hostile-view", encode(rec))
        req = b""
        if mode == "auth":
            oid = hostile["id"].encode()
            req = REQ.pack(b"FTXQ", OP_INFO, 0, len(oid), bytes.fromhex(hostile["token"]),
                           0, 0, 0) + oid
        flood = _idle_socks(link.port, 40, req)
        want = 16 if mode == "idle" else 4
        deadline = time.monotonic() + 10  # until the server has admitted the flood
        while len(link.server.active) < want and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(link.server.active) >= want
        # time must pass here (not synchronisation): an admitted connection becomes
        # evictable only after EVICT_IDLE s without a request
        time.sleep(EVICT_IDLE + 0.1)
        t0 = time.monotonic()
        _tcp_roundtrip(link, client_link("tcp"), "honest", rec)
        assert time.monotonic() - t0 < 15
        assert link.server.stats["evicted"] + link.server.stats["busy_group"] > 0
        if mode == "auth":  # one node's download group is capped
            assert max(link.server.groups.values(), default=0) <= link.server.max_per_group
        for s in flood:
            s.close()
    finally:
        link.close()


def test_tcp_client_retries_busy_beyond_its_retry_count(monkeypatch):
    from flwr_transports.links import chunks
    from flwr_transports.links.chunks import Busy, first_request

    monkeypatch.setattr(chunks.client, "busy_pause", lambda n: 0.01)

    calls = []

    class Conn:
        def close(self):
            pass

    def fn(c):
        calls.append(1)
        if len(calls) < 12:  # more BUSY answers than retries=2 would allow
            raise Busy("payload server busy")
        return "ok"

    _conn, got = first_request(lambda: Conn(), fn, retries=2, busy_for=30)
    assert got == "ok" and len(calls) == 12
    with pytest.raises(Exception, match="stayed busy"):
        first_request(lambda: Conn(), lambda c: (_ for _ in ()).throw(Busy("x")), retries=2,
                       busy_for=0.3)
