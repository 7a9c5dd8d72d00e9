"""FDA over a real loopback Flower deployment (flower-superlink + 2 flower-supernode +
``flwr run``): fda_mod keeps each node's local model across rounds in node state.

The test app (tests/apps/fda_app) 'trains' with w <- w + (partition-id + 1), a
stateless function: only the mod's node state can make the drift grow across rounds.
With 2 nodes and dim 10 the naive estimate after t steps without a sync is 25 t^2
(node 0: 10 t^2, node 1: 40 t^2); Theta = 150 makes the server sync after step 3.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

APP = Path(__file__).parent / "apps" / "fda_app"


@pytest.mark.integration
def test_fda_mod_keeps_local_model_across_rounds_in_deployment(tmp_path):
    import psutil

    from flwr_transports.testing import LocalDeployment

    out = tmp_path / "fda-result.json"
    with LocalDeployment(n_supernodes=2, workdir=tmp_path / "deploy") as dep:
        res = dep.run(
            APP, {"result-path": str(out), "num-steps": 5, "threshold": 150.0}, timeout=400
        )
        assert res.ok, res.output[-3000:]
        leftover = dep.pids()
    assert out.is_file(), res.output[-3000:]
    data = json.loads(out.read_text())
    hist = data["history"]

    # drift accumulates across rounds (25 t^2), resets after the sync at step 3
    assert [h["estimate"] for h in hist] == pytest.approx([25.0, 100.0, 225.0, 25.0, 100.0])
    assert [h["sync"] for h in hist] == [0, 0, 1, 0, 0]
    assert hist[-1]["final_sync"] == 1
    # final model: 3 steps of mean update 1.5, sync, 2 more steps, final sync
    np.testing.assert_array_equal(np.asarray(data["final"]), np.full(10, 7.5, dtype=np.float32))

    # per node and step, the local state says the node's own model kept moving
    monitor = [r for r in data["replies"] if "fda.state" in r]
    assert len(monitor) == 10 and all(r["error"] is None for r in monitor)
    by_node: dict[int, list[float]] = {}
    for r in sorted(monitor, key=lambda r: r["call"]):
        by_node.setdefault(r["node"], []).append(r["fda.state"]["fda.sqnorm"])
    sqnorms = sorted(by_node.values())
    assert sqnorms == [
        pytest.approx([10.0, 40.0, 90.0, 10.0, 40.0]),
        pytest.approx([40.0, 160.0, 360.0, 40.0, 160.0]),
    ]
    # monitoring replies carry no arrays; the two syncs carry the full models
    assert all(r["arrays"] == [] for r in monitor)
    syncs = [r for r in data["replies"] if r.get("arrays") == ["arrays"]]
    assert len(syncs) == 4
    # bytes: every monitoring step after the first moved far less than a sync
    st = data["stats"]
    assert st["syncs"] == 2 and st["steps"] == 5
    assert st["monitor_bytes_up"] < st["sync_bytes_up"]
    # every process of the deployment is gone (the harness kills the whole tree)

    assert leftover
    for pid in leftover:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", pid
