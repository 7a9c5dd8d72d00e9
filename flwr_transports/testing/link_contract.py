"""The link contract: the suite every link must pass, shipped for third-party links
(as fsspec ships ``fsspec/tests/abstract``). A pytest module: import it only from your
tests (``flwr_transports.testing`` itself does not import it, nor pytest).

One line runs it against a link registered under ``box://`` (by an entry point of the
``flwr_transports.links`` group, or ``register_link``)::

    from flwr_transports.testing.link_contract import LinkContract

    class TestBoxLink(LinkContract):
        scheme = "box"

The URL each test uses is the link's ``local_url(tmp_path)``; override the ``url``
fixture when the link needs a service (see tests/test_link_contract.py for s3 on moto).
Override :meth:`LinkContract.leftovers` to let the suite look at the link's storage
(``close()`` and ``cleanup`` must leave nothing there).

Checks: every dtype (0-d and empty arrays included) round-trips both ways; a size claim
that does not match is rejected; a location that is not the slot's (another slot, the
published model, hostile descriptors: path escapes, wrong types) is rejected on both
sides; ``ClientLink.endpoints()`` is declared for every descriptor the server hands out
(the client policy refuses a link that declares nothing) and refuses hostile ones;
``on_upload`` (optional) calls back exactly once per completed upload; the landed hooks
(``last_landed``, ``wait_landed``, ``notify_landed``) behave; ``release`` /
``discard_slot`` / ``close`` are idempotent; ``close()`` leaves nothing; after the owner
is killed with SIGKILL, the link's ``cleanup`` removes what it left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any, ClassVar

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from ..codec import decode, encode
from ..errors import RejectedInput
from ..links import LinkError, client_link, link_classes, schemes, server_link
from ..links.base import Endpoint

__all__ = ["HOSTILE_DESCRIPTORS", "LinkContract", "every_dtype_record", "same_record"]

#: seconds the suite waits for something that must happen (a callback, a wake-up)
DEADLINE_S = 30.0


def every_dtype_record(seed: int = 0) -> ArrayRecord:
    """Every dtype Flower carries, 0-d and empty arrays, a >1 MiB array, raw bytes."""
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


def HOSTILE_DESCRIPTORS(good: dict[str, Any]) -> list[Any]:
    """Descriptors a hostile peer may send in place of ``good`` (a real one)."""
    return [None, [], "x", {}, {"path": "/etc/passwd"}, {"name": "../../etc/passwd"},
            {"key": "../../x"}, {k: "/proc/self/environ" for k in good},
            {k: 12 for k in good}, {k: ["x"] * 3 for k in good}, {k: None for k in good}]


def _rejects(fn, *args) -> Exception:
    with pytest.raises(RejectedInput) as ei:
        src = fn(*args)
        src.read(0, 1)  # a lazy link may only notice on the first read
        src.close()
    return ei.value


_OWNER = textwrap.dedent("""
    import sys, time
    sys.path[:0] = {pythonpath!r}
    {setup}
    from flwr_transports.codec import encode
    from flwr_transports.links import client_link, server_link
    from flwr_transports.testing.link_contract import every_dtype_record
    up = encode(every_dtype_record())
    link = server_link({url!r}, "killed")
    link.publish("global", up)
    slot = link.issue_slot("reply", 4 * up.size)
    client_link({scheme!r}).upload(slot, up)
    link.issue_slot("unused", 4 * up.size)
    print(link.prefix, flush=True)
    time.sleep(600)
""")


class LinkContract:
    """Subclass with ``scheme = "yours"`` (a class named ``Test...``) to run the suite."""

    #: the URL scheme of the link under test (registered before the tests run)
    scheme: ClassVar[str] = ""
    #: sys.path entries the killed-owner subprocess needs to import the link
    owner_pythonpath: ClassVar[list[str]] = []
    #: Python code the killed-owner subprocess runs first (e.g. a ``register_link``)
    owner_setup: ClassVar[str] = ""

    # -- what a link author may override ------------------------------------------------

    @pytest.fixture
    def url(self, tmp_path) -> str:
        """The URL the tests use: the link's ``local_url(tmp_path)`` by default."""
        srv, _ = link_classes(self.scheme)
        u = srv.local_url(str(tmp_path))
        if u is None:
            pytest.fail(f"{self.scheme}:// has no local_url(); override the url fixture")
        return u

    def leftovers(self, url: str, prefix: str) -> list[str] | None:
        """Names of what a run with ``prefix`` still has on the link; None (default):
        the suite cannot look (e.g. the link keeps everything in the owner's memory)."""
        return None

    def cleanup_url(self, url: str) -> str:
        """The URL ``cleanup`` scans after the owner was killed."""
        return url

    # -- helpers -----------------------------------------------------------------------

    def client(self):
        return client_link(self.scheme)

    def server(self, url: str, run_id: str = "contract"):
        return server_link(url, run_id)

    # -- the contract ------------------------------------------------------------------

    def test_registered(self, url):
        assert self.scheme, "set scheme = '...' on the LinkContract subclass"
        assert url.split(":")[0] == self.scheme
        assert self.scheme in schemes()

    def test_roundtrip_every_dtype_both_ways(self, url):
        rec = every_dtype_record()
        payload = encode(rec)
        link = self.server(url)
        try:
            loc = link.publish("global", payload)
            json.dumps(loc)  # descriptors are small JSON-able dicts
            with self.client().open(loc, payload.size) as src:
                got = decode(src.read, payload.size, payload.digest)
            assert same_record(got, rec)
            slot = link.issue_slot("reply", 4 * payload.size)
            json.dumps(slot)
            reply = every_dtype_record(seed=1)
            up = encode(reply)
            rloc = self.client().upload(slot, up)
            json.dumps(rloc)
            with link.open_upload(slot, rloc, up.size) as src:
                pre = src.predecoded
                if pre is not None:
                    got, digest = pre()
                    assert digest == up.digest
                else:
                    got = decode(src.read, up.size, up.digest)
            assert same_record(got, reply)
        finally:
            link.close()

    def test_size_claim_mismatch_is_rejected(self, url):
        up = encode(every_dtype_record())
        link = self.server(url)
        try:
            loc = link.publish("global", up)
            for wrong in (up.size + 1, up.size - 1):
                _rejects(self.client().open, loc, wrong)
            slot = link.issue_slot("reply", 4 * up.size)
            rloc = self.client().upload(slot, up)
            for wrong in (up.size + 1, up.size - 1):
                _rejects(link.open_upload, slot, rloc, wrong)
        finally:
            link.close()

    def test_foreign_locations_are_rejected(self, url):
        up = encode(every_dtype_record())
        link = self.server(url)
        try:
            gloc = link.publish("global", up)
            a = link.issue_slot("a", 4 * up.size)
            b = link.issue_slot("b", 4 * up.size)
            aloc = self.client().upload(a, up)
            _rejects(link.open_upload, b, aloc, up.size)  # another node's slot
            _rejects(link.open_upload, a, gloc, up.size)  # the published model as a "reply"
            for bad in HOSTILE_DESCRIPTORS(aloc):
                _rejects(link.open_upload, a, bad, up.size)
        finally:
            link.close()

    def test_hostile_descriptors_are_refused_by_the_client(self, url):
        up = encode(every_dtype_record())
        link = self.server(url)
        try:
            gloc = link.publish("global", up)
            for bad in HOSTILE_DESCRIPTORS(gloc):
                with pytest.raises(RejectedInput):
                    self.client().endpoints(bad, upload=False)
                _rejects(self.client().open, bad, up.size)
        finally:
            link.close()

    def test_endpoints_declared_for_every_descriptor(self, url):
        """The client policy checks exactly what ``endpoints()`` declares and refuses a
        link that declares nothing (None): every descriptor the server hands out."""
        up = encode(every_dtype_record())
        link = self.server(url)
        try:
            for desc, upload in ((link.publish("global", up), False),
                                 (link.issue_slot("reply", 4 * up.size), True)):
                eps = self.client().endpoints(desc, upload=upload)
                assert eps is not None, (
                    f"{self.scheme}:// ClientLink.endpoints() declares nothing for {desc!r}")
                assert all(isinstance(e, Endpoint) for e in eps), eps
                assert all(e.kind in ("url", "hostport", "file") for e in eps), eps
        finally:
            link.close()

    def test_on_upload_calls_back_once_per_upload(self, url):
        """Optional hook: a link that returns True calls ``fn`` once per completed
        upload, with the uploaded bytes; False: ``open_upload`` reads it as usual."""
        up = encode(every_dtype_record(seed=2))
        link = self.server(url)
        try:
            calls: list[bytes] = []
            done = threading.Event()

            def fn(src):
                calls.append(src.read(0, src.size))
                done.set()

            slot = link.issue_slot("reply", 4 * up.size)
            took = link.on_upload(slot, fn)
            assert isinstance(took, bool)
            rloc = self.client().upload(slot, up)
            if took:
                assert done.wait(DEADLINE_S), "on_upload returned True but never called back"
            with link.open_upload(slot, rloc, up.size) as src:
                assert src.size == up.size
            if took:
                assert len(calls) == 1
                assert calls[0] == up.to_bytes()
            else:
                assert calls == []
        finally:
            link.close()

    def test_landed_hooks(self, url):
        up = encode(every_dtype_record())
        link = self.server(url)
        try:
            before = link.last_landed
            assert before is None or isinstance(before, float)
            # nothing lands: wait_landed returns what it had once the timeout passed
            assert link.wait_landed(before, 0.01) == before
            hooked = threading.Event()

            def landed_hook(src):
                hooked.set()

            slot = link.issue_slot("reply", 4 * up.size)
            took = link.on_upload(slot, landed_hook)  # links that watch uploads need it
            rloc = self.client().upload(slot, up)
            if took:
                assert hooked.wait(DEADLINE_S)
            with link.open_upload(slot, rloc, up.size):
                pass
            after = link.last_landed
            prop = getattr(type(link), "last_landed", None)
            if after is None and isinstance(prop, property) and prop.fset is None:
                return  # reports no landings and cannot be told: wait_landed just waits
            if after is not None:  # a link that reports landings: it moved forward
                assert before is None or after > before
                assert link.wait_landed(before, DEADLINE_S) == after
            # a waiter wakes when the next upload lands (a link that reports landings),
            # or when last_landed is set and notify_landed() called (one that does not)
            got: list[float | None] = []
            waiting = threading.Event()

            def waiter():
                waiting.set()
                got.append(link.wait_landed(after, DEADLINE_S))

            t = threading.Thread(target=waiter, daemon=True)
            t.start()
            assert waiting.wait(DEADLINE_S)
            if after is not None:
                slot2 = link.issue_slot("reply2", 4 * up.size)
                hooked.clear()
                took2 = link.on_upload(slot2, landed_hook)
                rloc2 = self.client().upload(slot2, up)
                if took2:  # (opened before it landed, a watched upload is just taken)
                    assert hooked.wait(DEADLINE_S)
                with link.open_upload(slot2, rloc2, up.size):
                    pass
            else:
                link.last_landed = time.perf_counter()
                link.notify_landed()
            t.join(DEADLINE_S)
            assert not t.is_alive(), "wait_landed did not wake on a landing"
            assert got[0] is not None and (after is None or got[0] > after)
        finally:
            link.close()

    def test_release_discard_close_are_idempotent(self, url):
        up = encode(every_dtype_record())
        link = self.server(url)
        loc = link.publish("global", up)
        link.release("global")
        link.release("global")
        link.release("never-published")
        with pytest.raises((LinkError, RejectedInput, OSError)), \
                self.client().open(loc, up.size) as src:
            src.read(0, up.size)
        slot = link.issue_slot("reply", 4 * up.size)
        self.client().upload(slot, up)
        link.discard_slot(slot)
        link.discard_slot(slot)
        link.close()
        link.close()

    def test_close_leaves_nothing(self, url):
        up = encode(every_dtype_record())
        link = self.server(url)
        loc = link.publish("global", up)
        link.publish("other", up)
        slots = [link.issue_slot(f"s{i}", 4 * up.size) for i in range(3)]
        self.client().upload(slots[0], up)
        prefix = link.prefix
        seen = self.leftovers(url, prefix)
        assert seen is None or seen, "leftovers() sees nothing of a live run"
        link.close()
        assert self.leftovers(url, prefix) in (None, [])
        with pytest.raises((LinkError, RejectedInput, OSError)), \
                self.client().open(loc, up.size) as src:
            src.read(0, up.size)

    def test_cleanup_after_the_owner_is_killed(self, url):
        code = _OWNER.format(pythonpath=list(self.owner_pythonpath), setup=self.owner_setup,
                             url=url, scheme=self.scheme)
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ},
                                start_new_session=True)
        try:
            prefix = proc.stdout.readline().strip()
            assert prefix.startswith("ftx-"), proc.stderr.read()[-3000:]
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()  # reaped: a dead owner, not a zombie
            proc.stdout.close()
            proc.stderr.close()
        srv, _ = link_classes(self.scheme)
        srv.cleanup(self.cleanup_url(url))
        assert self.leftovers(url, prefix) in (None, [])
        assert [f for f in srv.cleanup(self.cleanup_url(url), dry_run=True, all_=True)
                if prefix in f] == []
