"""s3:// link against Ceph radosgw: a real S3 server that checks signatures and expiry.

Started by ftx_bench.radosgw (Debian packages fetched with apt-get download and
unpacked with dpkg -x into .cache/radosgw; no apt install). Select with
``pytest -m radosgw``; skipped with the reason when the packages cannot be fetched.
"""

from __future__ import annotations

import os
import sys
import time
import uuid

import boto3  # noqa: F401 - a dev dependency: missing is a failure
import numpy as np
import pytest

from flwr_transports.codec import decode
from flwr_transports.links import LinkError, server_link
from flwr_transports.links.s3 import S3ClientLink, S3ServerLink

sys.path.insert(0, os.path.dirname(__file__))
from test_s3_link import leftovers, payload_of, run, same

pytestmark = pytest.mark.radosgw
MiB = 2**20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def rgw(rgw_server):
    """The session's radosgw (tests/conftest.py), with its keys in the environment."""
    keys = {"AWS_ACCESS_KEY_ID": rgw_server["access_key"],
            "AWS_SECRET_ACCESS_KEY": rgw_server["secret_key"],
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield rgw_server
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def url(rgw, extra: str = "") -> str:
    return f"s3://{rgw['bucket']}/t?endpoint_url={rgw['endpoint']}{extra}"


def test_federation_works(rgw):
    from test_s3_link import initial

    init = initial(1_500_000)
    want, _ = run("inband", init, rounds=2)
    got, stats = run(url(rgw, "&part_size=5MiB&aggregation=inner"), init, rounds=2)
    assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(got, want))
    assert stats["link_bytes_received"] > 0 and stats["replies_rejected"] == 0
    assert leftovers(rgw["s3"], rgw["bucket"]) == ([], [])


def test_federation_encrypted(rgw):
    from test_s3_link import initial

    init = initial(1_500_000)
    want, _ = run("inband", init, rounds=1)
    got, _ = run(url(rgw, "&part_size=5MiB&encrypt=true&aggregation=inner"), init, rounds=1)
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
    assert leftovers(rgw["s3"], rgw["bucket"]) == ([], [])


def test_tampered_presigned_urls_fail_clearly(rgw):
    rec, payload = payload_of(6 * MiB)
    link = server_link(url(rgw), 1, {"part_size": "5MiB"})
    try:
        loc = link.publish("g", payload)
        client = S3ClientLink()
        # the untouched URL works
        with client.open(loc, payload.size) as src:
            assert same(decode(src.read, payload.size, payload.digest), rec)
        # pointing the signed GET at another object
        evil = dict(loc, get=loc["get"].replace("-g?", "-h?"))
        with pytest.raises(LinkError, match="signature"), client.open(evil, payload.size) as src:
            src.read(0, 8)
        # a different signature
        sig = loc["get"].rsplit("X-Amz-Signature=", 1)[1][:64]
        evil = dict(loc, get=loc["get"].replace(sig, "0" * 64))
        with pytest.raises(LinkError, match="signature"), client.open(evil, payload.size) as src:
            src.read(0, 8)
        # stretching the lifetime invalidates the signature
        evil = dict(loc, get=loc["get"].replace("X-Amz-Expires=3600", "X-Amz-Expires=604800"))
        with pytest.raises(LinkError, match="signature"), client.open(evil, payload.size) as src:
            src.read(0, 8)
        # a part URL rewritten to another part number
        slot = link.issue_slot("r", 64 * MiB)
        parts = list(slot["put"]["parts"])
        sig = [p.rsplit("X-Amz-Signature=", 1)[1] for p in parts[:2]]
        parts[0] = parts[0].replace(sig[0], sig[1])  # part 1 with part 2's signature
        evil_slot = dict(slot, put=dict(slot["put"], parts=parts))
        with pytest.raises(LinkError, match="signature"):
            client.upload(evil_slot, payload)
        client.upload(slot, payload)  # the genuine slot still works
        assert link.fast_presign  # part URLs 2.. were signed by _QuerySigner: radosgw agrees
    finally:
        link.close()
    assert leftovers(rgw["s3"], rgw["bucket"]) == ([], [])


def test_expired_presigned_url_fails_clearly(rgw):
    _, payload = payload_of(1 * MiB)
    link = server_link(url(rgw), 1, {"expires": "2"})
    try:
        loc = link.publish("g", payload)
        slot = link.issue_slot("r", 64 * MiB)
        time.sleep(3.5)
        with pytest.raises(LinkError, match="expired"), S3ClientLink().open(loc, payload.size) as src:
            src.read(0, 8)
        with pytest.raises(LinkError, match="expired.*expires="):
            S3ClientLink().upload(slot, payload)
    finally:
        link.close()
    assert leftovers(rgw["s3"], rgw["bucket"]) == ([], [])


def test_wrong_secret_fails(rgw, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-0123456789")
    with pytest.raises(LinkError, match="secret key is wrong"):
        server_link(url(rgw), 1)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NOSUCHKEY00000000000")
    with pytest.raises(LinkError, match="does not accept the ServerApp's credentials"):
        server_link(url(rgw), 1)


def test_anonymous_and_missing_bucket(rgw):
    import requests

    r = requests.get(f"{rgw['endpoint']}/{rgw['bucket']}/", timeout=10)
    assert r.status_code == 403  # no credentials, no access
    with pytest.raises(LinkError, match="does not exist"):
        server_link(f"s3://ftx-missing-{uuid.uuid4().hex[:6]}?endpoint_url={rgw['endpoint']}", 1)


def test_cleanup(rgw):
    _, payload = payload_of(6 * MiB)
    link = S3ServerLink(url(rgw), 2, {"part_size": "5MiB"})
    link.publish("g", payload)
    link.issue_slot("r", 64 * MiB)
    found = S3ServerLink.cleanup(url(rgw), all_=True)
    assert len(found) == 2
    assert leftovers(rgw["s3"], rgw["bucket"]) == ([], [])
    link.http.close()
