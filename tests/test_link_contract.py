"""The shipped link contract (flwr_transports.testing.link_contract) run against every
built-in link that can run here: shm://, file://, tcp://, s3:// on moto and on Ceph
radosgw (real SigV4 auth), rdma:// when its engine is installed, plus the in-memory
reference link registered with ``register_link`` and the same link installed through
the ``flwr_transports.links`` entry-point group (a generated *.dist-info in tmp).

A new built-in link gets all of it with one class here; a third-party link with one
class in its own tests (docs/links/writing-a-link.md, tested by tests/test_writing_a_link.py).
"""

from __future__ import annotations

import os
import sys
import uuid

import pytest

from flwr_transports.links import (
    LinkError,
    link_classes,
    register_link,
    reload_entry_points,
    unregister_link,
)
from flwr_transports.testing import memlink
from flwr_transports.testing.link_contract import LinkContract

MOTO_CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
              "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def _names_in(root: str, prefix: str) -> list[str]:
    try:
        return sorted(e for e in os.listdir(root) if prefix in e)
    except OSError:
        return []


def _rdma_unavailable() -> str | None:
    """None when rdma:// can run here: its classes import AND its engine (NIXL) loads."""
    try:
        link_classes("rdma")
        from flwr_transports.links.rdma import load_nixl

        load_nixl()
    except LinkError as exc:
        return str(exc)
    return None


class TestShm(LinkContract):
    scheme = "shm"

    def leftovers(self, url, prefix):
        return _names_in("/dev/shm", prefix)


class TestFile(LinkContract):
    scheme = "file"

    def leftovers(self, url, prefix):
        return _names_in(url[len("file://"):].split("?")[0], prefix)


class TestTcp(LinkContract):
    """Everything lives in the ServerApp's memory: nothing can outlive the process."""

    scheme = "tcp"


@pytest.mark.skipif(_rdma_unavailable() is not None,
                    reason=f"rdma engine not installed: {_rdma_unavailable()}")
class TestRdma(LinkContract):
    scheme = "rdma"


class _S3(LinkContract):
    scheme = "s3"
    server_fixture = ""

    @pytest.fixture
    def url(self, request, monkeypatch):
        fx = request.getfixturevalue(self.server_fixture)
        for k, v in fx["env"].items():
            monkeypatch.setenv(k, v)
        self.s3, self.bucket = fx["s3"], fx["bucket"]
        return f"s3://{self.bucket}/c{uuid.uuid4().hex[:6]}?endpoint_url={fx['endpoint']}"

    def leftovers(self, url, prefix):
        objs = [o["Key"] for o in
                self.s3.list_objects_v2(Bucket=self.bucket).get("Contents", [])]
        ups = [u["Key"] for u in
               self.s3.list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])]
        return [k for k in objs + ups if prefix in k]

    def cleanup_url(self, url):
        return url + "&older_than=0"


@pytest.fixture(scope="module")
def moto_bucket():
    import boto3
    from moto.server import ThreadedMotoServer

    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    bucket = f"ftx-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    yield {"endpoint": endpoint, "s3": s3, "bucket": bucket, "env": MOTO_CREDS}
    srv.stop()


@pytest.fixture(scope="module")
def rgw_bucket(rgw_server):
    env = {"AWS_ACCESS_KEY_ID": rgw_server["access_key"],
           "AWS_SECRET_ACCESS_KEY": rgw_server["secret_key"],
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    return {**rgw_server, "env": env}


class TestS3Moto(_S3):
    server_fixture = "moto_bucket"


class TestS3MotoSegmented(_S3):
    """Reply slots as segments, each its own multipart upload (``segment=``)."""

    server_fixture = "moto_bucket"

    @pytest.fixture
    def url(self, request, monkeypatch):
        fx = request.getfixturevalue(self.server_fixture)
        for k, v in fx["env"].items():
            monkeypatch.setenv(k, v)
        self.s3, self.bucket = fx["s3"], fx["bucket"]
        return (f"s3://{self.bucket}/c{uuid.uuid4().hex[:6]}?endpoint_url={fx['endpoint']}"
                "&part_size=5MiB&segment=5MiB")


@pytest.mark.radosgw
class TestS3Radosgw(_S3):
    server_fixture = "rgw_bucket"


class _Mem(LinkContract):
    def leftovers(self, url, prefix):
        return [k for k in memlink.STORE if prefix in k]


class TestMemRegisterLink(_Mem):
    """The in-memory reference link through ``register_link``."""

    scheme = "mem"
    owner_setup = ("from flwr_transports.links import register_link\n"
                   "from flwr_transports.testing.memlink import MemServerLink\n"
                   "register_link('mem', MemServerLink)")

    @pytest.fixture(autouse=True)
    def _registered(self):
        register_link("mem", memlink.MemServerLink, memlink.MemClientLink, replace=True)
        yield
        unregister_link("mem")


@pytest.fixture(scope="module")
def entry_point_dir(tmp_path_factory):
    """A real installed-distribution layout (a *.dist-info with entry_points.txt) on
    sys.path: what ``pip install`` of a plugin package produces. Removed afterwards."""
    d = tmp_path_factory.mktemp("ftx-ep")
    info = d / "ftx_memlink_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ftx-memlink-plugin\n"
                                   "Version: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[flwr_transports.links]\nmemep = flwr_transports.testing.memlink:EpMemServerLink\n")
    sys.path.insert(0, str(d))
    reload_entry_points()
    yield d
    sys.path.remove(str(d))
    unregister_link("memep")
    reload_entry_points()


class TestMemEntryPoint(_Mem):
    """The same link installed through the ``flwr_transports.links`` entry point."""

    scheme = "memep"

    @pytest.fixture(autouse=True)
    def _installed(self, entry_point_dir):
        type(self).owner_pythonpath = [str(entry_point_dir)]
