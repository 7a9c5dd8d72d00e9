"""The llm-offload example trained with each payload codec: held-out loss and bytes.

Runs the example's own ClientApp (examples/llm-offload: bf16 weights both ways, a few
AdamW steps per round on its synthetic token stream) and its server strategy
(``offload(upcast(FedAvg(...)))``) for ``--rounds`` rounds with 2 clients, once per
codec, over ``shm://`` in ONE process (the in-process grid of
``flwr_transports.testing``: real links, real payload_mod, real encode/decode; each
node keeps its ``context.state`` between rounds as a SuperNode does, which is where
q8 keeps its residuals). Reports the held-out loss after each round (the clients'
``eval-loss`` on ``--eval-batches`` fixed held-out batches each, weighted mean), the
bytes the clients uploaded (link_bytes_received) and downloaded (link_bytes_sent).

``raw``, ``lossless`` and ``delta`` must give the same losses to the last digit
(exact codecs); ``q8`` is lossy and its loss is compared with ``raw``'s.

``--transport tcp://127.0.0.1:0`` (a network link): the clients' kept-payload cache
is on (a fresh directory per codec), so with ``delta``/``q8`` each new global model
goes as a downlink delta to clients that kept the one before, and a model sent again
(evaluate -> next train) is read from the cache. Then ``fetched`` (bytes the clients
actually fetched, from the trace's client ``fetch`` events; cache hits excluded),
``as deltas`` (of those, downlink deltas) and ``hits`` are reported as well;
``downloaded`` stays what the references pointed at (the full models).

Usage: python benchmarks/codec_training.py [--preset tiny] [--rounds 5]
       [--eval-batches 32] [--codecs raw,lossless,delta,q8] [--transport shm://]
       [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples" / "llm-offload"))


def run(codec: str, a) -> dict:
    import torch
    from flwr.serverapp.strategy import FedAvg
    from llm_offload.client_app import app
    from llm_offload.model import initial_state_dict

    from flwr_transports import offload
    from flwr_transports.testing import InProcessGrid
    from flwr_transports.torch import state_dict_to_arrays, upcast

    torch.manual_seed(0)
    cfg = {"model-size": a.preset, "local-steps": a.local_steps, "batch-size": 4,
           "seq-len": 128, "lr": a.lr, "eval-batches": a.eval_batches, "data-vocab": 512,
           "seed": 0, "threads": 1}
    grid = InProcessGrid(app, 2, run_config=cfg)
    strategy = offload(upcast(FedAvg(fraction_train=1.0, fraction_evaluate=1.0,
                                     min_train_nodes=2, min_evaluate_nodes=2,
                                     min_available_nodes=2)),
                       transport=a.transport, codec=codec, threshold=0)
    init = state_dict_to_arrays(initial_state_dict(a.preset, seed=0))
    from flwr_transports import trace
    from flwr_transports.links import network_scheme
    net = network_scheme(strategy.scheme)
    with tempfile.TemporaryDirectory() as tmp:
        if net:  # the clients' cache (fresh per codec) and the trace of their fetches
            os.environ["FLWR_TRANSPORTS_CACHE"] = os.path.join(tmp, "cache")
            os.environ[trace.ENV] = os.path.join(tmp, "trace")
        try:
            t0 = time.perf_counter()
            res = strategy.start(grid=grid, initial_arrays=init, num_rounds=a.rounds)
            dt = time.perf_counter() - t0
        finally:
            os.environ.pop("FLWR_TRANSPORTS_CACHE", None)
            os.environ.pop(trace.ENV, None)
        ev = ([e for e in trace.read_events(os.path.join(tmp, "trace"))
               if e["ev"] == "fetch" and e.get("role") == "client"] if net else [])
    losses = {int(r): float(m["eval-loss"]) for r, m in res.evaluate_metrics_clientapp.items()}
    st = strategy.stats
    out = {"codec": codec, "eval_loss": [losses[r] for r in sorted(losses)],
           "uploaded": st["link_bytes_received"], "downloaded": st["link_bytes_sent"],
           "rejected": st["replies_rejected"], "seconds": dt}
    if net:
        out.update(fetched=sum(e["bytes"] for e in ev if not e.get("cached")),
                   fetched_deltas=sum(e["bytes"] for e in ev if e.get("delta")),
                   fetches=len(ev), deltas=sum(1 for e in ev if e.get("delta")),
                   hits=sum(1 for e in ev if e.get("cached")),
                   downlink_deltas_published=st["downlink_deltas"],
                   downlink_delta_bytes_published=st["downlink_delta_bytes"])
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-steps", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-batches", type=int, default=32)
    ap.add_argument("--codecs", default="raw,lossless,delta,q8")
    ap.add_argument("--transport", default="shm://")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    load_before = list(os.getloadavg())
    print("load before:", " ".join(f"{x:.2f}" for x in load_before))
    rows = [run(c, a) for c in a.codecs.split(",")]
    load_after = list(os.getloadavg())
    print("load after:", " ".join(f"{x:.2f}" for x in load_after))
    raw = next((r for r in rows if r["codec"] == "raw"), None)
    print(f"\n{'codec':10s} {'eval-loss per round':48s} {'vs raw':>8s} {'uploaded':>12s} "
          f"{'downloaded':>12s} rejected")
    for r in rows:
        rel = (f"{100 * (r['eval_loss'][-1] / raw['eval_loss'][-1] - 1):+.2f}%"
               if raw else "")
        print(f"{r['codec']:10s} {' '.join(f'{x:.4f}' for x in r['eval_loss']):48s} "
              f"{rel:>8s} {r['uploaded']:12d} {r['downloaded']:12d} {r['rejected']}")
    if any("fetched" in r for r in rows):
        print(f"\n{'codec':10s} {'fetched by clients':>20s} {'of raw':>8s} {'as deltas':>12s} "
              f"{'fetches':>8s} {'deltas':>7s} {'hits':>5s}")
        for r in rows:
            rel = f"{100 * r['fetched'] / raw['fetched']:.1f}%" if raw else ""
            print(f"{r['codec']:10s} {r['fetched']:20d} {rel:>8s} {r['fetched_deltas']:12d} "
                  f"{r['fetches']:8d} {r['deltas']:7d} {r['hits']:5d}")
    if a.json:
        import subprocess

        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, check=False,
                                capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=root, check=False, capture_output=True,
                                    text=True).stdout.strip())
        Path(a.json).write_text(json.dumps(
            {"kind": "codec-training", "commit": commit, "dirty": dirty,
             "command": " ".join(sys.argv), "load_before": load_before,
             "load_after": load_after, "time_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
             "args": vars(a), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
