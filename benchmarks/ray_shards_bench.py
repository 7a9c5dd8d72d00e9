"""aggregation=ray vs aggregation=streaming: what the ServerApp holds, how fast the shards fold.

One aggregation phase on a real S3 server (moto, in its OWN process so that its memory
is not the ServerApp's) and a local Ray cluster: N client payloads are uploaded by a
separate uploader process through the reply slots the ServerApp's s3:// link issued
(the clients' own code path), then the ServerApp (this process) settles the round:

* ``streaming``: :class:`~flwr_transports.aggregation.round.RoundStream` folds every
  upload in this process (ranged GETs, hashing, the accumulator here);
* ``ray K=k``: :class:`~flwr_transports.aggregation.ray_shards.RayRoundStream` with k
  shard actors: they read and fold; this process reads only the payload headers and
  combines the leaf hashes. Then the mean is assembled here (Flower's ``Strategy.start``
  keeps the global model as an ArrayRecord);
* ``ray-store K=k`` (``--store``): the same fold, then the shard owners write the mean
  to the store as the parts of one multipart upload (``ray_model=store``,
  aggregation/ray_publish.py): this process creates and completes the upload and
  holds a stub record, never the model.

Reported per model size and mode: the ServerApp's peak RSS above its level before the
phase, during the fold (``fold_peak_mib``) and including the mean
(``mean_peak_mib``; VmHWM, reset through /proc/self/clear_refs); fold seconds; GB/s
folded (all actors together) and per actor.

    python benchmarks/ray_shards_bench.py --sizes 64,512 --clients 4 --shards 1,2
    python benchmarks/ray_shards_bench.py --sizes 64,256 --shards 2 --skip-streaming --store
    python benchmarks/ray_shards_bench.py --sizes 64,512 --shards 2 --store-only
    python benchmarks/ray_shards_bench.py --cpu-only   # one actor's fold, no store
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

MIB = 1 << 20
CREDS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
         "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

UPLOADER = r"""
import json, sys
import numpy as np
from flwr.app import Array, ArrayRecord
from flwr_transports.codec import encode
from flwr_transports.links import client_link
from flwr_transports.aggregation import WEIGHT_META

job = json.load(open(sys.argv[1]))
link = client_link("s3")
out = []
n = job["mib"] * 2**20 // 4 // 4  # four float32 arrays
for i, slot in enumerate(job["slots"]):
    r = np.random.default_rng(i)
    rec = ArrayRecord({f"layer{j}": Array(r.standard_normal(n, dtype=np.float32))
                       for j in range(4)})
    w = 10 * (i + 1)
    p = encode(rec, {WEIGHT_META: json.dumps(w)})
    loc = link.upload(slot, p)
    out.append({"loc": loc, "size": p.size, "digest": p.digest, "weight": w})
    del rec, p
json.dump(out, open(sys.argv[2], "w"))
"""


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_process():
    port = _free_port()
    env = {**os.environ, **CREDS}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        import requests

        for _ in range(200):
            try:
                requests.get(url, timeout=1)
                break
            except requests.RequestException:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


class StoreSink:
    """``ray_model=store`` without the offload wrapper: the owners' multipart upload on
    the bench's link (completed, then released: the phase's cost, not the next round's)."""

    def __init__(self, link):
        self.link = link
        self.parts = 0

    def usable(self, server_round, size, mean=True):  # the wrapper's sink's signature
        return True

    def begin(self, server_round, n):
        return self.link.begin_owned(f"bench-model-{uuid.uuid4().hex[:8]}", n)

    def complete(self, up, etags, lay, digest):
        self.link.complete_owned(up, etags, lay.size)
        self.link.release(up["name"])
        self.parts = len(etags)
        return digest

    def abort(self, up):
        self.link.abort_owned(up)


def phase(link, uploads, mode: str, shards: int, cluster):
    from flwr_transports.aggregation.layout import layout_of, plan_payload
    from flwr_transports.aggregation.ray_shards import RayRoundStream
    from flwr_transports.aggregation.round import Accepted, RoundStream

    def source(u):
        st = link._slots[u["slot"]["key"]]
        return link._reader(u["slot"]["key"], u["size"], st)

    with source(uploads[0]) as src:
        expected = layout_of(plan_payload(src.read, src.size))
    acc = [Accepted(index=i, key=("t", i), digest=u["digest"], weight=u["weight"],
                    size=u["size"]) for i, u in enumerate(uploads)]
    opened = {}

    @contextmanager
    def open_upload(a):
        if a.index not in opened:
            opened[a.index] = source(uploads[a.index])
        yield opened[a.index]

    if mode == "streaming":
        stream = RoundStream(1, expected)
    else:
        cluster.want = shards
        cluster.sink = StoreSink(link) if mode == "ray-store" else None
        stream = RayRoundStream(1, expected, cluster)
        cluster.ensure(shards)  # actor start-up is not the phase's cost
    gc.collect()
    base = _status("VmRSS")
    base_anon, base_shm = _status("RssAnon"), _status("RssShmem")
    _reset_peak()
    t0 = time.perf_counter()
    total, rejected = stream.settle(acc, open_upload)
    t_fold = time.perf_counter() - t0
    fold_peak = _status("VmHWM") - base
    assert not rejected, rejected
    _reset_peak()
    mean = total.mean()
    t_mean = time.perf_counter() - t0 - t_fold
    mean_peak = max(fold_peak, _status("VmHWM") - base)
    # of the RSS right after the mean: private memory vs pages of Ray's object store
    # (shared memory, mapped when the shards' pieces are read; they count in VmHWM)
    anon, shm = _status("RssAnon") - base_anon, _status("RssShmem") - base_shm
    for s in opened.values():
        s.close()
    del mean, total
    gc.collect()
    nbytes = sum(u["size"] for u in uploads)
    parts = cluster.sink.parts if mode == "ray-store" else 0
    cluster.sink = None
    row = {"mode": mode if mode == "streaming" else f"{mode} K={shards}",
           "fold_s": round(t_fold, 2), "mean_s": round(t_mean, 2),
           "fold_peak_mib": round(fold_peak / MIB), "mean_peak_mib": round(mean_peak / MIB),
           "anon_after_mean_mib": round(anon / MIB), "shmem_after_mean_mib": round(shm / MIB),
           "gb_per_s": round(nbytes / t_fold / 1e9, 3)}
    if parts:
        row["parts_written"] = parts
    if mode != "streaming":
        row["gb_per_s_per_actor"] = round(nbytes / t_fold / 1e9 / shards, 3)
    return row


def cpu_fold(mib: int = 256) -> list[dict]:
    """What one shard owner can fold when the store is not the limit: read (one copy
    per 16 MiB window, as from a ranged GET), hash and fold a ``mib`` payload from
    memory, in this process (K=1: the whole payload; K=2: the first shard)."""
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from flwr_transports.aggregation import WEIGHT_META, Source, plan_payload
    from flwr_transports.aggregation.ray_shards import ShardSum, cut, windows_of
    from flwr_transports.codec import DIGEST_CHUNK, encode

    n = mib * MIB // 4
    rec = ArrayRecord({"w": Array(np.random.default_rng(0).standard_normal(n, dtype=np.float32))})
    buf = encode(rec, {WEIGHT_META: "10"}).to_bytes()
    plan = plan_payload(lambda o, k: buf[o:o + k], len(buf))
    mv = memoryview(buf)
    src = Source(len(buf), read=lambda o, k: bytes(mv[o:o + k]))
    rows = []
    for k in (1, 2):
        shards = cut(plan, k)
        s = ShardSum(plan, shards[0])
        t0, t1 = windows_of(plan, shards, 0)
        s.fold_windows(src, plan, t0, t1, 10.0)  # warm-up (first fold: multiply only)
        t = time.perf_counter()
        for _ in range(3):
            s.fold_windows(src, plan, t0, t1, 10.0)
        dt = (time.perf_counter() - t) / 3
        nb = min(len(buf), t1 * DIGEST_CHUNK) - t0 * DIGEST_CHUNK
        rows.append({"mode": f"cpu fold, shard of K={k}", "shard_mib": round(nb / MIB),
                     "fold_s": round(dt, 3), "gb_per_s_per_actor": round(nb / dt / 1e9, 2)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="64,512", help="model sizes, MiB")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--shards", default="1,2")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--skip-streaming", action="store_true", help="only the ray modes")
    ap.add_argument("--store", action="store_true", help="also ray_model=store: the shard "
                    "owners write the mean to the store (ray-store K=k)")
    ap.add_argument("--store-only", action="store_true", help="only ray_model=store (no "
                    "streaming, no ray K=k with the mean assembled here)")
    ap.add_argument("--cpu-only", action="store_true", help="only the in-memory fold "
                    "throughput of one shard owner (no store, no Ray)")
    args = ap.parse_args(argv)
    if args.cpu_only:
        for row in cpu_fold():
            print(json.dumps(row), flush=True)
        return 0
    os.environ.update(CREDS)
    import ray

    from flwr_transports.aggregation.ray_shards import RayCluster
    from flwr_transports.links import server_link

    rows = []
    with moto_process() as endpoint:
        import boto3

        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        ray_tmp = tempfile.mkdtemp(prefix="ftx-ray-bench-")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, object_store_memory=1200 * MIB,
                 _temp_dir=ray_tmp)
        cluster = RayCluster()
        try:
            for mib in [int(x) for x in args.sizes.split(",")]:
                link = server_link(f"s3://{bucket}/bench?endpoint_url={endpoint}", 1, {})
                try:
                    slots = [link.issue_slot(f"r1-train-n{i}", mib * MIB + 64 * MIB)
                             for i in range(args.clients)]
                    with tempfile.TemporaryDirectory() as d:
                        job, res = Path(d, "job.json"), Path(d, "res.json")
                        job.write_text(json.dumps({"mib": mib, "slots": slots}))
                        t0 = time.perf_counter()
                        subprocess.run([sys.executable, "-c", UPLOADER, str(job), str(res)],
                                       check=True)
                        t_up = time.perf_counter() - t0
                        uploads = json.loads(res.read_text())
                    for u, slot in zip(uploads, slots, strict=True):
                        u["slot"] = slot
                        link.open_upload(slot, u["loc"], u["size"]).close()
                    print(f"# {mib} MiB x {args.clients}: uploaded in {t_up:.1f}s", flush=True)
                    modes = [] if args.skip_streaming or args.store_only else [("streaming", 0)]
                    if not args.store_only:
                        modes += [("ray", int(k)) for k in args.shards.split(",")]
                    if args.store or args.store_only:
                        modes += [("ray-store", int(k)) for k in args.shards.split(",")]
                    for mode, k in modes:
                        row = {"model_mib": mib, "clients": args.clients,
                               **phase(link, uploads, mode, k, cluster)}
                        print(json.dumps(row), flush=True)
                        rows.append(row)
                finally:
                    link.close()
        finally:
            cluster.close()
            ray.shutdown()
            import shutil

            shutil.rmtree(ray_tmp, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
