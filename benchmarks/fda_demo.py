"""A small numpy learning task for FDA tests, examples and the benchmark (no downloads).

Data: a Gaussian mixture, ``modes`` cluster centres per class (so the classes are not
linearly separable) plus isotropic noise. Non-IID split:
every client draws its label mix from a Dirichlet(alpha) distribution (label skew).
Model: a one-hidden-layer MLP (tanh) trained with minibatch SGD on cross-entropy.
The ClientApp built by :func:`make_client_app` is an ordinary Flower ClientApp with
``@app.train()`` / ``@app.evaluate()``; FDA is added only through ``mods=[fda_mod]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

KEYS = ("w1", "b1", "w2", "b2")


@dataclass
class Split:
    parts: list[tuple[np.ndarray, np.ndarray]]
    test: tuple[np.ndarray, np.ndarray]


def make_data(
    num_clients: int = 8,
    per_client: int = 1000,
    dim: int = 100,
    classes: int = 10,
    alpha: float = 0.5,
    test_size: int = 4000,
    seed: int = 0,
    modes: int = 3,
    noise: float = 1.5,
) -> Split:
    """Gaussian-mixture data (``modes`` clusters per class) with a Dirichlet label skew."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((classes, modes, dim))

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, classes, size=n)
        m = rng.integers(0, modes, size=n)
        x = centers[y, m] + noise * rng.standard_normal((n, dim))
        return x.astype(np.float32), y.astype(np.int64)

    pool_x, pool_y = sample(num_clients * per_client * 4)
    by_class = [list(np.flatnonzero(pool_y == c)) for c in range(classes)]
    parts = []
    for _ in range(num_clients):
        mix = rng.dirichlet(np.full(classes, alpha))
        counts = rng.multinomial(per_client, mix)
        idx: list[int] = []
        for c, n in enumerate(counts):
            take = min(int(n), len(by_class[c]))
            idx.extend(by_class[c][:take])
            del by_class[c][:take]
        idx_arr = np.array(idx, dtype=np.int64)
        rng.shuffle(idx_arr)
        parts.append((pool_x[idx_arr], pool_y[idx_arr]))
    return Split(parts=parts, test=sample(test_size))


def init_params(dim: int = 100, hidden: int = 256, classes: int = 10, seed: int = 0) -> ArrayRecord:
    rng = np.random.default_rng([seed, 7])
    params = {
        "w1": (rng.standard_normal((dim, hidden)) / np.sqrt(dim)).astype(np.float32),
        "b1": np.zeros(hidden, dtype=np.float32),
        "w2": (rng.standard_normal((hidden, classes)) / np.sqrt(hidden)).astype(np.float32),
        "b2": np.zeros(classes, dtype=np.float32),
    }
    return to_record(params)


def to_record(params: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(params[k])) for k in KEYS})


def from_record(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: rec[k].numpy().copy() for k in KEYS}


def _forward(p, x):
    h = np.tanh(x @ p["w1"] + p["b1"])
    logits = h @ p["w2"] + p["b2"]
    return h, logits


def train_steps(p, x, y, steps: int, batch: int, lr: float, rng: np.random.Generator):
    """``steps`` minibatch SGD steps; returns (params, mean loss)."""
    losses = []
    for _ in range(steps):
        idx = rng.integers(0, len(x), size=min(batch, len(x)))
        xb, yb = x[idx], y[idx]
        h, logits = _forward(p, xb)
        logits = logits - logits.max(axis=1, keepdims=True)
        prob = np.exp(logits)
        prob /= prob.sum(axis=1, keepdims=True)
        losses.append(float(-np.mean(np.log(prob[np.arange(len(yb)), yb] + 1e-12))))
        g = prob
        g[np.arange(len(yb)), yb] -= 1.0
        g /= len(yb)
        gw2 = h.T @ g
        gb2 = g.sum(axis=0)
        gh = (g @ p["w2"].T) * (1.0 - h * h)
        gw1 = xb.T @ gh
        gb1 = gh.sum(axis=0)
        p["w1"] -= lr * gw1
        p["b1"] -= lr * gb1
        p["w2"] -= lr * gw2
        p["b2"] -= lr * gb2
    return p, float(np.mean(losses)) if losses else 0.0


def accuracy(rec: ArrayRecord, x: np.ndarray, y: np.ndarray) -> float:
    _, logits = _forward(from_record(rec), x)
    return float(np.mean(np.argmax(logits, axis=1) == y))


def make_client_app(
    split: Split,
    local_steps: int = 5,
    batch: int = 32,
    lr: float = 0.1,
    seed: int = 0,
    mods=None,
) -> ClientApp:
    """An ordinary Message-API ClientApp training the MLP on the node's partition."""
    app = ClientApp(mods=list(mods or []))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        x, y = split.parts[pid]
        rnd = int(msg.content["config"].get("server-round", 0))
        rng = np.random.default_rng([seed, pid, rnd])
        params = from_record(msg.content["arrays"])
        params, loss = train_steps(params, x, y, local_steps, batch, lr, rng)
        content = RecordDict(
            {
                "arrays": to_record(params),
                "metrics": MetricRecord({"train_loss": loss, "num-examples": len(x)}),
            }
        )
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        x, y = split.parts[pid]
        acc = accuracy(msg.content["arrays"], x, y)
        metrics = MetricRecord({"eval_acc": acc, "num-examples": len(x)})
        return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

    return app
