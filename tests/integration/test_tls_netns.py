"""Issue 21, "Done when": a Flower deployment over tcp:// between network namespaces
carries no model bytes in the clear by default.

The SuperLink, the ServerApp and its tcp:// payload server run in namespace A
(10.77.0.1, a non-loopback address: TLS by default), the SuperNode and its ClientApp in
namespace B, joined by a veth pair (ftx_bench.wan, 400 Mbit/s, so that the
capture keeps up). A raw ``AF_PACKET`` socket on A's end of the veth records every
frame, both ways, while ``flwr run`` drives one round of examples/quickstart-offload
(4 MiB model, 2 SuperNodes: the downloads of the global model, the uploads of the replies, the
evaluate download). The model is deterministic (``task.build_model``), so the test
knows bytes that must travel: 64 random 32-byte windows of the global model and of the
node's reply. Checked: none of them, and neither of the chunk protocol's magic strings,
appears in the capture. The same deployment with ``tcp://...?tls=off`` is the control:
there the windows and the magic strings ARE in the capture, so the capture sees what it
should. Skipped only where network namespaces cannot be created (not root, no iproute2).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from ftx_bench import wan
from ftx_bench.e2e import run_e2e

MODEL_MIB = 4.0
N_WINDOWS = 64
PROFILE = "0ms/400mbit"

CAPTURE = textwrap.dedent("""
    import signal, socket, struct, sys
    ifname, path = sys.argv[1], sys.argv[2]
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    try:
        s.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE
    except OSError:
        pass
    s.bind((ifname, 0))
    s.settimeout(0.2)
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    buf = bytearray(1 << 18)
    frames = nbytes = 0
    with open(path, "wb") as f:
        print("ready", flush=True)
        while not stop:
            try:
                n = s.recv_into(buf)
            except (TimeoutError, InterruptedError):
                continue
            f.write(struct.pack("!I", n))
            f.write(memoryview(buf)[:n])
            frames += 1
            nbytes += n
    packets, drops = struct.unpack("II", s.getsockopt(263, 6, 8))  # PACKET_STATISTICS
    print(f"frames={frames} bytes={nbytes} drops={drops}", flush=True)
""")


def _unavailable() -> str | None:
    why = wan.can_emulate()
    if why:
        return f"network namespaces cannot be created here: {why}"
    return None


def _task(app: Path):
    spec = importlib.util.spec_from_file_location("qs_task", app / "quickstart_offload" /
                                                  "task.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _windows(arr: np.ndarray, n: int, seed: int) -> list[bytes]:
    raw = np.ascontiguousarray(arr).tobytes()
    rng = np.random.default_rng(seed)
    return [raw[o:o + 32] for o in rng.integers(0, len(raw) - 32, n)]


class Capture:
    def __init__(self, w: wan.WanEmulation, path: str):
        self.path = path
        self.proc = subprocess.Popen([*w.prefix("a"), sys.executable, "-c", CAPTURE, "a0",
                                      path], stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        assert line == "ready", line
        self.summary = ""

    def stop(self) -> bytes:
        if self.proc.poll() is None:
            self.proc.terminate()
        out, _ = self.proc.communicate(timeout=30)
        self.summary = out.strip()
        with open(self.path, "rb") as f:
            return f.read()


def _run_captured(w, app, transport: str, tmp: str) -> tuple[bytes, dict, str]:
    cap = Capture(w, os.path.join(tmp, f"cap-{len(os.listdir(tmp))}.bin"))
    try:
        rows, _ = run_e2e([MODEL_MIB], [transport], nodes=2, rounds=1, floor_mib=0,
                          repeat=1, timeout=240, app=app, wan=w)
    finally:
        data = cap.stop()
    assert len(rows) == 1 and "error" not in rows[0], rows
    return data, rows[0], cap.summary


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(_unavailable() is not None, reason=str(_unavailable()))
def test_deployment_across_namespaces_sends_no_model_bytes_in_the_clear(quickstart_app):
    task = _task(quickstart_app)
    model = task.build_model(MODEL_MIB)
    reply = task.local_update(model, 0)  # partition 0's "training"
    big = "layer0.weight"
    secrets_down = _windows(model[big], N_WINDOWS, 1)
    secrets_up = _windows(reply[big], N_WINDOWS, 2)
    magic = [b"FTXQ", b"FTXR"]  # every request / response header of the chunk protocol

    with tempfile.TemporaryDirectory(prefix="ftx-tls-cap-") as tmp, \
            wan.WanEmulation(PROFILE, tag=f"ftxt-{os.getpid()}") as w:
        assert not w.addr_a.startswith("127.")
        data, row, summary = _run_captured(w, quickstart_app, "tcp://", tmp)
        plain, prow, psummary = _run_captured(w, quickstart_app, "tcp://?tls=off", tmp)

    # the run really moved the model over the link, through the captured veth
    for r in (row, prow):
        assert r["url"].startswith("tcp://10.77.0.1:0"), r["url"]
    model_bytes = sum(a.nbytes for a in model.values())
    assert len(data) > 2 * model_bytes, (len(data), summary)
    # control: without TLS the capture shows the model, the reply and the protocol
    found_down = sum(s in plain for s in secrets_down)
    found_up = sum(s in plain for s in secrets_up)
    assert found_down >= N_WINDOWS // 2 and found_up >= N_WINDOWS // 2, (
        found_down, found_up, psummary)
    assert all(m in plain for m in magic)
    # by default (TLS): none of it
    print(f"\ncontrol (tls=off): {found_down}/{N_WINDOWS} global-model and {found_up}/"
          f"{N_WINDOWS} reply windows seen; capture {psummary}; default: capture {summary}")
    leaked = [s.hex() for s in secrets_down + secrets_up if s in data]
    assert not leaked, (f"{len(leaked)} model windows in the clear", summary)
    assert not any(m in data for m in magic), summary
