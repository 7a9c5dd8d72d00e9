"""The link contract: one suite every link must pass (the way fsspec keeps
``tests/abstract`` for every filesystem).

Run against every link that can run here: shm://, file://, tcp://, s3:// on moto and
on Ceph radosgw (real SigV4 auth), rdma:// when its engine is installed, plus a tiny
third-party link registered with ``register_link`` and the same link installed
through the ``flwr_transports.links`` entry-point group. A new link gets all of it by
adding one ``Case`` to ``CASES`` (or, for a third-party package, by running this file
against its scheme).

Checks: round trip of every dtype (0-d and empty arrays included) both ways; a size
claim that does not match is rejected; a location that is not the slot's (another
slot, the published model, garbage, path escapes) is rejected; ``release`` /
``discard_slot`` / ``close`` are idempotent; ``close()`` leaves nothing; after the
owner is killed with SIGKILL, the link's ``cleanup`` removes what it left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from flwr_transports.codec import decode, encode
from flwr_transports.errors import RejectedInput
from flwr_transports.links import (
    LinkError,
    client_link,
    link_classes,
    register_link,
    reload_entry_points,
    schemes,
    server_link,
    unregister_link,
)

HERE = Path(__file__).resolve().parent
PLUGINS = HERE / "plugins"
MOTO_CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
              "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


# -- the payloads ---------------------------------------------------------------------------

def every_dtype_record(seed: int = 0) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for dt in ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8",
               "uint16", "uint32", "uint64", "complex64", "complex128"):
        arrays[dt] = (rng.standard_normal((3, 5)) * 100).astype(dt)
    arrays["bool"] = rng.standard_normal(7) > 0
    arrays[">f4 big-endian"] = rng.standard_normal(4).astype(">f4")
    arrays["0-d"] = np.array(3.25, dtype="float32")
    arrays["empty"] = np.zeros((0,), dtype="float32")
    arrays["empty 2-d"] = np.zeros((3, 0), dtype="int64")
    arrays["big"] = rng.standard_normal(300_000).astype("float32")  # > 1 MiB: several chunks
    arrays["fortran"] = np.asfortranarray(rng.standard_normal((4, 6)))
    rec = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    rec["raw bytes"] = Array(dtype="uint8", shape=(5,), stype="raw", data=b"\x00\x01ftx")
    return rec


def same_record(a: ArrayRecord, b: ArrayRecord) -> bool:
    if list(a.keys()) != list(b.keys()):
        return False
    return all((x.dtype, tuple(x.shape), x.stype, bytes(x.data))
               == (y.dtype, tuple(y.shape), y.stype, bytes(y.data))
               for x, y in zip(a.values(), b.values(), strict=True))


# -- the links ------------------------------------------------------------------------------

@dataclass
class Case:
    """How to run one link here: its URL, what it leaves behind, the env it needs."""

    id: str
    url: Callable[[pytest.FixtureRequest, Path], str]
    #: names of what a run with this prefix still has on the link (after close/cleanup)
    leftovers: Callable[[pytest.FixtureRequest, str, str], list[str]]
    #: URL (or None: same as url) that ``cleanup`` scans after the owner was killed
    cleanup_url: Callable[[str], str] = lambda url: url
    env: Callable[[pytest.FixtureRequest], dict[str, str]] = lambda req: {}
    setup: Callable[[], None] = lambda: None
    #: sys.path entries the killed owner process needs (third-party links)
    pythonpath: list[str] = field(default_factory=list)
    marks: tuple = ()


def _names_in(root: str, prefix: str) -> list[str]:
    try:
        return sorted(e for e in os.listdir(root) if prefix in e)
    except OSError:
        return []


def _s3_leftovers(req, url, prefix):
    fx = req.getfixturevalue(req.param_s3_fixture)
    s3, bucket = fx["s3"], fx["bucket"]
    objs = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    ups = [u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    return [k for k in objs + ups if prefix in k]


def _register_mem():
    sys.path.insert(0, str(PLUGINS))
    from ftx_memlink import MemClientLink, MemServerLink

    register_link("mem", MemServerLink, MemClientLink, replace=True)


def _entry_point_dir() -> Path:
    """A real installed-distribution layout (a *.dist-info with entry_points.txt) on
    sys.path: what ``pip install`` of a plugin package produces."""
    d = Path(os.environ.get("TMPDIR", "/tmp")) / f"ftx-ep-{os.getpid()}"
    info = d / "ftx_memlink_plugin-0.1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ftx-memlink-plugin\n"
                                   "Version: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[flwr_transports.links]\nmemep = ftx_memlink:EpMemServerLink\n")
    return d


def _register_entry_point():
    d = _entry_point_dir()
    for p in (str(PLUGINS), str(d)):
        if p not in sys.path:
            sys.path.insert(0, p)
    reload_entry_points()


def _mem_leftovers(req, url, prefix):
    from ftx_memlink import STORE

    return [k for k in STORE if prefix in k]


def _moto_env(req):
    return {**MOTO_CREDS}


def _rgw_env(req):
    st = req.getfixturevalue("rgw_server")
    return {"AWS_ACCESS_KEY_ID": st["access_key"], "AWS_SECRET_ACCESS_KEY": st["secret_key"],
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def _rdma_available() -> str | None:
    """None when rdma:// can run here: its classes import AND its engine (NIXL) loads."""
    try:
        link_classes("rdma")
        from flwr_transports.links.rdma import load_nixl

        load_nixl()
    except LinkError as exc:
        return str(exc)
    return None


CASES = [
    Case("shm", lambda req, tmp: "shm://",
         lambda req, url, prefix: _names_in("/dev/shm", prefix)),
    Case("file", lambda req, tmp: f"file://{tmp}",
         lambda req, url, prefix: _names_in(url[len("file://"):].split("?")[0], prefix)),
    # tcp:// keeps everything in the ServerApp's memory: nothing can outlive the process;
    # "close leaves nothing" is checked by the port refusing connections afterwards
    Case("tcp", lambda req, tmp: "tcp://127.0.0.1:0", lambda req, url, prefix: []),
    Case("s3-moto",
         lambda req, tmp: (f"s3://{req.getfixturevalue('moto_bucket')['bucket']}/"
                           f"c{uuid.uuid4().hex[:6]}?endpoint_url="
                           f"{req.getfixturevalue('moto_bucket')['endpoint']}"),
         _s3_leftovers, cleanup_url=lambda url: url + "&older_than=0", env=_moto_env),
    Case("s3-radosgw",
         lambda req, tmp: (f"s3://{req.getfixturevalue('rgw_server')['bucket']}/"
                           f"c{uuid.uuid4().hex[:6]}?endpoint_url="
                           f"{req.getfixturevalue('rgw_server')['endpoint']}"),
         _s3_leftovers, cleanup_url=lambda url: url + "&older_than=0", env=_rgw_env,
         marks=(pytest.mark.radosgw,)),
    Case("rdma", lambda req, tmp: "rdma://127.0.0.1:0", lambda req, url, prefix: [],
         marks=(pytest.mark.skipif(_rdma_available() is not None,
                                   reason=f"rdma engine not installed: {_rdma_available()}"),)),
    Case("mem (register_link)", lambda req, tmp: "mem://", _mem_leftovers, setup=_register_mem,
         pythonpath=[str(PLUGINS)]),
    Case("memep (entry point)", lambda req, tmp: "memep://", _mem_leftovers,
         setup=_register_entry_point, pythonpath=[str(PLUGINS), str(_entry_point_dir())]),
]


@pytest.fixture(scope="module")
def moto_bucket():
    pytest.importorskip("moto", reason="moto[server] is a test dependency")
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
    yield {"endpoint": endpoint, "s3": s3, "bucket": bucket}
    srv.stop()


@pytest.fixture(params=[pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def case(request, tmp_path, monkeypatch):
    c: Case = request.param
    c.setup()
    for k, v in c.env(request).items():
        monkeypatch.setenv(k, v)
    request.param_s3_fixture = "rgw_server" if "radosgw" in c.id else "moto_bucket"
    url = c.url(request, tmp_path)
    yield c, url, request
    if c.id.startswith("mem"):
        unregister_link(url.split(":")[0])


def _leftovers(c: Case, req, url: str, prefix: str) -> list[str]:
    return c.leftovers(req, url, prefix)


def _rejects(fn, *args) -> Exception:
    with pytest.raises(RejectedInput) as ei:
        src = fn(*args)
        src.read(0, 1)  # a lazy link may only notice on the first read
        src.close()
    return ei.value


# -- the contract ---------------------------------------------------------------------------

def test_registered(case):
    c, url, _ = case
    assert url.split(":")[0] in schemes()


def test_roundtrip_every_dtype_both_ways(case):
    c, url, req = case
    scheme = url.split(":")[0]
    rec = every_dtype_record()
    payload = encode(rec)
    link = server_link(url, "contract")
    try:
        loc = link.publish("global", payload)
        json.dumps(loc)  # descriptors are small JSON-able dicts
        with client_link(scheme).open(loc, payload.size) as src:
            got = decode(src.read, payload.size, payload.digest)
        assert same_record(got, rec)
        slot = link.issue_slot("reply", 4 * payload.size)
        reply = every_dtype_record(seed=1)
        up = encode(reply)
        rloc = client_link(scheme).upload(slot, up)
        with link.open_upload(slot, rloc, up.size) as src:
            pre = getattr(src, "predecoded", None)
            if pre is not None:
                got, digest = pre()
                assert digest == up.digest
            else:
                got = decode(src.read, up.size, up.digest)
        assert same_record(got, reply)
    finally:
        link.close()


def test_size_claim_mismatch_is_rejected(case):
    c, url, req = case
    scheme = url.split(":")[0]
    up = encode(every_dtype_record())
    link = server_link(url, "contract")
    try:
        loc = link.publish("global", up)
        for wrong in (up.size + 1, up.size - 1):
            _rejects(client_link(scheme).open, loc, wrong)
        slot = link.issue_slot("reply", 4 * up.size)
        rloc = client_link(scheme).upload(slot, up)
        for wrong in (up.size + 1, up.size - 1):
            _rejects(link.open_upload, slot, rloc, wrong)
        # (the cap on a reply's size is the ticket's, checked by the wrapper before any
        # open_upload: tests/test_offload.py)
    finally:
        link.close()


def test_foreign_locations_are_rejected(case):
    c, url, req = case
    scheme = url.split(":")[0]
    up = encode(every_dtype_record())
    link = server_link(url, "contract")
    try:
        gloc = link.publish("global", up)
        a = link.issue_slot("a", 4 * up.size)
        b = link.issue_slot("b", 4 * up.size)
        aloc = client_link(scheme).upload(a, up)
        _rejects(link.open_upload, b, aloc, up.size)  # another node's slot
        _rejects(link.open_upload, a, gloc, up.size)  # the published model as a "reply"
        for bad in ({}, {"path": "/etc/passwd"}, {"name": "../../etc/passwd"},
                    {"key": "../../x"}, {k: "/proc/self/environ" for k in aloc},
                    {k: 12 for k in aloc}, {k: ["x"] * 3 for k in aloc}):
            _rejects(link.open_upload, a, bad, up.size)
    finally:
        link.close()


def test_release_discard_close_are_idempotent(case):
    c, url, req = case
    scheme = url.split(":")[0]
    up = encode(every_dtype_record())
    link = server_link(url, "contract")
    loc = link.publish("global", up)
    link.release("global")
    link.release("global")
    link.release("never-published")
    with pytest.raises((LinkError, RejectedInput, OSError)):
        with client_link(scheme).open(loc, up.size) as src:
            src.read(0, up.size)
    slot = link.issue_slot("reply", 4 * up.size)
    client_link(scheme).upload(slot, up)
    link.discard_slot(slot)
    link.discard_slot(slot)
    link.close()
    link.close()


def test_close_leaves_nothing(case):
    c, url, req = case
    scheme = url.split(":")[0]
    up = encode(every_dtype_record())
    link = server_link(url, "contract")
    loc = link.publish("global", up)
    link.publish("other", up)
    slots = [link.issue_slot(f"s{i}", 4 * up.size) for i in range(3)]
    client_link(scheme).upload(slots[0], up)
    prefix = link.prefix
    assert _leftovers(c, req, url, prefix) or scheme in ("tcp", "rdma")
    link.close()
    assert _leftovers(c, req, url, prefix) == []
    with pytest.raises((LinkError, RejectedInput, OSError)):
        with client_link(scheme).open(loc, up.size) as src:
            src.read(0, up.size)


OWNER = textwrap.dedent("""
    import sys, time
    sys.path[:0] = {pythonpath!r}
    {setup}
    from flwr_transports.codec import encode
    from flwr_transports.links import client_link, server_link
    sys.path.insert(0, {tests!r})
    from test_link_contract import every_dtype_record
    up = encode(every_dtype_record())
    link = server_link({url!r}, "killed")
    link.publish("global", up)
    slot = link.issue_slot("reply", 4 * up.size)
    client_link({scheme!r}).upload(slot, up)
    link.issue_slot("unused", 4 * up.size)
    print(link.prefix, flush=True)
    time.sleep(600)
""")


def test_cleanup_after_the_owner_is_killed(case):
    c, url, req = case
    scheme = url.split(":")[0]
    setup = {"mem": "from flwr_transports.links import register_link\n"
                    "from ftx_memlink import MemServerLink\n"
                    "register_link('mem', MemServerLink)",
             "memep": ""}.get(scheme, "")
    code = OWNER.format(pythonpath=c.pythonpath, setup=setup, tests=str(HERE), url=url,
                        scheme=scheme)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ},
                            start_new_session=True)
    try:
        prefix = proc.stdout.readline().strip()
        assert prefix.startswith("ftx-"), proc.stderr.read()[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()  # reaped: a dead owner, not a zombie (the zombie case: test_hostile)
    time.sleep(0.1)
    srv, _ = link_classes(scheme)
    srv.cleanup(c.cleanup_url(url))
    assert _leftovers(c, req, url, prefix) == []
    assert [f for f in srv.cleanup(c.cleanup_url(url), dry_run=True, all_=True)
            if prefix in f] == []
