"""Checks shared by the tests that run examples/llm-offload (deployment, MPI, S3).

The example, run with ``result-dir`` and ``dump-clients``, leaves in that directory
``summary.json``, every global model (``global-r<N>.pt``), what each client sent
(``client-<pid>-r<N>.pt``) and digests of what each client received and sent.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "llm-offload"

#: the example at its tiny size, tuned so the loss drops clearly in 2 rounds
TINY = {
    "model-size": "tiny",
    "local-steps": 8,
    "batch-size": 4,
    "seq-len": 64,
    "lr": 0.003,
    "data-vocab": 64,
    "eval-batches": 2,
    "threads": 1,
    "dump-clients": True,
}


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def digest(sd: dict[str, torch.Tensor]) -> str:
    """The example's record_digest, computed here from tensors."""
    h = hashlib.sha256()
    for name, t in sd.items():
        h.update(json.dumps([name, str(t.dtype), list(t.shape), "torch.raw"]).encode())
        h.update(bits(t))
    return h.hexdigest()


def check_loss_goes_down(summary: dict, rounds: int) -> None:
    assert summary["model_size"] == "tiny" and summary["final_dtypes"] == ["torch.bfloat16"]
    evals = [summary["evaluate_metrics"][str(r)]["eval-loss"] for r in range(1, rounds + 1)]
    train = [summary["train_metrics"][str(r)]["train-loss"] for r in range(1, rounds + 1)]
    assert all(b < a for a, b in itertools.pairwise(evals)), evals
    assert evals[-1] < 0.8 * evals[0], evals
    assert train[-1] < train[0], train
    assert len(summary["round_s"]) == rounds


def check_transfers_bit_exact(out: Path, summary: dict, rounds: int) -> None:
    """Each client received exactly the previous global model; each global model is
    FedAvg of exactly what the two clients sent (both report the same num-examples, so
    weights 0.5: float32 mean rounded to bf16), computed here independently."""
    globals_ = {r: load(out / f"global-r{r}.pt") for r in range(rounds + 1)}
    for r, sd in globals_.items():
        assert digest(sd) == summary["digests"][str(r)], f"round {r}"
    for r in range(1, rounds + 1):
        clients = [load(out / f"client-{pid}-r{r}.pt") for pid in (0, 1)]
        for pid in (0, 1):
            received = (out / f"received-{pid}-r{r}.sha256").read_text()
            assert received == summary["digests"][str(r - 1)], f"round {r}, client {pid}"
            assert (out / f"sent-{pid}-r{r}.sha256").read_text() == digest(clients[pid])
        assert clients[0].keys() == globals_[r].keys()
        # the clients really trained differently (on different samples)
        differ = [k for k in clients[0] if not torch.equal(clients[0][k], clients[1][k])]
        assert len(differ) > len(clients[0]) // 2, differ
        for key, g in globals_[r].items():
            a, b = clients[0][key], clients[1][key]
            assert a.dtype == b.dtype == g.dtype == torch.bfloat16
            want = (a.float() * 0.5 + b.float() * 0.5).to(torch.bfloat16)
            assert bits(g) == bits(want), f"round {r}, {key}"
    final = load(out / "final.pt")
    assert [bits(t) for t in final.values()] == [bits(t) for t in globals_[rounds].values()]
