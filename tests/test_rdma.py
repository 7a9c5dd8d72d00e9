"""rdma:// on NVIDIA NIXL (UCX underneath): the real engine, no mocks.

Here UCX runs over ``cma`` (same host, its default choice) and over ``tcp``
(``ucx_tls=tcp``: UCX emulates one-sided READ in software); both are exercised
across processes (tests/rdma_peer.py is the client process). The only thing that
cannot exist here is an RDMA NIC: the hardware test at the end is skipped with its
reason unless FLWR_TRANSPORTS_RDMA_HOST names an RDMA-capable address.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from test_tcp_helpers import make_payload

from flwr_transports import _membuf
from flwr_transports.codec import decode, encode
from flwr_transports.links import LinkError, client_link, server_link
from flwr_transports.links import chunks as ch
from flwr_transports.refs import RefError

nixl_missing = None
try:
    from flwr_transports.links import rdma

    rdma.load_nixl()
except LinkError as exc:
    nixl_missing = str(exc)

KiB, MiB = 1024, 1024 * 1024
PEER = Path(__file__).with_name("rdma_peer.py")
TLS = [pytest.param(None, id="cma"), pytest.param("tcp", id="ucx-tcp")]
needs_nixl = pytest.mark.skipif(nixl_missing is not None,
                                reason=f"NIXL is not installed: {nixl_missing}")


@pytest.fixture
def server():
    links = []

    def make(**opts):
        opts.setdefault("chunk_size", "64KiB")
        opts.setdefault("timeout", 10)
        link = rdma.RdmaServerLink("rdma://127.0.0.1:0", 7, opts)
        links.append(link)
        return link

    yield make
    for link in links:
        link.close()


def same(a: ArrayRecord, b: ArrayRecord) -> bool:
    return list(a) == list(b) and all(
        (a[k].dtype, list(a[k].shape), a[k].data) == (b[k].dtype, list(b[k].shape), b[k].data)
        for k in a)


def every_dtype() -> ArrayRecord:
    rng = np.random.default_rng(3)
    rec = ArrayRecord()
    for dt in (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
               np.uint8, np.uint16, np.uint32, np.uint64, np.bool_, np.complex64,
               np.complex128):
        rec[f"x_{np.dtype(dt).name}"] = Array((rng.random((37, 41)) * 100).astype(dt))
    rec["big"] = Array(rng.random(300 * KiB // 8 + 13))  # crosses chunk boundaries
    rec["big2"] = Array(rng.integers(0, 9, 100 * KiB, dtype=np.int16))
    rec["zero_d"] = Array(np.array(3.5, dtype=np.float32))
    rec["empty"] = Array(np.zeros((0, 7), dtype=np.float32))
    rec["empty1d"] = Array(np.zeros((0,), dtype=np.int64))
    rec["fortran"] = Array(np.asfortranarray(rng.random((4, 6))))
    rec["bigendian"] = Array(np.arange(5, dtype=">i4"))
    rec["custom"] = Array(dtype="bfloat16", shape=(2,), stype="custom.raw", data=b"\x01\x02\x03\x04")
    return rec


def run_peer(job: dict, env: dict | None = None, timeout: float = 60):
    penv = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]))
    penv.update(env or {})
    return subprocess.run([sys.executable, str(PEER), json.dumps(job)], env=penv,
                          capture_output=True, text=True, timeout=timeout, check=False)


def peer_result(p) -> dict:
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, f"peer failed ({p.returncode}):\n{p.stdout[-3000:]}\n" \
        f"{p.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def ucx_read_transports(out: str) -> set[str]:
    """Transports UCX_PROTO_INFO reports for one-sided reads (ucp_get)."""
    return set(rdma._read_tables(out).replace("/", " ").split()) & {
        "cma", "tcp", "self", "posix", "sysv", "knem", "xpmem"}


# -- without the engine ---------------------------------------------------------------
def test_missing_nixl_gives_the_install_line(monkeypatch):
    for name in ("nixl_cu12", "nixl_cu13", "nixl"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    with pytest.raises(LinkError, match=r"needs NVIDIA NIXL.*pip install --no-deps 'nixl-cu12"):
        server_link("rdma://127.0.0.1:0", 1)
    with pytest.raises(LinkError, match="--no-deps"):
        rdma.load_nixl()
    ok, why = rdma.rdma_status()
    assert not ok and "pip install --no-deps" in why


@needs_nixl
def test_doctor_reports_the_ucx_transports_usable_here():
    """A real one-sided READ per transport: cma and tcp work on any Linux test machine;
    without an RDMA device rc/ud/dc are reported as such, with what to install."""
    tr = rdma.ucx_transports()
    assert tr["cma"][0] and tr["tcp"][0], tr
    ok, why = rdma.rdma_status()
    assert ok and "usable: cma, tcp" in why
    if not rdma.ib_devices():
        assert all(tr[t] == (False, "no RDMA device") for t in ("rc", "ud", "dc"))
        assert "rdma-core" in why and "ibv_devices" in why


def test_ucx_tls_gets_cuda_copy_on_a_gpu_host(monkeypatch):
    """NIXL 1.5.1 refuses a UCX backend whose UCX_TLS names no CUDA transport when it
    sees an NVIDIA GPU (found on an H200 host: every probe and ``ucx_tls`` failed with
    NIXL_ERR_BACKEND). The link adds cuda_copy there, and only there."""
    monkeypatch.setattr(rdma, "_nvidia_gpu_present", lambda: True)
    assert rdma.with_gpu_tls("tcp") == "tcp,cuda_copy"
    assert rdma.with_gpu_tls("cma,tcp") == "cma,tcp,cuda_copy"
    for kept in ("rc,tcp,cuda_ipc", "tcp,cuda", "^tcp", None):
        assert rdma.with_gpu_tls(kept) == kept
    monkeypatch.setattr(rdma, "_nvidia_gpu_present", lambda: False)
    assert rdma.with_gpu_tls("tcp") == "tcp"


@needs_nixl
def test_agent_and_probe_start_with_the_gpu_transport_added(monkeypatch):
    """The added name reaches UCX and is harmless without a GPU: a real READ over tcp
    still works with it (probe in a child process, agent in this one)."""
    monkeypatch.setattr(rdma, "_nvidia_gpu_present", lambda: True)
    ok, why = rdma.probe_ucx("tcp")
    assert ok and "UCX used tcp" in why, why
    ag = rdma.Agent(f"ftx-gpu-tls-{os.getpid()}", "tcp")
    try:
        assert "UCX" in ag.a.backends
        assert "UCX_TLS" not in os.environ or os.environ["UCX_TLS"] != "tcp,cuda_copy"
    finally:
        ag.close()


# -- options --------------------------------------------------------------------------
@needs_nixl
def test_options_are_parsed_in_one_place():
    assert rdma.parse_rdma_options({}) == {"ucx_tls": None, "ucx_net_devices": None}
    assert rdma.parse_rdma_options({"ucx_tls": "rc,tcp", "ucx_net_devices": "mlx5_0:1"}) == {
        "ucx_tls": "rc,tcp", "ucx_net_devices": "mlx5_0:1"}
    assert rdma.parse_rdma_options({"ucx_tls": "^cma"})["ucx_tls"] == "^cma"
    for bad in ("tcp;rm -rf", "a b", "tcp,", ",tcp"):
        with pytest.raises(ValueError, match="ucx_tls"):
            rdma.parse_rdma_options({"ucx_tls": bad})
    with pytest.raises(ValueError, match="unknown option"):
        server_link("rdma://127.0.0.1:0", 1, {"streams": 4})
    with pytest.raises(ValueError, match="ucx_net_devices"):
        server_link("rdma://127.0.0.1:0", 1, {"ucx_net_devices": "mlx5 0"})


@needs_nixl
def test_a_transport_that_is_not_here_fails_at_offload_with_a_clear_error():
    with pytest.raises(LinkError, match=r"cannot start a NIXL/UCX agent with UCX_TLS=rc.*doctor"):
        server_link("rdma://127.0.0.1:0?ucx_tls=rc", 1)
    assert not [t for t in threading.enumerate() if t.name.startswith("ftx-rdma")]


@needs_nixl
def test_ucx_tls_travels_in_descriptors(server):
    link = server(ucx_tls="tcp")
    _, p = make_payload(100 * KiB)
    loc = link.publish("r1", p)
    slot = link.issue_slot("s", MiB)
    assert loc["ucx_tls"] == slot["ucx_tls"] == "tcp" and "streams" not in loc
    bad = {**loc, "ucx_tls": "tcp;x"}
    with pytest.raises(RefError, match="ucx_tls"):
        rdma.RdmaClientLink().open(bad, p.size)


# -- round trips across processes, over UCX cma and UCX tcp ----------------------------
@needs_nixl
@pytest.mark.parametrize("tls", TLS)
def test_every_dtype_round_trips_across_processes(server, tls):
    opts = {"chunk_size": "64KiB", "window": 3}
    if tls:
        opts["ucx_tls"] = tls
    link = server(**opts)
    rec = every_dtype()
    p = encode(rec)
    assert p.size > 6 * 64 * KiB  # many chunks
    loc = link.publish("r1-train", p)
    slot = link.issue_slot("r1-train-n1", 8 * MiB)
    proc = run_peer({"mode": "roundtrip", "loc": loc, "size": p.size, "digest": p.digest,
                     "slot": slot}, env={"UCX_PROTO_INFO": "y"})
    res = peer_result(proc)
    # the client READ over the transport asked for: cma by default, tcp when told
    used = ucx_read_transports(proc.stdout)
    assert used == ({"tcp"} if tls == "tcp" else {"cma"}), (used, proc.stdout[-2000:])
    # every array >= 64 KiB landed in its own bytes object (no copy after the READ;
    # smaller ones go through one small bytearray, as over tcp://)
    assert res["own_bytes"] == res["big"] >= 2
    assert res["download"]["chunks"] == -(-p.size // (64 * KiB))
    assert res["download"]["crc_errors"] == 0
    with link.open_upload(slot, res["back"], p.size) as src:
        back = decode(src.read, p.size, p.digest)
    assert same(back, rec)
    assert link.server.stats["chunks_received"] == -(-p.size // (64 * KiB))


@needs_nixl
def test_download_lands_in_the_arrays_own_bytes(server):
    link = server()
    rec = every_dtype()
    p = encode(rec)
    loc = link.publish("r1", p)
    c = rdma.RdmaClientLink()
    with c.open(loc, p.size) as src:
        out = decode(src.read, p.size, p.digest)
        own = {id(o) for o in src.placement().exact.values()}
    assert same(out, rec)
    big = [k for k in out if len(out[k].data) >= _membuf.ZC_MIN]
    assert len(big) >= 2 and all(id(out[k].data) in own for k in big)
    assert c.last_stats["zero_copy"] == 1


@needs_nixl
def test_small_payload_and_read_bounds(server):
    link = server()
    rec = ArrayRecord([np.array(1, dtype=np.int8)])
    p = encode(rec)
    loc = link.publish("r1", p)
    c = rdma.RdmaClientLink()
    with c.open(loc, p.size) as src:
        assert same(decode(src.read, p.size, p.digest), rec)
        with pytest.raises(ValueError, match="outside"):
            src.read(p.size - 1, 2)
    slot = link.issue_slot("s", MiB)
    back = c.upload(slot, p)
    with link.open_upload(slot, back, p.size) as src:
        assert same(decode(src.read, p.size, p.digest), rec)


# -- what the server accepts -------------------------------------------------------------
@needs_nixl
def test_claims_and_sizes_that_do_not_match_are_rejected(server):
    link = server()
    rec, p = make_payload(300 * KiB)
    loc = link.publish("r1", p)
    c = rdma.RdmaClientLink()
    with pytest.raises(RefError, match="reference says"):  # the table says another size
        c.open(loc, p.size + 1)
    slot = link.issue_slot("s", 200 * KiB)
    with pytest.raises(ch.Refused, match="exceeds the cap"):
        c.upload(slot, p)
    assert link.server.slots[slot["id"]].size is None  # nothing allocated
    slot = link.issue_slot("s2", MiB)
    back = c.upload(slot, p)
    with pytest.raises(RefError, match="not the upload slot"):
        link.open_upload(slot, {**back, "id": loc["id"]}, p.size)
    with pytest.raises(RefError, match="the reference says"):
        link.open_upload(slot, back, p.size - 8)
    with link.open_upload(slot, back, p.size) as src:
        assert same(decode(src.read, p.size, p.digest), rec)


@needs_nixl
def test_bad_token_and_foreign_ops_are_refused(server, caplog):
    link = server()
    _, p = make_payload(100 * KiB)
    loc = link.publish("r1", p)
    slot = link.issue_slot("s", MiB)
    c = rdma.RdmaClientLink()
    with pytest.raises(ch.Refused, match="DENIED"):
        c.open({**loc, "token": "0" * 64}, p.size)
    with pytest.raises(ch.Refused, match="DENIED"):  # a download token cannot upload
        c.upload({**slot, "token": loc["token"]}, p)
    assert link.server.stats["refused"] == 2
    # a tcp:// payload server refuses the RDMA ops
    tcp = server_link("tcp://127.0.0.1:0", 1)
    try:
        tloc = tcp.publish("r1", p)
        with pytest.raises(ch.Refused, match="no extensions"):
            c.open({**tloc}, p.size)
    finally:
        tcp.close()


@needs_nixl
def test_malformed_upload_request_is_refused(server):
    link = server()
    slot = link.issue_slot("s", MiB)
    tok = bytes.fromhex(slot["token"])
    oid = slot["id"].encode()
    for body in (b"\x00" * 3,  # too short
                 rdma.PUT_HEAD.pack(1000, 10, 1) + b"x" * 10,  # segments/table missing
                 rdma.PUT_HEAD.pack(1000, 0, 1) + rdma.SEG.pack(1, 999) + b"\0" * 4):  # 999!=1000
        with socket.create_connection(("127.0.0.1", slot["port"]), timeout=5) as s:
            s.sendall(ch.REQ.pack(ch.MAGIC_REQ, ch.OP_RDMA_PUT, 0, len(oid), tok, 64 * KiB,
                                  len(body), 0) + oid + body)
            st = ch.RSP.unpack(ch.recv_exact(s, ch.RSP.size))[1]
            assert st == ch.BAD_REQUEST
    assert link.server.slots[slot["id"]].size is None


@needs_nixl
def test_release_and_discard_are_idempotent(server):
    link = server()
    _, p = make_payload(100 * KiB)
    loc = link.publish("r1", p)
    link.release("r1")
    link.release("r1")
    link.release("never-published")
    with pytest.raises(ch.Refused, match="NOT_FOUND"):
        rdma.RdmaClientLink().open(loc, p.size)
    slot = link.issue_slot("s", MiB)
    back = rdma.RdmaClientLink().upload(slot, p)
    link.discard_slot(slot)
    link.discard_slot(slot)
    with pytest.raises(LinkError, match="discarded"):
        link.open_upload(slot, back, p.size)
    assert not link._regs


@needs_nixl
def test_upload_buffers_are_registered_once_and_reused(server):
    link = server()
    rec, p = make_payload(400 * KiB)
    c = rdma.RdmaClientLink()
    for r in range(3):
        slot = link.issue_slot(f"r{r}-s", MiB)
        back = c.upload(slot, p)
        with link.open_upload(slot, back, p.size) as src:
            assert same(decode(src.read, p.size, p.digest), rec)
            if getattr(src, "predecoded", None) is not None:
                # the eager decoder reads the buffer too: it returns to the pool only
                # when both readers are done, which the next round must not race
                assert same(src.predecoded(10)[0], rec)
        link.discard_slot(slot)
    assert link.server.rdma.pool.registrations == 1  # one registration, three rounds
    assert link.server.rdma.pool.hits == 2


@needs_nixl
def test_close_leaves_nothing(ftx_names):
    shm_before = set(os.listdir("/dev/shm"))
    link = rdma.RdmaServerLink("rdma://127.0.0.1:0", 1, {"chunk_size": "64KiB"})
    port = link.server.port
    rec, p = make_payload(300 * KiB)
    loc = link.publish("r1", p)
    c = rdma.RdmaClientLink()
    with c.open(loc, p.size) as src:
        assert same(decode(src.read, p.size, p.digest), rec)
    slot = link.issue_slot("s", MiB)
    c.upload(slot, p)
    link.close()
    link.close()  # idempotent
    for t in [t for t in threading.enumerate() if t.name.startswith("ftx-rdma")]:
        t.join(10)  # told to stop by close(): joined, not slept on
    assert not [t for t in threading.enumerate() if t.name.startswith("ftx-rdma")]
    assert link.server.rdma is None and not link._regs
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert set(os.listdir("/dev/shm")) - shm_before == set()


# -- faults ----------------------------------------------------------------------------------
@needs_nixl
def test_corrupted_and_dropped_chunks_are_read_again(server):
    """A chunk whose bytes were damaged on arrival, and one whose READ delivered nothing
    (its buffer zeroed), fail their CRC and are read again; only those two."""
    link = server()
    rec, p = make_payload(700 * KiB)
    loc = link.publish("r1", p)
    hits: list[int] = []

    def fault(i, views):
        if i in (2, 5) and i not in hits:
            hits.append(i)
            if i == 2:
                views[0][100:101] = bytes([views[0][100] ^ 0x55])  # corrupted
            else:
                for v in views:
                    v[:] = bytes(len(v))  # dropped: nothing landed
    c = rdma.RdmaClientLink()
    c.fault = fault
    with c.open(loc, p.size) as src:
        out = decode(src.read, p.size, p.digest)
    assert same(out, rec) and sorted(hits) == [2, 5]
    assert c.last_stats["crc_errors"] == 2
    assert c.last_stats["chunks"] == -(-p.size // (64 * KiB))


@needs_nixl
def test_corrupted_upload_chunk_is_read_again_by_the_server(server):
    link = server()
    rec, p = make_payload(500 * KiB)
    hits: list[int] = []

    def fault(op, oid, i, views):
        assert op == ch.OP_RDMA_PUT
        if i == 3 and not hits:
            hits.append(i)
            views[0][7:8] = bytes([views[0][7] ^ 0x01])
        return views
    link.server.fault = fault
    slot = link.issue_slot("s", MiB)
    back = rdma.RdmaClientLink().upload(slot, p)
    with link.open_upload(slot, back, p.size) as src:
        assert same(decode(src.read, p.size, p.digest), rec)
    assert hits == [3] and link.server.stats["crc_errors"] == 1


@needs_nixl
@pytest.mark.parametrize("tls", TLS)
def test_client_killed_mid_transfer_leaves_the_server_going(server, tls):
    opts = {"timeout": 5, "window": 1}
    if tls:
        opts["ucx_tls"] = tls
    link = server(**opts)
    rec, p = make_payload(600 * KiB)
    loc = link.publish("r1", p)
    # 1. a client dies while it downloads (the server only serves its memory)
    proc = run_peer({"mode": "die_in_download", "loc": loc, "size": p.size, "die_at": 2})
    assert proc.returncode == -signal.SIGKILL
    # 2. a client dies while the server reads its reply
    slot = link.issue_slot("dead", 8 * MiB)
    killed = []

    def kill_on_first_chunk(op, oid, i, views):
        if oid == slot["id"] and not killed:
            killed.append(i)
            child.send_signal(signal.SIGKILL)
            child.wait(10)
        return views
    link.server.fault = kill_on_first_chunk
    penv = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    child = subprocess.Popen([sys.executable, str(PEER), json.dumps(
        {"mode": "slow_upload", "slot": slot, "nbytes": 4 * MiB})], env=penv,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while link.server.slots[slot["id"]].claimed == set() and not killed:
        assert time.monotonic() < deadline, "the server never started reading the reply"
        time.sleep(0.01)
    while link.server.slots[slot["id"]].claimed:  # the server gives up on the dead client
        assert time.monotonic() < deadline, "the server is stuck on a dead client"
        time.sleep(0.05)
    assert killed and child.returncode == -signal.SIGKILL
    with pytest.raises(LinkError, match="did not finish"):
        link.open_upload(slot, {"host": slot["host"], "port": slot["port"], "id": slot["id"]},
                         4 * MiB)
    link.discard_slot(slot)
    link.server.fault = None
    # 3. the round goes on: an honest client downloads and uploads as before
    slot_ok = link.issue_slot("ok", MiB)
    res = peer_result(run_peer({"mode": "roundtrip", "loc": loc, "size": p.size,
                                "digest": p.digest, "slot": slot_ok}))
    with link.open_upload(slot_ok, res["back"], p.size) as src:
        assert same(decode(src.read, p.size, p.digest), rec)


# -- with Flower: the offload wrapper over rdma:// equals in-band --------------------------
@needs_nixl
@pytest.mark.parametrize("tls", TLS)
def test_offload_fedavg_rdma_equals_inband(tls):
    from flwr.serverapp.strategy import FedAvg
    from inproc import InProcessGrid
    from test_tcp import _app

    from flwr_transports import offload

    init = ArrayRecord([np.arange(300_000, dtype=np.float32).reshape(300, 1000), np.ones(3)])
    url = "rdma://127.0.0.1:0?chunk_size=256KiB" + (f"&ucx_tls={tls}" if tls else "")
    results = {}
    for t in ("inband", url):
        s = offload(FedAvg(), transport=t, aggregation="inner")  # bit identity
        r = s.start(InProcessGrid(_app(), n_nodes=2), init, num_rounds=2)
        results[t] = (r.arrays, s.stats)
    (a, _), (b, stats) = results.values()
    assert same(a, b)
    assert stats["link_bytes_sent"] > 0 and stats["link_bytes_received"] > 0
    assert stats["replies_rejected"] == 0
    assert not [t for t in threading.enumerate() if t.name.startswith("ftx-rdma")]


# -- real hardware only ------------------------------------------------------------------------
HW_HOST = os.environ.get("FLWR_TRANSPORTS_RDMA_HOST")


@pytest.mark.skipif(
    not HW_HOST or not rdma.ib_devices() if nixl_missing is None else True,
    reason="needs an RDMA NIC (none here: /sys/class/infiniband is empty; this kernel has "
           "no InfiniBand support) and FLWR_TRANSPORTS_RDMA_HOST set to its address")
def test_rdma_roundtrip_on_hardware():
    """On a fabric host: UCX over rc (InfiniBand/RoCE), 64 MiB both ways."""
    link = rdma.RdmaServerLink(f"rdma://{HW_HOST}:0", 1, {"chunk_size": "4MiB",
                                                          "ucx_tls": "rc,tcp"})
    try:
        rec, p = make_payload(64 << 20)
        loc = link.publish("r1", p)
        c = client_link("rdma")
        with c.open(loc, p.size) as src:
            assert same(decode(src.read, p.size, p.digest), rec)
        slot = link.issue_slot("s0", 128 << 20)
        back = c.upload(slot, p)
        with link.open_upload(slot, back, p.size) as src:
            assert same(decode(src.read, p.size, p.digest), rec)
    finally:
        link.close()


# -- the benchmark rows ------------------------------------------------------------------------
@needs_nixl
def test_bench_p2p_rdma_rows_verify_their_digest():
    """``bench p2p`` link-rdma (UCX's choice: cma) and link-rdma-tcp, real worker
    processes, two receivers each checking the digest of what it received."""
    from ftx_bench.p2p import backend_unavailable, run_p2p

    assert backend_unavailable("link-rdma") is None
    assert backend_unavailable("link-rdma", wan=True)  # cma would bypass an emulated WAN
    assert backend_unavailable("link-rdma-tcp", wan=True) is None
    size = 3 * MiB
    rows = run_p2p([size], ["link-rdma", "link-rdma-tcp"], [2], repeat=1, warmup=1,
                   opts={"verify": True})
    assert [(r["backend"], r.get("error")) for r in rows] == [("link-rdma", None),
                                                               ("link-rdma-tcp", None)]
    for r in rows:
        assert r["k"] == 2 and r["throughput_MBps"] > 0 and len(r["latency_s"]) == 1


# -- spill files (issue 24): the server keeps no per-node copy of a folded upload ----------
@needs_nixl
@pytest.mark.parametrize("tls", TLS)
def test_a_folded_upload_is_read_into_a_spill_file_and_leaves_no_pages_behind(server, tls):
    """rdma:// READs a folded upload into a registered spill file's mapping and drops
    each chunk's pages once its CRC checks out; the fold and a rebuild read the exact
    bytes back from the file."""
    import hashlib
    import time

    from test_tcp_helpers import mapping_of

    link = server(**({"ucx_tls": tls} if tls else {}))
    rec, p = make_payload(6 * MiB, seed=5)
    sent = hashlib.sha256(b"".join(bytes(s) for s in p.segments)).hexdigest()
    slot = link.issue_slot("r1-train-n1", 8 * MiB)
    seen = {}

    def hook(src):
        seen["before"] = mapping_of(link.server.slots[slot["id"]].buf)
        seen["sha"] = hashlib.sha256(src.view(0, src.size)).hexdigest()

    assert link.on_upload(slot, hook)
    back = rdma.RdmaClientLink().upload(slot, p)
    st = link.server.slots[slot["id"]]
    end = time.monotonic() + 10
    while not ("sha" in seen and st.readers == 0):
        assert time.monotonic() < end
        time.sleep(0.01)
    assert st.spilled and seen["sha"] == sent
    rss_before, path = seen["before"]
    assert path.endswith("(deleted)") and rss_before <= 512 * KiB, seen["before"]
    assert mapping_of(st.buf)[0] <= 64 * KiB
    with link.open_upload(slot, back, p.size) as src:
        assert same(decode(src.read, p.size, p.digest), rec)
    assert mapping_of(st.buf)[0] <= 512 * KiB


@needs_nixl
def test_spilled_reads_in_flight_stay_within_the_servers_budget(server):
    """All uploads together keep at most the server's budget of spilled READs in
    flight (their pages are mapped until checked), each transfer always moving at
    least one chunk; the budget is whole again afterwards."""
    import time

    link = server(chunk_size="64KiB", window=4)
    rd = link.server.rdma
    rd.inflight = ch.ByteBudget(128 * KiB)  # two 64 KiB chunks, for all uploads
    peak = []
    take = rd.inflight.take

    def watched(n, holding):
        ok = take(n, holding)
        peak.append(rd.inflight.used)
        return ok

    rd.inflight.take = watched
    recs, slots, got = [], [], []
    for k in range(2):
        rec, p = make_payload(2 * MiB, seed=20 + k)
        slot = link.issue_slot(f"r1-train-n{k}", 4 * MiB)
        assert link.on_upload(slot, lambda src: got.append(src.size))
        recs.append((rec, p))
        slots.append(slot)
    import threading

    backs = [None, None]

    def up(k):
        backs[k] = rdma.RdmaClientLink().upload(slots[k], recs[k][1])

    ts = [threading.Thread(target=up, args=(k,)) for k in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    end = time.monotonic() + 10
    while len(got) < 2:
        assert time.monotonic() < end
        time.sleep(0.01)
    assert peak and max(peak) <= 128 * KiB, max(peak)
    assert rd.inflight.used == 0
    for k in range(2):
        with link.open_upload(slots[k], backs[k], recs[k][1].size) as src:
            assert same(decode(src.read, src.size, recs[k][1].digest), recs[k][0])


def _refuse_spill_registration(link, monkeypatch) -> list:
    """Make the NIXL registration of spill buffers fail, as a kernel that will not pin
    a file's page cache for a NIC does (Linux 6.5+). A real refusal cannot happen here
    (UCX runs over cma/tcp, which register any memory), so the spill pool's
    ``registered`` raises instead; the memory pool's registration stays real."""
    rd = link.server.rdma
    refused = []

    def refuse(buf):
        refused.append(len(buf))
        raise RuntimeError("NIXL_ERR_BACKEND: cannot register file-backed memory")

    monkeypatch.setattr(rd.spill, "registered", refuse)
    return refused


@needs_nixl
def test_a_refused_spill_registration_keeps_the_chunks_already_received(server, monkeypatch,
                                                                        tmp_path):
    """The swap to pooled memory when NIXL refuses a spill buffer keeps the chunks that
    landed in it before (here: sent over the tcp:// chunk ops, which the rdma:// server
    also serves; the rdma:// client never does that, but nothing stops a client from
    it): the upload still decodes to exactly what was sent, and later uploads go to
    memory (spilling off for this server)."""
    from test_tcp_helpers import raw_put, spill_maps

    link = server(chunk_size="64KiB", spill_dir=str(tmp_path))
    rec, p = make_payload(1 * MiB, seed=31)
    sent = b"".join(bytes(s) for s in p.segments)
    slot = link.issue_slot("r1-train-n1", 4 * MiB)
    got = []
    assert link.on_upload(slot, lambda src: got.append(bytes(src.view(0, src.size))))
    refused = _refuse_spill_registration(link, monkeypatch)
    cs = slot["chunk_size"]
    raw_put(slot, p.size, {0: sent[:cs], 3: sent[3 * cs:4 * cs]}).close()
    st = link.server.slots[slot["id"]]
    assert st.spilled and st.have.count(1) == 2
    back = rdma.RdmaClientLink().upload(slot, p)  # reads the other chunks over NIXL
    end = time.monotonic() + 10
    while not (got and st.readers == 0):
        assert time.monotonic() < end
        time.sleep(0.01)
    assert refused and not st.spilled and link.server.spill is None
    assert got[0] == sent  # the fold saw every chunk, the two sent before the swap too
    assert spill_maps(tmp_path) == 0  # the swapped-out spill file is unmapped (its disk freed)
    assert link.server.rdma.inflight.used == 0  # memory READs never charged the budget
    with link.open_upload(slot, back, p.size) as src:
        assert same(decode(src.read, p.size, p.digest), rec)


@needs_nixl
def test_spilling_turned_off_meanwhile_never_breaks_an_upload_being_opened(server):
    """``srv.spill`` is set to None by another upload's refused registration at any
    time, with no lock shared with the one being opened: an upload opened right
    between the check and the use of the spill pool (the window forced here by
    turning spilling off as the opening reads the slot's hook) still goes, into
    memory."""
    link = server()
    rec, p = make_payload(1 * MiB, seed=32)
    slot = link.issue_slot("r1-train-n2", 4 * MiB)
    got = []
    assert link.on_upload(slot, lambda src: got.append(src.size))
    srv = link.server
    st = srv.slots[slot["id"]]
    hook = st.hook

    class Racing(type(st)):
        @property
        def hook(self):
            srv.spill = None  # the other upload's swap, at the worst moment
            return hook

        @hook.setter
        def hook(self, fn):
            pass

    st.__class__ = Racing
    back = rdma.RdmaClientLink().upload({**slot, "retries": 0}, p)  # the first try goes
    end = time.monotonic() + 10
    while not got:
        assert time.monotonic() < end
        time.sleep(0.01)
    with link.open_upload(slot, back, p.size) as src:
        assert same(decode(src.read, p.size, p.digest), rec)


@needs_nixl
def test_a_hostile_upload_request_holds_no_spill_file_once_its_slot_is_discarded(server,
                                                                                  tmp_path):
    """A client announcing an upload of the slot's cap with metadata NIXL rejects
    (nothing ever to read) gets a clear refusal; the spill file made for the
    announcement is the slot's only (one per slot, the announced size) and goes, with
    its registration, when the round discards the slot (buffer_pool=0: none pooled)."""
    from test_tcp_helpers import spill_maps

    link = server(buffer_pool=0, spill_dir=str(tmp_path))
    cap = 2 * MiB
    slot = link.issue_slot("r1-train-n3", cap)
    assert link.on_upload(slot, lambda src: None)
    tok, oid = bytes.fromhex(slot["token"]), slot["id"].encode()
    n = ch.n_chunks(cap, 64 * KiB)
    body = rdma.PUT_HEAD.pack(cap, 8, 1) + b"bogus-md" + rdma.SEG.pack(4096, cap) + b"\0" * 4 * n
    for _ in range(2):  # asking twice makes no second file
        with socket.create_connection(("127.0.0.1", slot["port"]), timeout=5) as s:
            s.sendall(ch.REQ.pack(ch.MAGIC_REQ, ch.OP_RDMA_PUT, 0, len(oid), tok, 64 * KiB,
                                  len(body), 0) + oid + body)
            head = ch.RSP.unpack(ch.recv_exact(s, ch.RSP.size))
            assert head[1] == ch.INCOMPLETE
            assert b"rejected by NIXL" in ch.recv_exact(s, head[5])
    assert spill_maps(tmp_path) == cap
    link.discard_slot(slot)
    assert spill_maps(tmp_path) == 0 and not link.server.rdma.spill.regs


@needs_nixl
def test_a_slot_discarded_while_its_upload_is_read_leaves_no_spill_file(server, tmp_path):
    """The round discards a slot while rdma:// is still READing its upload into a spill
    file (a slow or stalling client): the transfer stops, and the file (and its NIXL
    registration) is released, not kept until the server closes."""
    from test_tcp_helpers import spill_maps

    link = server(buffer_pool=0, spill_dir=str(tmp_path), window=2)
    _, p = make_payload(2 * MiB, seed=33)
    slot = link.issue_slot("r1-train-n4", 4 * MiB)
    assert link.on_upload(slot, lambda src: None)
    reading, discarded = threading.Event(), threading.Event()

    def slow(op, oid, i, views):
        if i == 2:
            reading.set()
            discarded.wait(5)

    link.server.fault = slow
    errors = []

    def up():
        try:
            rdma.RdmaClientLink().upload({**slot, "retries": 0}, p)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=up)
    t.start()
    assert reading.wait(10)
    assert spill_maps(tmp_path) > 0
    link.discard_slot(slot)
    discarded.set()
    t.join(10)
    assert errors  # the upload did not land: its slot is gone
    end = time.monotonic() + 3
    while spill_maps(tmp_path) or link.server.rdma.spill.regs:
        assert time.monotonic() < end, (spill_maps(tmp_path), link.server.rdma.spill.regs)
        time.sleep(0.01)
    assert link.server.rdma.inflight.used == 0  # the budget is whole again
