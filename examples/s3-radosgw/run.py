"""The llm-offload example with its weights in S3: Ceph radosgw on 127.0.0.1, real auth.

    python examples/s3-radosgw/run.py                      # tiny model, 2 rounds
    python examples/s3-radosgw/run.py --model-size 125m --rounds 3

Starts a one-node Ceph cluster with radosgw (ftx_bench.radosgw: Debian packages
unpacked into .cache/radosgw, no root install; S3 requests are SigV4-signed and
checked), creates a bucket, starts a local Flower deployment (SuperLink + 2
SuperNodes), runs examples/llm-offload with ``transport = s3://BUCKET/llm?endpoint_url=...``
and prints the round times, the losses and the bytes that went through S3; then
checks that the run left nothing in the bucket and stops everything.

Only the ServerApp uses the credentials: it uploads the global model and hands every
ClientApp presigned GET/PUT URLs (that expire) in the reference it sends. Here every
process runs on one machine and inherits the same environment; in a real deployment
set ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` on the SuperLink host only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
LLM_APP = REPO / "examples" / "llm-offload"


def radosgw_helper():
    """The Ceph radosgw helper of the benchmark harness (fetch / start / create_bucket /
    stop): ``ftx_bench.radosgw``, installed from a clone with ``pip install -e benchmarks``."""
    try:
        from ftx_bench import radosgw
    except ImportError as err:
        raise SystemExit(
            "this example starts Ceph radosgw with the repository's benchmark harness: "
            "from the repository root, pip install -e benchmarks") from err
    return radosgw


def s3_client(endpoint: str, access_key: str, secret_key: str):
    import boto3
    from botocore.config import Config

    return boto3.session.Session(
        aws_access_key_id=access_key, aws_secret_access_key=secret_key, region_name="us-east-1",
    ).client("s3", endpoint_url=endpoint, config=Config(
        s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
        response_checksum_validation="when_required"))


def bucket_leftovers(s3, bucket: str) -> list[str]:
    """Objects and unfinished multipart uploads still in ``bucket``."""
    left = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    left += [u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    return left


def run_example(endpoint: str, access_key: str, secret_key: str, bucket: str,
                run_config: dict, workdir: Path):
    """Deploy locally and run the llm-offload app with its weights in ``bucket``.

    Returns ``(RunResult, summary.json as a dict, result dir)``."""
    from flwr_transports.testing import LocalDeployment

    out = workdir / "result"
    out.mkdir(parents=True, exist_ok=True)
    creds = {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key,
             "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    cfg = {"transport": f"s3://{bucket}/llm?endpoint_url={endpoint}&threshold=0",
           **run_config, "result-dir": str(out)}
    with LocalDeployment(n_supernodes=2, workdir=workdir / "deploy", env=creds) as dep:
        res = dep.run(LLM_APP, cfg, timeout=3600)
    if not res.ok:
        raise RuntimeError(f"run failed ({res.status}):\n{res.output[-3000:]}")
    return res, json.loads((out / "summary.json").read_text()), out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-size", default="tiny")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)

    rgw = radosgw_helper()
    rgw.fetch()
    work = Path(tempfile.mkdtemp(prefix="ftx-s3-example-"))
    state = rgw.start(str(work / "ceph"), mem_bytes=2 << 30)
    try:
        s3 = s3_client(state["endpoint"], state["access_key"], state["secret_key"])
        bucket = f"llm-{uuid.uuid4().hex[:8]}"
        rgw.create_bucket(s3, bucket)
        print(f"radosgw at {state['endpoint']}, bucket {bucket}", flush=True)
        cfg = {"model-size": args.model_size, "num-server-rounds": args.rounds}
        if args.model_size == "tiny":
            cfg.update({"local-steps": 8, "seq-len": 64, "lr": 0.003, "data-vocab": 64})
        _, s, _ = run_example(state["endpoint"], state["access_key"], state["secret_key"],
                              bucket, cfg, work)
        for r in range(1, args.rounds + 1):
            print(f"round {r}: {s['round_s'][r - 1]:.1f} s, "
                  f"train-loss {s['train_metrics'][str(r)]['train-loss']:.3f}, "
                  f"eval-loss {s['evaluate_metrics'][str(r)]['eval-loss']:.3f}")
        st = s["stats"]
        print(f"S3: {st['link_bytes_sent'] / 2**20:.1f} MiB uploaded by the ServerApp, "
              f"{st['link_bytes_received'] / 2**20:.1f} MiB of replies read back; "
              f"in-band {st['inband_bytes_sent'] / 2**10:.0f} KiB; "
              f"replies rejected: {st['replies_rejected']}")
        left = bucket_leftovers(s3, bucket)
        print("bucket empty after the run" if not left else f"LEFT IN THE BUCKET: {left}")
        if left:
            sys.exit(1)
    finally:
        rgw.stop(state["dir"])
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
