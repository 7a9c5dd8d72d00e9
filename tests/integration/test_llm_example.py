"""examples/llm-offload at its ``tiny`` size in a REAL local Flower deployment.

``flower-superlink`` + 2 ``flower-supernode`` on 127.0.0.1, one ``flwr run`` of the
example over ``shm://`` (threshold 0, so every model crosses the link), 2 rounds of
train + evaluate (~30 s on a quiet 2-core machine), ClientApps and ServerApp dumping
what they sent and received.

Checked: the run succeeds with every reply; the evaluation loss goes down round by
round; the bf16 weights went over the link (wrapper statistics) and nothing is left
in /dev/shm; every transfer was bit-exact: each client received exactly the global
model of the previous round (digests), and the global model after each round equals
FedAvg of the two clients' bf16 weights computed here independently (float32
weighted mean, rounded to bf16).
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch", reason="the llm-offload example needs torch")

from llm_checks import EXAMPLE, TINY, check_loss_goes_down, check_transfers_bit_exact

ROUNDS = 2
RUN_CONFIG = {**TINY, "transport": "shm://?threshold=0", "num-server-rounds": ROUNDS}


@pytest.fixture(scope="module")
def llm_run(tmp_path_factory, ftx_names):
    """Run the example once; (result dir, summary.json, shm names it left behind)."""
    import psutil  # noqa: F401 - a dev dependency: missing is a failure

    from flwr_transports.testing import LocalDeployment

    base = tmp_path_factory.mktemp("llm")
    out = base / "result"
    out.mkdir()
    with LocalDeployment(n_supernodes=2, workdir=base / "deploy") as dep:
        res = dep.run(EXAMPLE, {**RUN_CONFIG, "result-dir": str(out)}, timeout=300)
    assert res.ok, f"run failed ({res.status}):\n{res.output[-4000:]}"
    summary = json.loads((out / "summary.json").read_text())
    # shm names are ftx-<pid of the creating process>-...: ours are those of this run's
    # processes (other runs on a shared machine may have their own there meanwhile)
    pids = {str(p) for p in res.processes}
    left = {n for n in ftx_names() if n.lstrip(".").split("-")[1] in pids}
    return out, summary, left


@pytest.mark.integration
def test_llm_example_trains_and_loss_goes_down(llm_run):
    _, summary, _ = llm_run
    check_loss_goes_down(summary, ROUNDS)


@pytest.mark.integration
def test_llm_example_weights_went_over_the_link_bf16(llm_run):
    _, summary, left = llm_run
    stats = summary["stats"]
    model_bytes = summary["model_bytes"]
    assert model_bytes == 2 * summary["n_params"]  # bf16, not upcast to fp32
    # the global model (published once per round and phase) and the 2 replies per
    # round went over shm://
    assert stats["link_bytes_sent"] >= ROUNDS * 2 * model_bytes
    assert stats["link_bytes_received"] >= ROUNDS * 2 * model_bytes
    assert stats["inband_bytes_sent"] < model_bytes and stats["replies_rejected"] == 0
    assert not left, f"shm:// payloads left behind: {left}"


@pytest.mark.integration
def test_llm_example_transfers_bit_exact(llm_run):
    out, summary, _ = llm_run
    check_transfers_bit_exact(out, summary, ROUNDS)
