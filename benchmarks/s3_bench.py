"""s3:// link throughput: upload once + N parallel client downloads, vs plain boto3.

For each store (moto server in its own process, and/or Ceph radosgw started by
ftx_bench.radosgw) and each size:

* **publish**: ``S3ServerLink.publish`` (multipart, parallel parts, Content-MD5) vs
  boto3 ``upload_fileobj`` of the same bytes (TransferConfig with the same part size
  and concurrency);
* **N clients**: N separate processes (like N ClientApps) start together at a barrier:
  - ``link read``: ``S3ClientLink.open`` (presigned URL, parallel ranged GETs) and
    ``read()`` of the whole payload in 64 MiB pieces (the bytes a decoder consumes);
  - ``link decode``: the full client path: ``open`` + ``codec.decode`` (digest checked);
  - ``boto3``: ``download_file`` of the same object into /dev/shm (with credentials,
    same part size and concurrency).

Aggregate throughput = N x size / slowest client. Prints a table; overhead =
link / boto3 time. Usage:

    python benchmarks/s3_bench.py --store moto --sizes 100MiB --clients 2
    python benchmarks/s3_bench.py --store both --sizes 100MiB,1GiB --clients 2 --repeat 2
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid

MiB = 2**20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Moto:
    """moto_server in its own process (so its GIL is not ours)."""

    def __init__(self):
        port = _free_port()
        self.p = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.endpoint = f"http://127.0.0.1:{port}"
        self.keys = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
        import urllib.error
        import urllib.request

        for _ in range(200):
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                time.sleep(0.1)

    def stop(self):
        os.killpg(self.p.pid, 15)
        self.p.wait(10)


class Radosgw:
    def __init__(self):
        from ftx_bench import radosgw

        self.mod = radosgw
        self.state = self.mod.start(mem_bytes=int(os.environ.get("FTX_RGW_MEM", str(5 << 30))))
        self.endpoint = self.state["endpoint"]
        self.keys = {"AWS_ACCESS_KEY_ID": self.state["access_key"],
                     "AWS_SECRET_ACCESS_KEY": self.state["secret_key"]}

    def stop(self):
        self.mod.stop(self.state["dir"])


def boto_client(endpoint: str, conc: int):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", config=Config(
        signature_version="s3v4", s3={"addressing_style": "path"},
        max_pool_connections=conc + 4, request_checksum_calculation="when_required",
        response_checksum_validation="when_required"))


# -- client processes -------------------------------------------------------------------------
def _client(kind: str, job: dict, barrier, q) -> None:
    try:
        os.environ.update(job.get("env", {}))
        if kind == "boto3":
            from boto3.s3.transfer import TransferConfig

            c = boto_client(job["endpoint"], job["conc"])
            cfg = TransferConfig(multipart_chunksize=job["part"], max_concurrency=job["conc"],
                                 multipart_threshold=job["part"])
            dest = f"/dev/shm/ftx-s3bench-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            barrier.wait()
            t0 = time.perf_counter()
            c.download_file(job["bucket"], job["key"], dest, Config=cfg)
            dt = time.perf_counter() - t0
            n = os.path.getsize(dest)
            os.unlink(dest)
        else:
            from flwr_transports.codec import decode
            from flwr_transports.links.s3 import S3ClientLink

            link = S3ClientLink()
            size = job["size"]
            barrier.wait()
            t0 = time.perf_counter()
            with link.open(job["loc"], size) as src:
                if kind == "link-decode":
                    rec = decode(src.read, size, job["digest"])
                    n = rec.count_bytes()
                    del rec
                else:
                    n, off = 0, 0
                    while off < size:
                        k = min(64 * MiB, size - off)
                        n += len(src.read(off, k))
                        off += k
            dt = time.perf_counter() - t0
            if kind != "link-decode" and n != size:
                raise RuntimeError(f"read {n} of {size}")
            assert "boto3" not in sys.modules
        q.put((dt, n, None))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        with contextlib.suppress(Exception):
            barrier.abort()
        q.put((0.0, 0, f"{type(exc).__name__}: {exc}"))


def parallel(kind: str, job: dict, n: int) -> float:
    """Run n client processes together; return the slowest one's seconds."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(n)
    q = ctx.Queue()
    ps = [ctx.Process(target=_client, args=(kind, job, barrier, q)) for _ in range(n)]
    for p in ps:
        p.start()
    res = [q.get(timeout=1800) for _ in ps]
    for p in ps:
        p.join()
    errs = [e for _, _, e in res if e]
    if errs:
        raise RuntimeError(f"{kind} client failed: {errs[0]}")
    return max(dt for dt, _, _ in res)


# -- one store --------------------------------------------------------------------------------
def bench_store(name: str, store, sizes: list[int], clients: int, repeat: int, part: int,
                conc: int, encrypt: bool, checksum: str = "md5") -> list[tuple]:
    import numpy as np
    from boto3.s3.transfer import TransferConfig
    from flwr.app import ArrayRecord

    from flwr_transports.codec import encode
    from flwr_transports.links import server_link

    os.environ.update(store.keys)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    s3 = boto_client(store.endpoint, conc)
    bucket = f"ftx-bench-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    import io

    from boto3.s3.transfer import TransferConfig as _TC

    # warm-up: the first multipart upload after start creates pools (radosgw)
    s3.upload_fileobj(io.BytesIO(os.urandom(3 * part)), bucket, "warm",
                      Config=_TC(multipart_chunksize=part, multipart_threshold=part))
    s3.delete_object(Bucket=bucket, Key="warm")
    rows = []
    url = (f"s3://{bucket}/bench?endpoint_url={store.endpoint}&part_size={part}"
           f"&concurrency={conc}&encrypt={'true' if encrypt else 'false'}&checksum={checksum}")
    link = server_link(url, 0)
    try:
        for size in sizes:
            arr = np.random.default_rng(size).integers(0, 255, size, dtype=np.uint8)
            payload = encode(ArrayRecord({"w": __import__("flwr").app.Array(arr)}))
            del arr
            raw = b"".join(payload.segments)
            t_pub, t_bup = [], []
            for _ in range(repeat):
                t0 = time.perf_counter()
                loc = link.publish("model", payload)
                t_pub.append(time.perf_counter() - t0)
                cfg = TransferConfig(multipart_chunksize=part, max_concurrency=conc,
                                     multipart_threshold=part)
                t0 = time.perf_counter()
                s3.upload_fileobj(io.BytesIO(raw), bucket, "boto3-copy", Config=cfg)
                t_bup.append(time.perf_counter() - t0)
            job = {"loc": loc, "size": payload.size, "digest": payload.digest,
                   "endpoint": store.endpoint, "bucket": bucket, "key": "boto3-copy",
                   "part": part, "conc": conc, "env": dict(store.keys)}
            del raw
            res = {"link read": [], "link decode": [], "boto3": []}
            for _ in range(repeat):
                res["boto3"].append(parallel("boto3", job, clients))
                res["link read"].append(parallel("link-read", job, clients))
                res["link decode"].append(parallel("link-decode", job, clients))
            gb = payload.size / 1e9
            print(f"  publish runs {[round(t, 2) for t in t_pub]}, boto3 upload runs "
                  f"{[round(t, 2) for t in t_bup]}", flush=True)
            rows.append((name, size, "publish (link)", statistics.median(t_pub), gb))
            rows.append((name, size, "upload (boto3)", statistics.median(t_bup), gb))
            for k, v in res.items():
                rows.append((name, size, f"{clients}x {k}", statistics.median(v), gb * clients))
            link.release("model")
            s3.delete_object(Bucket=bucket, Key="boto3-copy")
            del payload
            _print(rows[-5:])
    finally:
        link.close()
        try:
            for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
                s3.delete_object(Bucket=bucket, Key=o["Key"])
            s3.delete_bucket(Bucket=bucket)
        except Exception as exc:  # noqa: BLE001 - the store is stopped next anyway
            print(f"(could not remove bucket {bucket}: {exc})", file=sys.stderr)
    return rows


def _print(rows):
    for store, size, what, t, gb in rows:
        print(f"{store:8} {size / MiB:7.0f} MiB  {what:22} {t:7.2f} s  {gb / t:6.2f} GB/s",
              flush=True)


def main(argv=None) -> int:
    from flwr_transports.codec import parse_size

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", choices=["moto", "radosgw", "both"], default="moto")
    ap.add_argument("--sizes", default="100MiB")
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--part-size", default="16MiB")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--encrypt", action="store_true")
    ap.add_argument("--checksum", choices=["md5", "none"], default="md5",
                    help="per-part Content-MD5 of the link (boto3 here sends none)")
    a = ap.parse_args(argv)
    sizes = [parse_size(s) for s in a.sizes.split(",")]
    part = parse_size(a.part_size)
    rows = []
    for name in (["moto", "radosgw"] if a.store == "both" else [a.store]):
        store = Moto() if name == "moto" else Radosgw()
        try:
            rows += bench_store(name, store, sizes, a.clients, a.repeat, part, a.concurrency,
                                a.encrypt, a.checksum)
        finally:
            store.stop()
    print("\nsummary (median of", a.repeat, "run(s); GB/s = bytes moved / seconds):")
    _print(rows)
    by = {(r[0], r[1], r[2].split(" ", 1)[-1]): r[3] for r in rows}
    for (store, size, what), t in by.items():
        if what in ("link read", "link decode"):
            b = by.get((store, size, "boto3"))
            if b:
                print(f"{store:8} {size / MiB:7.0f} MiB  {what} / boto3 download_file time: "
                      f"{t / b:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
