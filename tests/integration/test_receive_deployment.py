"""Offload's receive loop in a REAL deployment (SuperLink + 2 SuperNodes on loopback,
the quickstart example, 2 rounds, a 2 MiB model: above the 1 MiB threshold, so it
travels over the link). Asserted from the trace's timestamps, not from wall time:

* over tcp:// and shm://, the loop returns before Flower's fixed pull would have: a
  reply cannot be on the SuperLink before the client's last traced event of the phase
  ended, and Flower's ``send_and_receive`` pulls only at push + 0, 3, 6, ... s, so it
  cannot return before the first of those after that moment; the loop did, in at least
  one phase of the run (it pulls right after the upload lands);
* every phase got every reply, and the loop's SuperLink pulls stay bounded;
* in-band (plain Flower) is unchanged: no receive loop, no pull counted.
"""

from __future__ import annotations

import json
import math

import pytest

from flwr_transports import trace
from flwr_transports.flower import receive as R

ROUNDS = 2
MODEL_MIB = 2.0
FLOWER_PULL_S = 3.0  # HttpGrid.send_and_receive: time.sleep(3) between pulls


@pytest.fixture(scope="module")
def runs(tmp_path_factory, quickstart_app):
    import psutil  # noqa: F401 - a dev dependency: missing is a failure

    from flwr_transports.testing import LocalDeployment

    base = tmp_path_factory.mktemp("receive")
    out = {}
    with LocalDeployment(n_supernodes=2, workdir=base / "deploy",
                         env={trace.ENV: str(base / "trace")}) as dep:
        for name, url in {"tcp": "tcp://127.0.0.1:0", "shm": "shm://",
                          "inband": "inband"}.items():
            tdir = base / "trace"
            res_path = base / f"{name}.npz"
            res = dep.run(quickstart_app, {"transport": url, "model-mib": MODEL_MIB,
                                           "num-server-rounds": ROUNDS,
                                           "result-path": str(res_path)}, timeout=300)
            assert res.ok, f"{name}: {res.status}\n{res.output[-4000:]}"
            summary = json.loads(res_path.with_suffix(".json").read_text())
            out[name] = (summary, trace.read_events(tdir))
            for p in tdir.glob("*"):
                p.unlink()
    return out


def _phases(events):
    """(receive event, last client event end) per phase of the run."""
    out = []
    for e in (x for x in events if x["ev"] == "receive"):
        client = [x["t1"] for x in events if x.get("role") == "client"
                  and x.get("round") == e.get("round") and x.get("phase") == e.get("phase")]
        out.append((e, max(client) if client else None))
    return out


@pytest.mark.integration
@pytest.mark.parametrize("name", ["tcp", "shm"])
def test_the_loop_returns_before_flowers_pull_would_have(runs, name):
    _, events = runs[name]
    phases = _phases(events)
    assert len(phases) == 2 * ROUNDS  # train + evaluate, every round
    earlier = []
    for e, ready in phases:
        assert ready is not None and e["replies"] == 2 and e["missing"] == 0, e
        push = e["t0"]
        flower = push + FLOWER_PULL_S * math.ceil(max(ready - push, 0.0) / FLOWER_PULL_S)
        earlier.append(e["t1"] < flower)
    assert any(earlier), [(round(e["t1"] - e["t0"], 2), round(r - e["t0"], 2))
                          for e, r in phases]
    # the train phases saw their uploads land and pulled right after
    assert any("landed_to_reply" in e for e, _ in phases if e["phase"] == "train")


@pytest.mark.integration
@pytest.mark.parametrize("name", ["tcp", "shm"])
def test_pulls_are_counted_and_bounded(runs, name):
    summary, events = runs[name]
    stats = summary["stats"]
    recv = [e for e in events if e["ev"] == "receive"]
    assert stats["receive_pulls"] == [e["pulls"] for e in recv]
    assert stats["pulls"] == sum(stats["receive_pulls"])
    per_window = math.ceil(R.LANDED_WINDOW / R.LANDED_WAIT) + 3
    for e in recv:  # idle: one pull per MAX_WAIT; after each landing / reply: a window
        bound = 4 + (e["t1"] - e["t0"]) / R.MAX_WAIT + 2 * e["replies"] * per_window
        assert 1 <= e["pulls"] <= bound, e


@pytest.mark.integration
def test_plain_flower_unchanged(runs):
    summary, events = runs["inband"]
    assert not [e for e in events if e["ev"] == "receive"]
    assert summary["stats"]["pulls"] == 0 and summary["stats"]["receive_pulls"] == []
    assert [c["type"] for c in summary["calls"]] == ["train", "evaluate"] * ROUNDS
