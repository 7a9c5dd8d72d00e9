"""FDA vs FedAvg: bytes communicated vs test accuracy (in process, synthetic data).

Task: benchmarks/fda_demo.py (teacher-labelled synthetic data, Dirichlet
label-skew split over the clients, one-hidden-layer MLP trained with minibatch SGD).
Every method runs the same number of steps; in a step every client calls the same
user train function once (``--local-steps`` SGD steps), so local work is equal:

- FedAvg: every step is a round (model down, model up, average);
- FDA naive/linear/sketch: every step is a monitoring step (local state up); a full
  average only when the variance estimate exceeds Theta.

Bytes are the in-band record sizes (sum of ``count_bytes()`` over the records of
every message and reply) counted by a Grid wrapper, identical for all methods. The
target accuracy is FedAvg's final accuracy minus ``--tolerance``.

    python benchmarks/fda_bench.py                       # defaults below
    python benchmarks/fda_bench.py --steps 100 --plot docs/fda_accuracy_vs_bytes.png
"""

from __future__ import annotations

import os

# One BLAS thread: the matrices are small and the machine is shared.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field

from flwr.app import MetricRecord
from flwr.serverapp.strategy import FedAvg

from flwr_transports.codec import record_bytes
from flwr_transports.strategies import FDA, fda_mod
from flwr_transports.testing import InProcessGrid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fda_demo as D


class CountingGrid(InProcessGrid):
    """In-process Grid that counts in-band bytes of every message and reply."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.down = 0
        self.up = 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.down += sum(record_bytes(m.content) for m in messages if m.has_content())
        replies = super().send_and_receive(messages, timeout=timeout)
        self.up += sum(record_bytes(r.content) for r in replies if r.has_content())
        return replies


@dataclass
class Run:
    name: str
    curve: list[tuple[int, float]] = field(default_factory=list)  # (bytes, accuracy)
    steps_at: list[int] = field(default_factory=list)  # step of each curve point
    syncs: int = 0
    seconds: float = 0.0
    theta: float | None = None

    @property
    def final_acc(self) -> float:
        return self.curve[-1][1]

    @property
    def total_bytes(self) -> int:
        return self.curve[-1][0]

    def bytes_to(self, target: float) -> int | None:
        for b, acc in self.curve:
            if acc >= target:
                return b
        return None

    def step_to(self, target: float) -> int | None:
        for (_, acc), step in zip(self.curve, self.steps_at, strict=False):
            if acc >= target:
                return step
        return None


def run_method(name, split, init, args, theta=None, variant=None, rho=None) -> Run:
    app = D.make_client_app(
        split,
        local_steps=args.local_steps,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
        mods=[fda_mod],
    )
    grid = CountingGrid(app, args.clients, serialize=True)
    run = Run(name=name, theta=theta)
    test_x, test_y = split.test

    def evaluate_fn(rnd, arrays):
        acc = D.accuracy(arrays, test_x, test_y)
        run.curve.append((grid.down + grid.up, acc))
        run.steps_at.append(int(rnd))
        return MetricRecord({"acc": acc})

    inner = FedAvg(min_available_nodes=args.clients, fraction_evaluate=0.0)
    t0 = time.perf_counter()
    if variant is None:
        inner.start(grid, init, num_rounds=args.steps, evaluate_fn=evaluate_fn)
        run.syncs = args.steps
    else:
        fda = FDA(
            inner,
            threshold=theta,
            variant=variant,
            sketch_depth=args.sketch_depth,
            sketch_width=args.sketch_width,
            seed=args.seed,
            adaptive=rho is not None,
            adaptive_rho=rho or 10.0,
            max_period=args.max_period or None,
        )
        fda.start(grid, init, num_rounds=args.fda_steps or args.steps, evaluate_fn=evaluate_fn)
        run.syncs = int(fda.stats["syncs"])
        own = fda.stats["bytes_down"] + fda.stats["bytes_up"]
        assert own == grid.down + grid.up, (own, grid.down, grid.up)  # same accounting
    run.seconds = time.perf_counter() - t0
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--per-client", type=int, default=1000)
    ap.add_argument("--alpha", type=float, default=0.3, help="Dirichlet label skew")
    ap.add_argument("--dim", type=int, default=100)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument(
        "--fda-steps",
        type=int,
        default=0,
        help="steps for the FDA runs (default: --steps, i.e. equal work)",
    )
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--sketch-depth", type=int, default=5)
    ap.add_argument("--sketch-width", type=int, default=250)
    ap.add_argument(
        "--theta",
        type=float,
        nargs="+",
        default=[2.0],
        help="Theta values to run for each FDA variant",
    )
    ap.add_argument("--variants", nargs="+", default=["naive", "linear", "sketch"])
    ap.add_argument(
        "--max-period",
        type=int,
        default=0,
        help="FDA: force a sync after this many steps without one (0: off)",
    )
    ap.add_argument(
        "--adaptive-rho",
        type=float,
        nargs="*",
        default=[],
        help="also run each variant with the adaptive Theta rule at these rho",
    )
    ap.add_argument(
        "--tolerance",
        type=float,
        default=0.005,
        help="target accuracy = FedAvg final accuracy - tolerance",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default="", help="PNG path for accuracy vs bytes")
    ap.add_argument("--json", default="", help="write all curves to this JSON file")
    ap.add_argument("--replot", default="", help="only redraw --plot from a --json file")
    args = ap.parse_args(argv)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    if args.replot:
        with open(args.replot, encoding="utf-8") as fh:
            saved = json.load(fh)
        runs = [Run(**{**r, "curve": [tuple(p) for p in r["curve"]]}) for r in saved["runs"]]
        a = saved["args"]
        plot(runs, saved["target"], a["clients"], a["steps"], args.plot or "fda.png")
        return 0

    split = D.make_data(
        num_clients=args.clients,
        per_client=args.per_client,
        dim=args.dim,
        alpha=args.alpha,
        seed=args.seed,
    )
    init = D.init_params(dim=args.dim, hidden=args.hidden, seed=args.seed)
    model_bytes = init.count_bytes()
    print(
        f"# {args.clients} clients, {args.per_client} samples each (Dirichlet alpha "
        f"{args.alpha}), MLP {args.dim}-{args.hidden}-10 = {model_bytes} B, {args.steps} "
        f"steps x {args.local_steps} local SGD steps",
        flush=True,
    )

    runs = [run_method("FedAvg", split, init, args)]
    for variant in args.variants:
        for theta in args.theta:
            runs.append(
                run_method(
                    f"FDA-{variant} (Theta={theta:g})",
                    split,
                    init,
                    args,
                    theta=theta,
                    variant=variant,
                )
            )
            print(f"  done {runs[-1].name}", file=sys.stderr, flush=True)
        for rho in args.adaptive_rho:
            runs.append(
                run_method(
                    f"FDA-{variant} (adaptive rho={rho:g})",
                    split,
                    init,
                    args,
                    theta=0.0,
                    variant=variant,
                    rho=rho,
                )
            )
            print(f"  done {runs[-1].name}", file=sys.stderr, flush=True)

    fedavg = runs[0]
    target = fedavg.final_acc - args.tolerance
    fb = fedavg.bytes_to(target)
    print(
        f"# target accuracy {target:.4f} (FedAvg final {fedavg.final_acc:.4f} - {args.tolerance})"
    )
    hdr = (
        f"{'method':<34}{'syncs':>6}{'final acc':>10}{'best acc':>10}"
        f"{'MB total':>10}{'MB to target':>14}{'vs FedAvg':>11}{'step':>6}{'s':>7}"
    )
    print(hdr)
    for r in runs:
        b = r.bytes_to(target)
        best = max(a for _, a in r.curve)
        ratio = f"{b / fb:.4f}" if b is not None and fb else "-"
        to_t = f"{b / 1e6:.3f}" if b is not None else "not reached"
        step = r.step_to(target)
        print(
            f"{r.name:<34}{r.syncs:>6}{r.final_acc:>10.4f}{best:>10.4f}"
            f"{r.total_bytes / 1e6:>10.3f}{to_t:>14}{ratio:>11}{step or '-':>6}"
            f"{r.seconds:>7.1f}"
        )

    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(
                {"args": vars(args), "target": target, "runs": [r.__dict__ for r in runs]},
                fh,
                indent=1,
            )
    if args.plot:
        plot(runs, target, args.clients, args.steps, args.plot)
    return 0


def plot(runs: list[Run], target: float, clients: int, steps: int, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: pip install -e benchmarks", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    cmap = plt.get_cmap("tab20")
    styles = {"FedAvg": "-", "naive": "-", "linear": "--", "sketch": ":"}
    for ax, zoom in zip(axes, (False, True), strict=True):
        for i, r in enumerate(runs):
            pts = [(b / 1e6, a) for b, a in r.curve if b > 0]  # skip the 0-byte start
            kind = "FedAvg" if r.name == "FedAvg" else r.name.split()[0].split("-")[1]
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                ls=styles[kind],
                lw=2.2 if kind == "FedAvg" else 1.4,
                color="black" if kind == "FedAvg" else cmap(i % 20),
                label=f"{r.name}: {r.syncs} syncs",
            )
        ax.axhline(target, color="grey", ls="--", lw=0.8, label=f"target {target:.3f}")
        ax.set_xscale("log")
        ax.set_xlabel("in-band bytes communicated (MB, log scale)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        if zoom:
            ax.set_ylim(target - 0.04, max(max(a for _, a in r.curve) for r in runs) + 0.005)
            ax.set_title("zoom near the target")
        else:
            ax.set_title(f"FDA vs FedAvg: {clients} non-IID clients, {steps} steps")
    axes[1].legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"# plot: {path}")


if __name__ == "__main__":
    raise SystemExit(main())
