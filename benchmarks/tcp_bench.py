"""Point-to-point loopback benchmark: the tcp:// link vs a raw Python socket.

Both run in this one process (server and client threads), over 127.0.0.1, on the
same payload:

* raw:       one connection, ``sendall(memoryview)`` -> ``recv_into`` a preallocated,
             already touched buffer (the best a plain Python socket does; no checks,
             no framing); ``raw fresh`` allocates the buffer inside the timing, as any
             receiver of a new payload must (page faults included);
* tcp GET:   ``TcpServerLink.publish`` (chunk table computed before the clock starts)
             then ``TcpClientLink.open`` and wait for every chunk (CRC-checked) in
             the client's buffer; ``+read`` adds ``read()`` of the whole payload into
             ``bytes`` (one extra copy: the fallback path); ``->Array`` fetches the same
             bytes as one Flower Array in a real payload and decodes it: chunks land
             in the Array's own fresh ``bytes`` (what a ClientApp gets; no copy);
* tcp PUT:   ``TcpClientLink.upload`` into a slot (client computes CRCs while sending,
             server checks them) until the commit returns.

Usage: python benchmarks/tcp_bench.py [--size 1GiB] [--repeat 3] [--streams 4]
       [--window 4] [--chunk-size 8MiB]
Prints median and best GB/s for each, the ratio link/raw (target >= 0.7) and the
CPU seconds (all threads of the process: both ends) spent per GiB moved, which is
steadier than throughput on a loaded machine.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import threading
import time

from flwr.app import Array, ArrayRecord

from flwr_transports.codec import EncodedPayload, decode, parse_size
from flwr_transports.codec import encode as encode_record
from flwr_transports.links.tcp import TcpClientLink, TcpServerLink

KINDS = ("raw", "raw fresh", "tcp GET", "tcp GET+read", "tcp GET->Array", "tcp PUT")
CPU: dict[str, list[float]] = {k: [] for k in KINDS}


def raw_transfer(data: memoryview, dest: memoryview | None, key: str = "raw") -> float:
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve():
        c, _ = srv.accept()
        with c:
            c.sendall(data)
        srv.close()

    t = threading.Thread(target=serve)
    t.start()
    cli = socket.create_connection(("127.0.0.1", port))
    c0 = time.process_time()
    t0 = time.perf_counter()
    mv = memoryview(bytearray(len(data))) if dest is None else dest
    while len(mv):
        n = cli.recv_into(mv)
        if not n:
            raise RuntimeError("short raw transfer")
        mv = mv[n:]
    dt = time.perf_counter() - t0
    cli.close()
    t.join()
    CPU[key].append(time.process_time() - c0)
    return dt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--chunk-size", default="8MiB")
    ap.add_argument("--no-put", action="store_true")
    a = ap.parse_args(argv)
    size = parse_size(a.size)
    data = os.urandom(min(size, 64 << 20)) * (size // min(size, 64 << 20))
    data += os.urandom(size - len(data))
    payload = EncodedPayload(segments=[data], size=size, digest="sha256:" + "0" * 64)
    dest = bytearray(size)  # raw: preallocated and warmed
    res: dict[str, list[float]] = {"raw": [], "raw fresh": [], "tcp GET": [], "tcp GET+read": [],
                                   "tcp GET->Array": [], "tcp PUT": []}
    # the same bytes as one Flower Array in a real payload: what a ClientApp receives
    arr = Array(dtype="uint8", shape=(size,), stype="raw", data=data)
    rec_payload = encode_record(ArrayRecord({"w": arr}))

    srv = TcpServerLink("tcp://127.0.0.1:0", "bench", {
        "chunk_size": a.chunk_size, "streams": a.streams, "window": a.window})
    cli = TcpClientLink()
    try:
        t0 = time.perf_counter()
        loc = srv.publish("bench", payload)
        t_pub = time.perf_counter() - t0
        rec_loc = srv.publish("bench-rec", rec_payload)
        for _ in range(a.repeat):
            res["raw"].append(raw_transfer(memoryview(data), memoryview(dest)))
            res["raw fresh"].append(raw_transfer(memoryview(data), None, "raw fresh"))
            c0 = time.process_time()
            t0 = time.perf_counter()
            src = cli.open(loc, size)
            src.scheduler.wait_all(600)
            t1 = time.perf_counter()
            c1 = time.process_time()
            step = 64 << 20
            for off in range(0, size, step):
                src.read(off, min(step, size - off))
            t2 = time.perf_counter()
            c2 = time.process_time()
            CPU["tcp GET"].append(c1 - c0)
            CPU["tcp GET+read"].append(c2 - c0)
            src.close()
            res["tcp GET"].append(t1 - t0)
            res["tcp GET+read"].append(t2 - t0)
            # received straight into the Array's own bytes (no digest: transfer only)
            c0 = time.process_time()
            t0 = time.perf_counter()
            with cli.open(rec_loc, rec_payload.size) as src:
                rec = decode(src.read, rec_payload.size, None)
            res["tcp GET->Array"].append(time.perf_counter() - t0)
            CPU["tcp GET->Array"].append(time.process_time() - c0)
            assert len(rec["w"].data) == size and src.placement().scatter
            del rec
            if not a.no_put:
                slot = srv.issue_slot(f"put{_}", size)
                c0 = time.process_time()
                t0 = time.perf_counter()
                cli.upload(slot, payload)
                res["tcp PUT"].append(time.perf_counter() - t0)
                CPU["tcp PUT"].append(time.process_time() - c0)
                srv.discard_slot(slot)
    finally:
        srv.close()
    print(f"payload {size / 2**20:.0f} MiB, chunk {a.chunk_size}, streams {a.streams}, "
          f"window {a.window}, repeats {a.repeat}; publish (CRC table) {t_pub:.2f}s")
    raw_med = size / statistics.median(res["raw"]) / 1e9
    fresh_med = size / statistics.median(res["raw fresh"]) / 1e9
    for name, ts in res.items():
        if not ts:
            continue
        best, med = size / min(ts) / 1e9, size / statistics.median(ts) / 1e9
        ratio = "" if name.startswith("raw") else (
            f"  x{med / raw_med:.2f} of raw, x{med / fresh_med:.2f} of raw fresh")
        cpu = statistics.median(CPU[name]) / (size / 2**30)
        print(f"  {name:<13} median {med:6.2f} GB/s  best {best:6.2f} GB/s  "
              f"CPU {cpu:5.2f} s/GiB{ratio}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"  (load average {load:.1f} on {os.cpu_count()} CPUs while measuring)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
