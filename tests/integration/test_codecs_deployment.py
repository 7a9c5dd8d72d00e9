"""Payload codecs in a REAL local Flower deployment (issue 25).

One ``flower-superlink`` + 2 ``flower-supernode`` processes on 127.0.0.1 and one
``flwr run`` of examples/quickstart-offload (2 rounds, ~8 MiB float32 model, clients
add 0.001 x (partition + 1) to every value) per configuration: ``shm://`` raw, then
``codec=delta`` and ``codec=q8`` over ``tcp://`` (delta aggregated by the inner FedAvg;
q8 by streaming aggregation, which folds the decoded uploads as they land). ``delta``
codes its windows with ``lossless``'s coder, so ``codec=lossless`` runs in process only
(tests/test_codecs.py: over shm://, file:// and tcp://, every strategy of the matrix):
one deployment run less in CI. The clients are configured with
nothing: the codec comes in the ticket.

Checked: delta gives a final model bit-identical to raw; q8 (lossy) is
within float rounding of it (every update of a block is the same value here); the
links carried fewer bytes (the wrapper's stats, which count bytes on the wire); no
reply was rejected; nothing is left in /dev/shm. The SuperNodes' kept-payload cache
and the trace point at the test's directory: with delta/q8 the clients' evaluate
phases fetched downlink deltas (decoded against the model kept from training), the
second train round read its model from the cache (its final model is the raw run's,
bit for bit), and no kept payload is left.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

RUNS = {
    "shm-raw": "shm://?aggregation=inner",
    "tcp-delta": "tcp://127.0.0.1:0?codec=delta&aggregation=inner",
    # streaming aggregation (auto) folds the decoded q8 uploads as they land
    "tcp-q8": "tcp://127.0.0.1:0?codec=q8",
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, quickstart_app, ftx_names):
    import psutil  # noqa: F401 - a dev dependency: missing is a failure

    from flwr_transports.testing import LocalDeployment

    base = tmp_path_factory.mktemp("codecs")
    out = {}
    pids: set[int] = set()
    env = {"FLWR_TRANSPORTS_CACHE": str(base / "cache"),  # the clients' kept payloads
           "FLWR_TRANSPORTS_TRACE": str(base / "trace")}  # what each client fetched
    with LocalDeployment(n_supernodes=2, workdir=base / "deploy", env=env) as dep:
        pids.update(dep.pids())
        for name, url in RUNS.items():
            path = base / f"final-{name}.npz"
            res = dep.run(quickstart_app, {"transport": url, "model-mib": 8.0,
                                           "num-server-rounds": 2,
                                           "result-path": str(path)}, timeout=480)
            assert res.ok, f"{name} run failed ({res.status}):\n{res.output[-4000:]}"
            pids.update(res.processes)
            with np.load(path) as z:
                arrays = {k: z[k] for k in z}
            summary = json.loads(path.with_suffix(".json").read_text())
            out[name] = (arrays, summary)
            from flwr_transports import trace  # this run's client fetches, then cleared
            out[name + ":fetches"] = [e for e in trace.read_events(base / "trace")
                                      if e["ev"] == "fetch" and e.get("role") == "client"]
            for p in (base / "trace").glob("ftx-trace-*.jsonl"):
                p.unlink()
            out[name + ":kept"] = sorted(str(p) for p in (base / "cache").rglob("*")
                                         if p.is_file())
    # names our processes made in /dev/shm (ftx-<pid>-...; other test runs may share it)
    ours = {str(p) for p in pids}
    mine = {n for n in ftx_names() if (n.lstrip(".").split("-") + ["", ""])[1] in ours}
    return out, mine


@pytest.mark.integration
@pytest.mark.parametrize("name", ["tcp-delta"])
def test_exact_codecs_give_the_raw_model_bit_for_bit(runs, name):
    got, _ = runs
    raw, coded = got["shm-raw"][0], got[name][0]
    assert list(raw) == list(coded)
    for k in raw:
        assert raw[k].dtype == coded[k].dtype and raw[k].tobytes() == coded[k].tobytes(), k


@pytest.mark.integration
def test_q8_is_close_to_raw(runs):
    got, _ = runs
    raw, q8 = got["shm-raw"][0], got["tcp-q8"][0]
    for k in raw:
        assert raw[k].dtype == q8[k].dtype and raw[k].shape == q8[k].shape
        if raw[k].dtype.kind == "f":  # float32 quantised; float64 exact but streamed
            np.testing.assert_allclose(q8[k], raw[k], rtol=1e-5, atol=1e-5)
        else:
            assert raw[k].tobytes() == q8[k].tobytes()


@pytest.mark.integration
def test_codecs_moved_fewer_bytes_and_rejected_nothing(runs):
    got, _ = runs
    stats = {name: v[1]["stats"] for name, v in got.items() if ":" not in name}
    for name, st in stats.items():
        assert st["replies_rejected"] == 0, name
    raw = stats["shm-raw"]
    for name in ("tcp-delta", "tcp-q8"):
        # N(0,1) float32: the exponent bytes compress (random-init figure, ~83-90%)
        assert stats[name]["link_bytes_sent"] < 0.95 * raw["link_bytes_sent"], name
        assert stats[name]["inband_bytes_sent"] < 100_000, name  # references, tickets
    assert stats["tcp-delta"]["link_bytes_received"] < raw["link_bytes_received"]
    # int8 updates: about a quarter of the float32 reply
    assert stats["tcp-q8"]["link_bytes_received"] < 0.35 * raw["link_bytes_received"]
    assert stats["tcp-q8"]["agg_streamed_rounds"] == 2  # folded, not handed over decoded


@pytest.mark.integration
def test_nothing_left_in_dev_shm(runs):
    _, left = runs
    assert not left


@pytest.mark.integration
def test_downlink_deltas_and_the_cache_in_a_deployment(runs):
    """tcp:// with delta/q8: 2 rounds, 2 nodes: round 1 trains on the full model; each
    evaluate fetched the new model as a downlink delta (published once per evaluate);
    round 2 trained on the model kept from evaluate 1. No fetch failed; nothing is kept after the run."""
    got, _ = runs
    for name in ("tcp-delta", "tcp-q8"):
        ev = got[name + ":fetches"]
        assert not [e for e in ev if e.get("error")], name
        deltas = [e for e in ev if e.get("delta")]
        hits = [e for e in ev if e.get("cached")]
        assert len(hits) == 2, name  # round 2's train, both nodes
        assert len(deltas) == 4, name
        assert got[name][1]["stats"]["downlink_deltas"] == 2, name
        assert got[name + ":kept"] == [], name
