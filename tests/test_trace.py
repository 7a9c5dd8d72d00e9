"""The opt-in timing trace (flwr_transports.trace): events written only when asked,
and the per-round critical path computed from them."""

from __future__ import annotations

import json
import os

import pytest

from flwr_transports import trace


def test_off_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(trace.ENV, raising=False)
    with trace.span("fetch", round=1) as extra:
        extra["bytes"] = 5
    trace.record("publish", 0.0, 1.0)
    assert trace.trace_dir() is None
    assert list(tmp_path.iterdir()) == []


def test_span_records_fields_and_failures(tmp_path, monkeypatch):
    d = tmp_path / "t"
    monkeypatch.setenv(trace.ENV, str(d))
    with trace.span("upload", role="client", round=2, phase="train") as extra:
        extra["bytes"] = 1234
    with pytest.raises(KeyError), trace.span("fetch", round=2, phase="train"):
        raise KeyError("boom")
    files = list(d.iterdir())
    assert [f.name for f in files] == [f"ftx-trace-{os.getpid()}.jsonl"]
    lines = [json.loads(x) for x in files[0].read_text().splitlines()]
    assert [e["ev"] for e in lines] == ["upload", "fetch"]
    up, fe = lines
    assert up["bytes"] == 1234 and up["role"] == "client" and up["pid"] == os.getpid()
    assert up["t1"] >= up["t0"] and "error" not in up
    assert fe["error"] is True


def test_read_events_skips_junk_and_sorts(tmp_path):
    (tmp_path / "ftx-trace-1.jsonl").write_text(
        '{"ev": "b", "t0": 2, "t1": 3}\nnot json\n[1, 2]\n{"ev": "x", "t0": "late"}\n')
    (tmp_path / "ftx-trace-2.jsonl").write_text('{"ev": "a", "t0": 1, "t1": 4}\n')
    (tmp_path / "other.jsonl").write_text('{"ev": "z", "t0": 0, "t1": 0}\n')
    assert [e["ev"] for e in trace.read_events(tmp_path)] == ["a", "b"]


def _ev(ev, t0, t1, r=1, phase="train", **kw):
    return {"ev": ev, "t0": t0, "t1": t1, "round": r, "phase": phase, **kw}


def test_breakdown_of_one_round():
    mib = 2**20
    events = [
        _ev("publish", 100.0, 100.5, bytes=10 * mib),
        _ev("fetch", 103.5, 104.5, bytes=10 * mib, pid=1),   # 1 s: 10 MiB/s
        _ev("fetch", 103.7, 105.7, bytes=10 * mib, pid=2),   # 2 s: the slowest, 5 MiB/s
        _ev("app", 104.5, 106.0, pid=1), _ev("app", 105.7, 108.7, pid=2),
        _ev("upload", 106.0, 107.0, pid=1), _ev("upload", 108.7, 110.2, pid=2),
        _ev("aggregate", 113.2, 114.0), _ev("resolve", 113.3, 113.9),
        _ev("fetch", 200.0, 201.0, phase="evaluate"),  # another phase: not counted
        _ev("publish", 0.0, 1.0, r=None),  # no round: not counted
    ]
    (row,) = trace.breakdown(events)
    want = {"round": 1, "publish": 0.5, "to_clients": 3.0, "fetch": 2.2, "fetch_max": 2.0,
            "fetch_mib_s": 5.0, "app": 3.0, "upload": 1.5, "to_server": 3.0,
            "resolve": 0.6, "aggregate": 0.8, "total": 14.0}
    assert row.keys() == want.keys()
    for k, v in want.items():
        assert row[k] == pytest.approx(v), k
    (ev_row,) = trace.breakdown(events, phase="evaluate")
    assert ev_row == {"round": 1, "fetch": 1.0, "fetch_max": 1.0}
    table = trace.format_breakdown([row])
    assert "to_clients" in table.splitlines()[0] and "14.00" in table


def test_breakdown_without_payload_events():
    """An in-band round: only the app and the aggregation are seen."""
    (row,) = trace.breakdown([_ev("app", 1.0, 2.0, r=3), _ev("aggregate", 5.0, 5.5, r=3)])
    assert row == {"round": 3, "app": 1.0, "aggregate": 0.5}


def test_message_fields():
    from flwr.app import ConfigRecord, Message, RecordDict

    from flwr_transports.testing import set_task_identity

    set_task_identity()
    # Flower's strategies put the round in the config (group ids may be empty)
    msg = Message(RecordDict({"config": ConfigRecord({"server-round": 4, "lr": 0.1})}),
                  dst_node_id=1, message_type="train.custom", group_id="")
    assert trace.message_fields(msg) == {"phase": "train", "round": 4}
    msg = Message(RecordDict(), dst_node_id=1, message_type="evaluate", group_id="7")
    assert trace.message_fields(msg) == {"phase": "evaluate", "round": 7}
    msg = Message(RecordDict({"c": ConfigRecord({"server-round": "x"})}), dst_node_id=1,
                  message_type="query", group_id="")
    assert trace.message_fields(msg) == {"phase": "query"}
    assert trace.message_fields(object()) == {}


def test_breakdown_of_the_receive_loop_and_the_nodes_start():
    """offload's receive loop (push -> replies, pulls, landing -> reply) and, per
    ClientApp process, when Flower started it (the SuperNode's and SuperExec's polls)
    and how long it took to reach its first payload event."""
    events = [
        _ev("publish", 100.0, 100.1),
        _ev("receive", 100.2, 106.0, pulls=9, landed_to_reply=0.4),
        _ev("fetch", 104.0, 104.1, pid=1, proc_t0=102.5),  # node 1: 2.3 s, then 1.5 s
        _ev("app", 104.1, 105.0, pid=1, proc_t0=102.5),
        _ev("fetch", 103.0, 103.1, pid=2, proc_t0=101.2),  # node 2: 1.0 s, then 1.8 s
        _ev("upload", 105.0, 105.6, pid=1, proc_t0=102.5),
        _ev("aggregate", 106.0, 106.1),
    ]
    (row,) = trace.breakdown(events)
    assert row["receive"] == pytest.approx(5.8) and row["pulls"] == 9
    assert row["landed_to_reply"] == pytest.approx(0.4)
    assert row["node_wait"] == pytest.approx(2.3)  # the slowest node's process start
    assert row["spawn"] == pytest.approx(1.8)
    assert "node_wait" in trace.format_breakdown([row]).splitlines()[0]


def test_client_events_carry_their_process_start(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv(trace.ENV, str(tmp_path))
    trace.record("app", 1.0, 2.0, role="client")
    trace.record("publish", 1.0, 2.0, role="server")
    app, pub = trace.read_events(tmp_path)
    if app["proc_t0"] is None:
        pytest.skip("no /proc here")
    assert time.time() - 3600 < app["proc_t0"] <= time.time()  # this test process
    assert "proc_t0" not in pub
