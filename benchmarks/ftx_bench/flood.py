"""``ftx-bench flood``: an honest tcp:// transfer during a connection flood.

One hostile node holds as many idle connections to the run's payload server as it
can (a separate process that re-opens every connection the server closes), while an
honest node downloads the global payload and uploads its reply. Printed: the
honest transfer time without the flood and under each flood mode, and the ratio.

Flood modes:

* ``idle``: connections that never send anything (no token);
* ``auth``: connections that present the hostile node's own valid download token
  once (it got one with the global model), then sit idle;
* ``trickle``: connections that send one header byte every second (never complete
  a request).

The server closes unauthenticated connections after the pre-auth deadline and, when
full, closes the longest-idle connection to admit a new one; honest clients back
off and retry while the server says BUSY. The issue's bar: under the flood, the
honest time stays within 2x of normal.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

FLOOD_SCRIPT = r"""
import select, socket, struct, sys, time
host, port, mode, hold, nmax = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
oid, token = sys.argv[6], bytes.fromhex(sys.argv[7])
REQ = struct.Struct("!4sBBH32sQQI")
info = REQ.pack(b"FTXQ", 1, 0, len(oid), token, 0, 0, 0) + oid.encode()
socks, opened, end = [], 0, time.monotonic() + hold
sys.stdout.write("ready\n"); sys.stdout.flush()
last_trickle = 0.0
while time.monotonic() < end:
    while len(socks) < nmax and time.monotonic() < end:
        try:
            s = socket.create_connection((host, port), timeout=2)
        except OSError:
            break
        opened += 1
        if mode == "auth":
            try:
                s.sendall(info)
            except OSError:
                s.close(); continue
        socks.append(s)
    # drop what the server closed (readable with EOF), keep the rest open and idle
    try:
        readable = select.select(socks, [], [], 0.05)[0] if socks else []
    except (OSError, ValueError):
        readable = socks
    for s in readable:
        try:
            data = s.recv(1 << 20)
        except OSError:
            data = b""
        if not data:
            socks.remove(s); s.close()
    if mode == "trickle" and time.monotonic() - last_trickle > 1.0:
        last_trickle = time.monotonic()
        for s in list(socks):
            try:
                s.send(b"F")
            except OSError:
                socks.remove(s); s.close()
print(f"opened {opened}")
"""


def _honest_transfer(server, client, name: str, payload, reply) -> float:
    """Download the published payload and upload the reply; seconds taken."""
    from flwr_transports.codec import decode

    t0 = time.perf_counter()
    loc = server.publish(name, payload)
    with client.open(loc, payload.size) as src:
        decode(src.read, payload.size, payload.digest)
    slot = server.issue_slot(name + "-up", reply.size * 2)
    up = client.upload(slot, reply)
    with server.open_upload(slot, up, reply.size) as src:
        decode(src.read, reply.size, reply.digest)
    server.discard_slot(slot)
    server.release(name)
    return time.perf_counter() - t0


def run_flood(size: int = 32 << 20, repeats: int = 3, modes=("idle", "auth", "trickle"),
              max_conns: int = 256) -> dict:
    from flwr.app import ArrayRecord

    from flwr_transports.codec import encode
    from flwr_transports.links import client_link, server_link

    rng = np.random.default_rng(0)
    payload = encode(ArrayRecord([rng.standard_normal(size // 4).astype(np.float32)]))
    reply = encode(ArrayRecord([rng.standard_normal(size // 4).astype(np.float32)]))
    server = server_link(f"tcp://127.0.0.1:0?max_conns={max_conns}", 1, {})
    client = client_link("tcp")
    out: dict = {"size": payload.size, "max_conns": max_conns, "modes": {}}
    try:
        base = [_honest_transfer(server, client, f"base{i}", payload, reply)
                for i in range(repeats)]
        out["normal_s"] = statistics.median(base)
        hostile_loc = server.publish("hostile-view", payload)  # the token a node holds
        for mode in modes:
            proc = subprocess.Popen(
                [sys.executable, "-c", FLOOD_SCRIPT, "127.0.0.1", str(server.port), mode,
                 "600", str(4 * max_conns), hostile_loc["id"], hostile_loc["token"]],
                stdout=subprocess.PIPE, text=True)
            try:
                proc.stdout.readline()
                time.sleep(2.0)  # the flood fills the server first
                held = len(server.server.active)
                times = [_honest_transfer(server, client, f"{mode}{i}", payload, reply)
                         for i in range(repeats)]
                out["modes"][mode] = {
                    "median_s": statistics.median(times), "times_s": times,
                    "ratio": statistics.median(times) / out["normal_s"],
                    "server_conns_when_honest_started": held,
                }
            finally:
                proc.kill()
                proc.wait()
            time.sleep(0.5)
        out["server_stats"] = dict(server.server.stats)
    finally:
        server.close()
    return out


def main(argv: list[str] | None = None) -> int:
    from flwr_transports.codec import parse_size

    ap = argparse.ArgumentParser(prog="ftx-bench flood", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=parse_size("32MiB"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-conns", type=int, default=256)
    ap.add_argument("--modes", default="idle,auth,trickle")
    ap.add_argument("--json", type=str, default="", help="also write the figures here")
    a = ap.parse_args(argv)
    res = run_flood(a.size, a.repeats, tuple(m for m in a.modes.split(",") if m), a.max_conns)
    print(f"honest transfer (download + upload of {res['size'] / 2**20:.0f} MiB each) on "
          f"tcp://, server max_conns={res['max_conns']}")
    print(f"  no flood          : {res['normal_s']:.3f} s")
    for mode, r in res["modes"].items():
        print(f"  flood {mode:<12}: {r['median_s']:.3f} s  ({r['ratio']:.2f}x; the server held "
              f"{r['server_conns_when_honest_started']} connections when it started)")
    print(f"  server: {json.dumps(res.get('server_stats', {}))}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0 if all(r["ratio"] <= 2.0 for r in res["modes"].values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("FLWR_TRANSPORTS_STRICT", "0")
    sys.exit(main())
