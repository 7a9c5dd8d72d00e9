"""The client-side policy (issue 15): what a server's message may make a client touch.

A hostile or compromised server writes references and tickets by hand here; the
client's PayloadMod must refuse them BEFORE its link opens anything, with an error
naming the setting to change. Real links, a real ClientApp through the in-process
grid for the end-to-end cases.
"""

from __future__ import annotations

import http.server
import os
import threading

import numpy as np
import pytest
from apps_inproc import _evaluate, _train, initial_arrays
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from inproc import InProcessGrid

from flwr_transports import offload, payload_mod
from flwr_transports.codec import encode
from flwr_transports.errors import ConfigError, RejectedInput
from flwr_transports.flower.mod import PayloadMod, resolve_message
from flwr_transports.policy import ClientPolicy, PolicyError
from flwr_transports.refs import TICKET_KEY, Reference, Ticket

DIGEST = "sha256t:" + "0" * 64
TOKEN = "ab" * 32


def _msg(ref: Reference | None = None, ticket: Ticket | None = None) -> Message:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    content = RecordDict()
    if ref is not None:
        content["arrays"] = ref.to_record()
    if ticket is not None:
        content[TICKET_KEY] = ticket.to_record()
    return Message(content, dst_node_id=5, message_type="train", group_id="")


def _tcp(host: str, port: int = 9000) -> Reference:
    return Reference("tcp", {"host": host, "port": port, "id": "g.ftx-1-1-a.r1", "token": TOKEN},
                     size=100, digest=DIGEST)


def _s3(url: str) -> Reference:
    return Reference("s3", {"get": url, "stored": 100, "range": 1 << 20}, size=100,
                     digest=DIGEST)


def _refused(ref_or_msg, policy: ClientPolicy, *needles: str) -> str:
    msg = ref_or_msg if isinstance(ref_or_msg, Message) else _msg(ref_or_msg)
    with pytest.raises(PolicyError) as exc:
        resolve_message(msg, policy)
    text = str(exc.value)
    for n in needles:
        assert n in text, text
    assert isinstance(exc.value, RejectedInput)
    return text


DEFAULT = ClientPolicy.build(environ={})


@pytest.mark.parametrize("ref", [
    _s3("http://169.254.169.254/latest/meta-data/iam"),
    _s3("http://[fd00:ec2::254]/latest/meta-data"),
    _s3("http://[::ffff:169.254.169.254]/x"),
    _tcp("169.254.169.254"),
    _tcp("fe80::1"),
], ids=["s3-imds", "s3-imds-v6", "s3-mapped-v4", "tcp-imds", "tcp-fe80"])
def test_link_local_and_metadata_refused_by_default(ref):
    _refused(ref, DEFAULT, "link-local", "allow_link_local", "FLWR_TRANSPORTS_ALLOW_LINK_LOCAL")


def test_hosts_ports_schemes_and_size_name_their_setting():
    p = ClientPolicy.build(hosts=["store.example.org", "10.1.0.0/16"], environ={})
    _refused(_tcp("127.0.0.1"), p, "not among the hosts", "hosts=", "ALLOWED_HOSTS")
    _refused(_s3("https://evil.example.net/b/k?X-Amz-Signature=1"), p, "hosts")
    p = ClientPolicy.build(ports="9100-9200", environ={})
    _refused(_tcp("127.0.0.1", 9000), p, "port 9000", "ports=", "ALLOWED_PORTS")
    p = ClientPolicy.build(schemes=["s3"], environ={})
    _refused(Reference("shm", {"name": "ftx-1-x"}, 10, DIGEST), p, "shm://", "schemes=")
    p = ClientPolicy.build(max_payload="1KiB", environ={})
    _refused(Reference("shm", {"name": "ftx-1-x"}, 4096, DIGEST), p, "4096 bytes",
             "max_payload", "FLWR_TRANSPORTS_MAX_PAYLOAD")
    # allowed explicitly: a link-local address listed by the silo is fine
    p = ClientPolicy.build(hosts=["169.254.10.1"], environ={})
    assert p.check_host("x", "169.254.10.1", 80) == ["169.254.10.1"]
    assert p._host_listed("a.b.example.org", []) is False
    p = ClientPolicy.build(hosts=["*.example.org"], environ={})
    assert p._host_listed("a.b.example.org", [])


def test_file_locations_outside_allowed_roots_refused(tmp_path):
    ref = Reference("file", {"path": "/etc/cron.d/ftx-1-1-aaaa-r1"}, 10, DIGEST)
    _refused(ref, DEFAULT, "system directory", "file_roots", "FLWR_TRANSPORTS_FILE_ROOTS")
    root = tmp_path / "ok"
    root.mkdir()
    p = ClientPolicy.build(file_roots=[str(root)], environ={})
    other = Reference("file", {"path": str(tmp_path / "ftx-1-1-a-r1")}, 10, DIGEST)
    _refused(other, p, "not under the file roots", "file_roots")
    # a symlinked directory that points outside the roots does not get in
    (root / "sneaky").symlink_to("/etc")
    _refused(Reference("file", {"path": str(root / "sneaky" / "ftx-1-x")}, 10, DIGEST), p,
             "/etc")


def test_ticket_slots_are_checked_before_anything_is_written(tmp_path):
    """A ticket whose upload slot points into a system directory fails the message
    at once (nothing is written there, the user's function does not run)."""
    ticket = Ticket(id="t", scheme="file", run=1, round=1, node=5, msg_type="train",
                    max_size=1 << 20, threshold=10,
                    slots=[{"path": "/etc/ftx-1-1-aaaa-r1-train-n5-s0", "mode": "600"}])
    ran = []
    with pytest.raises(PolicyError, match="system directory"):
        payload_mod(_msg(ticket=ticket), Context(1, 5, {}, RecordDict(), {}),
                    lambda m, c: ran.append(1))
    assert not ran and not os.path.exists("/etc/ftx-1-1-aaaa-r1-train-n5-s0")


def test_env_settings_apply_to_the_default_instance(monkeypatch):
    monkeypatch.setenv("FLWR_TRANSPORTS_ALLOWED_SCHEMES", "s3,file")
    with pytest.raises(PolicyError, match="does not allow tcp://"):
        resolve_message(_msg(_tcp("127.0.0.1")), payload_mod.policy())
    monkeypatch.setenv("FLWR_TRANSPORTS_MAX_PAYLOAD", "1MiB")
    assert payload_mod.policy().max_payload == 1 << 20
    # settings given to an instance win over the environment
    assert PayloadMod(schemes=["tcp"]).policy().schemes == frozenset({"tcp"})


def test_invalid_settings_fail_fast():
    with pytest.raises(ConfigError, match="port"):
        PayloadMod(ports=["70000"])
    with pytest.raises(ConfigError, match="absolute"):
        PayloadMod(file_roots=["relative/dir"])
    with pytest.raises(ConfigError, match="max_payload"):
        PayloadMod(max_payload="lots")


def _app(mod) -> ClientApp:
    app = ClientApp(mods=[mod])
    app.train()(_train)
    app.evaluate()(_evaluate)
    return app


def test_configured_instance_in_a_clientapp_allows_and_refuses():
    """PayloadMod(...) as the mod of a real ClientApp over a real tcp:// link: allowed
    hosts work end to end (uploads too: the host pinned to the checked address is
    reported back under the name the server issued); a policy that excludes the
    server's host fails every message with the setting's name."""
    ok = offload(FedAvg(fraction_evaluate=0.0), transport="tcp://localhost:0")
    res = ok.start(InProcessGrid(_app(PayloadMod(hosts=["localhost", "127.0.0.1", "::1"],
                                                 schemes=["tcp"]))),
                   initial_arrays(), num_rounds=1)
    assert ok.stats["replies_rejected"] == 0 and ok.stats["link_bytes_received"] > 1_000_000
    assert res.arrays is not None
    bad = offload(FedAvg(fraction_evaluate=0.0), transport="tcp://127.0.0.1:0")
    replies = []
    orig = bad.inner.aggregate_train
    bad.inner.aggregate_train = lambda r, reps: (replies.extend(reps), orig(r, reps))[1]
    bad.start(InProcessGrid(_app(PayloadMod(hosts=["10.0.0.0/8"]))), initial_arrays(),
              num_rounds=1)
    assert replies and all(r.has_error() for r in replies)
    assert all("FLWR_TRANSPORTS_ALLOWED_HOSTS" in r.error.reason for r in replies)


def test_payload_mod_default_instance_runs_unchanged(tmp_path):
    s = offload(FedAvg(fraction_evaluate=0.0), transport=f"file://{tmp_path}")
    res = s.start(InProcessGrid(_app(payload_mod)), initial_arrays(), num_rounds=1)
    assert s.stats["replies_rejected"] == 0
    want = [(a + 0.25 * 10 / 30 + 0.5 * 20 / 30) for a in initial_arrays().to_numpy_ndarrays()]
    for got, w in zip(res.arrays.to_numpy_ndarrays()[:2], want[:2]):
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)


def test_s3_redirects_are_not_followed():
    """A presigned URL answered by a redirect (to what would be a metadata service)
    fails with a clear error, and the redirect target is never contacted."""
    hits = {"target": 0}

    class Target(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits["target"] += 1
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a):
            pass

    target = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Target)
    tport = target.server_address[1]

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(307)
            self.send_header("Location", f"http://127.0.0.1:{tport}/latest/meta-data")
            self.end_headers()

        def log_message(self, *a):
            pass

    red = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threads = [threading.Thread(target=srv.serve_forever, daemon=True) for srv in (target, red)]
    for t in threads:
        t.start()
    try:
        payload = encode(ArrayRecord([np.zeros(10, dtype=np.float32)]))
        ref = Reference("s3", {"get": f"http://127.0.0.1:{red.server_address[1]}/b/k",
                               "stored": payload.size, "range": 1 << 20},
                        size=payload.size, digest=payload.digest)
        with pytest.raises(Exception, match="redirect") as exc:
            resolve_message(_msg(ref), DEFAULT)
        assert "never follows redirects" in str(exc.value)
        assert hits["target"] == 0
    finally:
        for srv in (target, red):
            srv.shutdown()
            srv.server_close()
