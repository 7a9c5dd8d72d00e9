"""examples/llm-offload at its ``tiny`` size in a REAL local Flower deployment.

``flower-superlink`` + 2 ``flower-supernode`` on 127.0.0.1, one ``flwr run`` of the
example over ``shm://`` (threshold 0, so every model crosses the link),
ClientApps and ServerApp dumping what they sent and received.
2 rounds of train + evaluate: ~30 s on a quiet 2-core machine.

Checked: the run succeeds with every reply; the evaluation loss goes down round by
round; the bf16 weights went over the link (wrapper statistics) and every transfer
was bit-exact: each client received exactly the global model of the previous round
(digests), and the global model after each round equals FedAvg of the two clients'
bf16 weights computed here independently (float32 weighted mean, rounded to bf16).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the llm-offload example needs torch")

ROUNDS = 2
RUN_CONFIG = {
    "model-size": "tiny",
    "transport": "shm://?threshold=0",
    "num-server-rounds": ROUNDS,
    "local-steps": 8,
    "batch-size": 4,
    "seq-len": 64,
    "lr": 0.003,
    "data-vocab": 64,
    "eval-batches": 2,
    "threads": 1,
    "dump-clients": True,
}


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def _digest(sd: dict[str, torch.Tensor]) -> str:
    """Same digest as the example's record_digest, computed from tensors."""
    h = hashlib.sha256()
    for name, t in sd.items():
        h.update(json.dumps([name, str(t.dtype), list(t.shape), "torch.raw"]).encode())
        h.update(_bits(t))
    return h.hexdigest()


@pytest.fixture(scope="module")
def llm_run(tmp_path_factory, repo_root, ftx_names):
    """Run the example once; (result dir, summary.json, shm names it left behind)."""
    pytest.importorskip("psutil", reason="the deployment harness needs psutil")
    from flwr_transports.bench.deploy import LocalDeployment

    base = tmp_path_factory.mktemp("llm")
    out = base / "result"
    out.mkdir()
    with LocalDeployment(n_supernodes=2, workdir=base / "deploy") as dep:
        res = dep.run(repo_root / "examples" / "llm-offload",
                      {**RUN_CONFIG, "result-dir": str(out)}, timeout=300)
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
    assert summary["model_size"] == "tiny" and summary["final_dtypes"] == ["torch.bfloat16"]
    evals = [summary["evaluate_metrics"][str(r)]["eval-loss"] for r in range(1, ROUNDS + 1)]
    train = [summary["train_metrics"][str(r)]["train-loss"] for r in range(1, ROUNDS + 1)]
    assert all(b < a for a, b in itertools.pairwise(evals)), evals
    assert evals[-1] < 0.8 * evals[0], evals
    assert train[-1] < train[0], train
    assert len(summary["round_s"]) == ROUNDS


@pytest.mark.integration
def test_llm_example_weights_went_over_the_link_bf16(llm_run):
    _, summary, left = llm_run
    stats = summary["stats"]
    model_bytes = summary["model_bytes"]
    assert model_bytes == 2 * summary["n_params"]  # bf16, not upcast to fp32
    # the global model to each of 2 nodes, train and evaluate, every round (published
    # once per round and phase) and the 2 replies per round came back over shm://
    assert stats["link_bytes_sent"] >= ROUNDS * 2 * model_bytes
    assert stats["link_bytes_received"] >= ROUNDS * 2 * model_bytes
    assert stats["inband_bytes_sent"] < model_bytes and stats["replies_rejected"] == 0
    assert not left, f"shm:// payloads left behind: {left}"


@pytest.mark.integration
def test_llm_example_transfers_bit_exact(llm_run):
    out, summary, _ = llm_run
    globals_ = {r: _load(out / f"global-r{r}.pt") for r in range(ROUNDS + 1)}
    for r, sd in globals_.items():
        assert _digest(sd) == summary["digests"][str(r)], f"round {r}"
    for r in range(1, ROUNDS + 1):
        clients = [_load(out / f"client-{pid}-r{r}.pt") for pid in (0, 1)]
        for pid in (0, 1):
            # server -> client: exactly the previous global model arrived
            received = (out / f"received-{pid}-r{r}.sha256").read_text()
            assert received == summary["digests"][str(r - 1)], f"round {r}, client {pid}"
            sent = (out / f"sent-{pid}-r{r}.sha256").read_text()
            assert sent == _digest(clients[pid])
        # client -> server: FedAvg (equal weights) of exactly what the clients sent
        # both clients report local-steps * batch-size * seq-len examples
        n = [RUN_CONFIG["local-steps"] * RUN_CONFIG["batch-size"] * RUN_CONFIG["seq-len"]] * 2
        assert clients[0].keys() == globals_[r].keys()
        # the clients really trained differently (on different samples)
        differ = [k for k in clients[0] if not torch.equal(clients[0][k], clients[1][k])]
        assert len(differ) > len(clients[0]) // 2, differ
        for key, g in globals_[r].items():
            a, b = clients[0][key], clients[1][key]
            assert a.dtype == b.dtype == g.dtype == torch.bfloat16
            want = (a.float() * (n[0] / sum(n)) + b.float() * (n[1] / sum(n))).to(torch.bfloat16)
            assert _bits(g) == _bits(want), f"round {r}, {key}"
    final = _load(out / "final.pt")
    assert _bits(torch.cat([t.reshape(-1) for t in final.values()])) == _bits(
        torch.cat([t.reshape(-1) for t in globals_[ROUNDS].values()]))
