"""What TLS costs tcp://: one payload server (this process) and one client (a child
process), the same payload downloaded and uploaded with ``tls=off`` and ``tls=on``,
interleaved, ``--repeat`` times each; prints medians with ranges (MB/s = 1e6 bytes/s).

    .venv/bin/python scripts/tls_cost.py --size 256MiB --repeat 3 [--host 127.0.0.1]

Download: client ``open`` + read + decode of the whole payload (the ClientApp's path,
zero-copy placement). Upload: client ``upload`` (chunks + commit). Default streams/chunk
size (auto). The payload is random bytes (incompressible). CPU = process time of the
server process (its payload-server threads) plus the client process, per transfer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
import numpy as np
from flwr.app import Array, ArrayRecord
from flwr_transports.codec import decode, encode
from flwr_transports.links.tcp import TcpClientLink

size = int(sys.argv[1])
data = np.random.default_rng(7).bytes(size)
payload = encode(ArrayRecord({"p": Array(dtype="uint8", shape=(size,), stype="raw", data=data)}))
c = TcpClientLink()
print(json.dumps({"ready": payload.size}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    c0 = time.process_time()
    t0 = time.perf_counter()
    if cmd["op"] == "get":
        with c.open(cmd["loc"], cmd["size"]) as src:
            rec = decode(src.read, cmd["size"], cmd["digest"])
        dt = time.perf_counter() - t0
        cpu = time.process_time() - c0
        del rec
    else:
        back = c.upload(cmd["slot"], payload)
        dt = time.perf_counter() - t0
        cpu = time.process_time() - c0
    print(json.dumps({"t": dt, "cpu": cpu, "stats": c.last_stats, "back": back if cmd["op"] == "put" else None}),
          flush=True)
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="256MiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args()

    import numpy as np
    from flwr.app import Array, ArrayRecord

    from flwr_transports.codec import decode, encode
    from flwr_transports.links.tcp import TcpServerLink
    from flwr_transports.options import parse_size

    size = parse_size(args.size)
    data = np.random.default_rng(7).bytes(size)
    payload = encode(ArrayRecord({"p": Array(dtype="uint8", shape=(size,), stype="raw",
                                             data=data)}))
    links = {m: TcpServerLink(f"tcp://{args.host}:0?tls={m}", 1, {}) for m in ("off", "on")}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(size)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)

    def ask(cmd):
        c0 = time.process_time()  # this process = the payload server's threads
        child.stdin.write(json.dumps(cmd) + "\n")
        child.stdin.flush()
        out = json.loads(child.stdout.readline())
        out["cpu"] += time.process_time() - c0
        return out

    res: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    try:
        assert json.loads(child.stdout.readline())["ready"] == payload.size
        load0 = os.getloadavg()
        for it in range(args.repeat + 1):  # the first round warms up, not counted
            for mode in ("off", "on"):
                link = links[mode]
                loc = link.publish(f"g{it}", payload)
                r = ask({"op": "get", "loc": loc, "size": payload.size,
                         "digest": payload.digest})
                link.release(f"g{it}")
                slot = link.issue_slot(f"s{it}", payload.size)
                u = ask({"op": "put", "slot": slot})
                with link.open_upload(slot, u["back"], payload.size) as src:
                    decode(src.read, payload.size, payload.digest)  # verified, not timed
                link.discard_slot(slot)
                if it:
                    res.setdefault((mode, "download"), []).append(r["t"])
                    res.setdefault((mode, "upload"), []).append(u["t"])
                    cpu.setdefault((mode, "download"), []).append(r["cpu"])
                    cpu.setdefault((mode, "upload"), []).append(u["cpu"])
                print(f"# it {it} tls={mode}: download {r['t']:.3f} s "
                      f"(streams {r['stats'].get('streams')}, zero_copy "
                      f"{r['stats'].get('zero_copy')}), upload {u['t']:.3f} s", flush=True)
        load1 = os.getloadavg()
    finally:
        child.stdin.close()
        child.wait(30)
        for link in links.values():
            link.close()
    mb = payload.size / 1e6
    print(f"payload {payload.size} bytes, host {args.host}, {args.repeat} runs each; "
          f"load avg before {load0[0]:.2f}, after {load1[0]:.2f}")
    gib = payload.size / 2**30
    print("| direction | tls | median s | MB/s (median) | MB/s range | CPU s/GiB, both ends "
          "(median, range) |")
    print("|---|---|---:|---:|---|---|")
    for d in ("download", "upload"):
        for mode in ("off", "on"):
            ts = res[(mode, d)]
            med = statistics.median(ts)
            cs = [x / gib for x in cpu[(mode, d)]]
            print(f"| {d} | {mode} | {med:.3f} | {mb / med:.0f} | {mb / max(ts):.0f}-"
                  f"{mb / min(ts):.0f} | {statistics.median(cs):.2f} ({min(cs):.2f}-"
                  f"{max(cs):.2f}) |")
    for d in ("download", "upload"):
        off, on = (statistics.median(res[(m, d)]) for m in ("off", "on"))
        coff, con = (statistics.median(cpu[(m, d)]) for m in ("off", "on"))
        print(f"{d}: tls=on takes {on / off:.2f}x the time and {con / coff:.2f}x the CPU "
              "of tls=off")
    return 0


if __name__ == "__main__":
    t = time.time()
    rc = main()
    print(f"# {time.time() - t:.0f} s")
    sys.exit(rc)
