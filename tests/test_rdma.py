"""rdma:// link: fail-fast behaviour here; the RDMA data path only on RDMA hardware.

This machine has no RDMA devices, so what can run here is: the fail-fast paths
(pyverbs missing, pyverbs without devices), the rdma:// control connection's code
over plain TCP (pairing refusals, inline fallback), and the shared chunk engine,
which tests/test_tcp.py covers. The hardware round trip below runs only where
pyverbs lists a device and FLWR_TRANSPORTS_RDMA_HOST names an RDMA-capable address.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import types

import pytest
from flwr.serverapp.strategy import FedAvg
from test_tcp_helpers import make_payload

from flwr_transports import offload
from flwr_transports.codec import decode
from flwr_transports.links import LinkError, client_link, link_classes, rdma
from flwr_transports.links import chunks as ch

HAVE_RDMA, WHY = rdma.rdma_status()


@pytest.fixture
def fake_pyverbs(monkeypatch):
    """Install a stand-in ``pyverbs`` package whose device list we control."""

    def install(devices):
        pkg = types.ModuleType("pyverbs")
        dev = types.ModuleType("pyverbs.device")

        def get_device_list():
            if isinstance(devices, Exception):
                raise devices
            return devices

        dev.get_device_list = get_device_list
        pkg.device = dev
        monkeypatch.setitem(sys.modules, "pyverbs", pkg)
        monkeypatch.setitem(sys.modules, "pyverbs.device", dev)

    return install


@pytest.mark.skipif(HAVE_RDMA, reason="this machine has RDMA: the fail-fast path does not apply")
def test_rdma_fails_fast_naming_tcp():
    assert not HAVE_RDMA and WHY
    with pytest.raises(LinkError, match=r"rdma:// cannot run.*tcp://"):
        offload(FedAvg(), transport="rdma://127.0.0.1:0")
    with pytest.raises(LinkError, match="tcp://"):
        link_classes("rdma")
    with pytest.raises(LinkError, match="tcp://"):
        client_link("rdma")


def test_missing_pyverbs_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyverbs", None)  # import fails
    monkeypatch.delitem(sys.modules, "pyverbs.device", raising=False)
    ok, why = rdma.rdma_status()
    assert not ok and "pyverbs is not importable" in why and "python3-pyverbs" in why


def test_pyverbs_without_devices(fake_pyverbs):
    fake_pyverbs(RuntimeError("Failed to get devices list"))
    ok, why = rdma.rdma_status()
    assert not ok and "no RDMA devices" in why and "Failed to get devices list" in why
    with pytest.raises(LinkError, match=r"no RDMA devices.*tcp://"):
        rdma._RdmaServerLink("rdma://127.0.0.1:0", 1, {})
    fake_pyverbs([])
    assert rdma.rdma_status() == (False, "pyverbs found no RDMA devices")


def test_pyverbs_with_a_device_is_reported(fake_pyverbs):
    fake_pyverbs([types.SimpleNamespace(name=b"mlx5_0")])
    assert rdma.rdma_status() == (True, "RDMA devices: mlx5_0")


# -- the rdma:// control connection over plain TCP --------------------------------------
@pytest.fixture
def rdma_ctrl_server():
    srv = ch.ChunkServer("127.0.0.1", 0, secret=secrets.token_bytes(32), timeout=5,
                         conn_cls=rdma.RdmaServerConn, name="rdma")
    yield srv
    srv.close()


def _hello(port: int, nonce_hex: str) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        oid = nonce_hex.encode()
        s.sendall(ch.REQ.pack(ch.MAGIC_REQ, ch.OP_HELLO, 0, len(oid), b"\0" * 32, 0, 0, 0) + oid)
        head = ch.recv_exact(s, ch.RSP.size)
        st, n = head[4], ch.RSP.unpack(head)[5]
        return st, ch.recv_exact(s, n)


def test_rdma_pairing_with_unknown_nonce_is_refused(rdma_ctrl_server):
    st, body = _hello(rdma_ctrl_server.port, secrets.token_hex(32))
    assert st == ch.BAD_REQUEST and b"no RDMA queue pair" in body
    assert rdma_ctrl_server.stats["refused"] == 1


def test_rdma_control_conn_serves_inline_without_queue_pair(rdma_ctrl_server):
    """Without a paired queue pair the rdma:// server conn falls back to inline data."""
    rec, p = make_payload(300 * 1024)
    rdma_ctrl_server.add_object("g.x", p, 64 * 1024)
    ep = ch.Endpoint("127.0.0.1", rdma_ctrl_server.port, timeout=5)
    src = ch.download(lambda: ch.ClientConn(ep), "g.x",
                      rdma_ctrl_server.token("get", "g.x"), p.size, streams=2)
    with src:
        out = decode(src.read, p.size, p.digest)
    assert list(out) == list(rec)


def test_tcp_server_rejects_out_of_band_and_hello():
    srv = ch.ChunkServer("127.0.0.1", 0, secret=b"k" * 32, timeout=5)
    try:
        st, body = _hello(srv.port, secrets.token_hex(32))
        assert st == ch.BAD_REQUEST and b"no extensions" in body
        # a PUT claiming out-of-band data on a tcp:// connection is dropped
        srv.add_slot("p.s", 1 << 20)
        tok = srv.token("put", "p.s")
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            oid = b"p.s"
            s.sendall(ch.REQ.pack(ch.MAGIC_REQ, ch.OP_PUT_OPEN, 0, 3, tok, 65536, 1000, 0) + oid)
            head = ch.recv_exact(s, ch.RSP.size)
            ch.recv_exact(s, ch.RSP.unpack(head)[5])
            s.sendall(ch.REQ.pack(ch.MAGIC_REQ, ch.OP_PUT, ch.F_OUT_OF_BAND, 3, tok, 0, 1000, 0)
                      + oid)
            assert s.recv(100) == b""  # connection closed
        assert srv.slots["p.s"].have.count(1) == 0
    finally:
        srv.close()


# -- real hardware only ------------------------------------------------------------------
@pytest.mark.skipif(
    not HAVE_RDMA or not os.environ.get("FLWR_TRANSPORTS_RDMA_HOST"),
    reason=f"no RDMA here: {WHY}" if not HAVE_RDMA else
    "set FLWR_TRANSPORTS_RDMA_HOST to the address of an RDMA-capable interface")
def test_rdma_roundtrip_on_hardware():
    host = os.environ["FLWR_TRANSPORTS_RDMA_HOST"]
    link = rdma.RdmaServerLink(f"rdma://{host}:0", 1, {"chunk_size": "1MiB"})
    try:
        rec, p = make_payload(8 << 20)
        loc = link.publish("r1", p)
        c = rdma.RdmaClientLink()
        with c.open(loc, p.size) as src:
            assert list(decode(src.read, p.size, p.digest)) == list(rec)
        slot = link.issue_slot("s0", 64 << 20)
        back = c.upload(slot, p)
        with link.open_upload(slot, back, p.size) as src:
            assert list(decode(src.read, p.size, p.digest)) == list(rec)
    finally:
        link.close()
