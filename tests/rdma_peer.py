"""A separate client process for the rdma:// tests (so UCX really crosses processes).

``python rdma_peer.py '<json job>'``: the job names a ``mode`` and carries the
descriptors; the result is printed as one ``RESULT {json}`` line (UCX's own output,
e.g. ``UCX_PROTO_INFO`` tables, goes to the same stdout).

Modes:

* ``roundtrip``: download ``loc`` (checking its digest), check every array of 64 KiB or
  more landed in its own bytes object, then upload the decoded record into ``slot``;
* ``die_in_download``: download ``loc`` and SIGKILL itself when chunk ``die_at`` lands;
* ``slow_upload``: upload ``nbytes`` of random data into ``slot`` (the test kills this
  process while the server reads it).
"""

from __future__ import annotations

import json
import os
import signal
import sys

from flwr_transports import _membuf
from flwr_transports.codec import decode, encode
from flwr_transports.links.rdma import RdmaClientLink


def main() -> None:
    job = json.loads(sys.argv[1])
    link = RdmaClientLink()
    out: dict = {}
    if job["mode"] == "roundtrip":
        loc, size, digest = job["loc"], job["size"], job["digest"]
        with link.open(loc, size) as src:
            rec = decode(src.read, size, digest)
            dest = src.placement()
            own = {id(o) for o in getattr(dest, "exact", {}).values()}
            big = [k for k in rec if len(rec[k].data) >= _membuf.ZC_MIN]
            out["own_bytes"] = sum(1 for k in big if id(rec[k].data) in own)
            out["big"] = len(big)
        out["download"] = link.last_stats
        back = link.upload(job["slot"], encode(rec))
        out["back"] = back
    elif job["mode"] == "die_in_download":
        def die(i, views):
            if i == job["die_at"]:
                os.kill(os.getpid(), signal.SIGKILL)

        link.fault = die
        with link.open(job["loc"], job["size"]) as src:
            src.read(0, job["size"])
    elif job["mode"] == "slow_upload":
        import numpy as np
        from flwr.app import ArrayRecord

        rec = ArrayRecord([np.random.default_rng(1).random(job["nbytes"] // 8)])
        link.upload(job["slot"], encode(rec))
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
