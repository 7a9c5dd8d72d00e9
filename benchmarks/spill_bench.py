"""tcp:// upload into a folded slot: spill file (``spill=auto``) vs memory (``spill=off``).

One process: a TcpServerLink and a client on loopback; each upload lands in a slot with
a landing hook that reads every byte once (as the streaming fold does), so the time is
upload + the hook's read. Both settings alternate in every repeat; the first round of
each link is dropped (it allocates the buffer the pool then reuses).

    python benchmarks/spill_bench.py [--mib 256] [--repeat 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_tcp_helpers import make_payload

from flwr_transports.links.tcp import TcpClientLink, TcpServerLink


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    _, p = make_payload(a.mib << 20, seed=1)
    print("load before:", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    res: dict[str, list[float]] = {}
    for _ in range(a.repeat):
        for spill in ("auto", "off"):
            link = TcpServerLink("tcp://127.0.0.1:0", 7, {"spill": spill})
            try:
                for r in range(a.rounds):
                    slot = link.issue_slot(f"s{r}", (a.mib + 64) << 20)
                    done: list[bytes] = []
                    link.on_upload(slot, lambda src, done=done: done.append(
                        hashlib.sha256(src.view(0, src.size)).digest()))
                    t0 = time.perf_counter()
                    TcpClientLink().upload(slot, p)
                    while not done:
                        time.sleep(0.001)
                    if r:
                        res.setdefault(spill, []).append(time.perf_counter() - t0)
                    link.discard_slot(slot)
            finally:
                link.close()
    for k, v in res.items():
        print(f"spill={k}: {a.mib} MiB upload + read, median {statistics.median(v):.3f} s "
              f"({min(v):.3f}-{max(v):.3f}), n = {len(v)}")
    print("load after:", " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
