"""ClientApp: a few local AdamW steps on a synthetic token stream; bf16 weights in and out.

The weights arrive as bf16 ``torch.raw`` Arrays (``flwr_transports.torch``), are
loaded into an fp32 copy of the model (the master weights for the local steps), and
leave as bf16 again. ``payload_mod`` (first in the mods) fetches/offloads them when
the ServerApp runs with a link transport.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flwr_transports import payload_mod
from flwr_transports.torch import arrays_to_state_dict, state_dict_to_arrays

from .data import Language
from .model import empty_model, preset

app = ClientApp(mods=[payload_mod])


def record_digest(record: ArrayRecord) -> str:
    """SHA-256 over every array's name, dtype, shape and bytes, in record order."""
    h = hashlib.sha256()
    for name, arr in record.items():
        h.update(json.dumps([name, arr.dtype, list(arr.shape), arr.stype]).encode())
        h.update(arr.data)
    return h.hexdigest()


def _setup(msg: Message, context: Context):
    cfg = context.run_config
    try:
        pid = int(context.node_config["partition-id"])
    except (KeyError, TypeError, ValueError) as err:
        raise RuntimeError("this app needs an integer 'partition-id' in --node-config") from err
    threads = int(cfg.get("threads", 1))
    if threads > 0:
        torch.set_num_threads(threads)
    mcfg = preset(str(cfg["model-size"]))
    model = empty_model(mcfg)  # fp32 master weights for the local steps
    model.load_state_dict(arrays_to_state_dict(msg.content["arrays"]))  # copies bf16 -> fp32
    lang = Language(mcfg.vocab_size, min(int(cfg["data-vocab"]), mcfg.vocab_size),
                    seed=int(cfg["seed"]))
    return cfg, pid, model, lang


def _seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:7], "little")


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, pid, model, lang = _setup(msg, context)
    rnd = int(msg.content["config"]["server-round"])
    steps, batch, seq = int(cfg["local-steps"]), int(cfg["batch-size"]), int(cfg["seq-len"])
    opt = torch.optim.AdamW(model.parameters(), lr=float(cfg["lr"]), weight_decay=0.0)
    model.train()
    losses = []
    if steps == 0:  # no training (to time the transfers alone): report the loss as is
        with torch.no_grad():
            x, y = lang.batch(batch, seq, seed=_seed(int(cfg["seed"]), pid, rnd, 0))
            losses.append(float(model(x, y)))
    for step in range(steps):
        x, y = lang.batch(batch, seq, seed=_seed(int(cfg["seed"]), pid, rnd, step))
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    del opt
    out = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    del model
    # One copy into bytes (~0.1 s at 125m): a reply must survive Ray's pickling in the
    # simulation runtime. In a deployment copy=False (memoryviews of these fresh
    # tensors) also works and saves that copy; see docs/torch.md.
    arrays = state_dict_to_arrays(out)
    result_dir = str(cfg.get("result-dir", "") or "")
    if result_dir and bool(cfg.get("dump-clients", False)):
        d = Path(result_dir)
        torch.save(out, d / f"client-{pid}-r{rnd}.pt")
        (d / f"received-{pid}-r{rnd}.sha256").write_text(record_digest(msg.content["arrays"]))
        (d / f"sent-{pid}-r{rnd}.sha256").write_text(record_digest(arrays))
    metrics = MetricRecord({
        "num-examples": max(steps, 1) * batch * seq,  # FedAvg weights; never 0
        "train-loss": sum(losses) / len(losses),
        "train-loss-last": losses[-1],
    })
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, pid, model, lang = _setup(msg, context)
    rnd = int(msg.content["config"]["server-round"])
    n_batches, batch, seq = int(cfg["eval-batches"]), int(cfg["batch-size"]), int(cfg["seq-len"])
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(n_batches):
            # held-out samples: a seed space the training batches never use
            x, y = lang.batch(batch, seq, seed=_seed(int(cfg["seed"]), pid, -1 - i))
            total += float(model(x, y))
    metrics = MetricRecord({"num-examples": n_batches * batch * seq,
                            "eval-loss": total / n_batches, "round": rnd})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
