"""Issue 24: offload's receive loop against Flower's 3 s pull, on a real deployment.

One LocalDeployment (SuperLink + N SuperNodes on loopback), the quickstart example
(``examples/quickstart-offload``), traced (``FLWR_TRANSPORTS_TRACE``). Runs every
transport ``--repeat`` times, interleaved (same load for each), and prints per
transport the total run time (median, range), the SuperLink pulls per phase (offload's
counter; plain Flower's derived from its phase times: one pull per started 3 s), the
aggregation tail per round, and the medians of the trace's ``node_wait`` (push -> the
slowest node's ClientApp process started: the SuperNode's and SuperExec's polls),
``spawn`` and ``landed_to_reply``. ``uptime`` before and after.

    python benchmarks/receive_loop_bench.py --model-mib 2 --rounds 3 --repeat 3 \\
        --transports inband,tcp://127.0.0.1:0 --out /tmp/rl

Older code: ``PYTHONPATH=/path/to/old/tree APP=/path/to/old/tree/examples/quickstart-offload``.
Extra environment for the deployment: ``--env FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
from pathlib import Path

from flwr_transports import trace
from flwr_transports.testing import LocalDeployment

ROOT = Path(__file__).resolve().parent.parent


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], check=False, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return ""


def _med(xs: list[float]) -> str:
    return (f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f}, n={len(xs)})"
            if xs else "-")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model-mib", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--transports", default="inband,tcp://127.0.0.1:0")
    ap.add_argument("--env", action="append", default=[], help="K=V for the deployment")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    app = Path(os.environ.get("APP", ROOT / "examples" / "quickstart-offload"))
    transports = [t for t in a.transports.split(",") if t]
    tdir = out / "trace"
    env = {"GRPC_VERBOSITY": "ERROR", trace.ENV: str(tdir),
           **dict(kv.split("=", 1) for kv in a.env)}
    doc = {"uptime_before": _uptime(), "model_mib": a.model_mib, "rounds": a.rounds,
           "nodes": a.nodes, "env": a.env, "runs": []}
    with LocalDeployment(n_supernodes=a.nodes, workdir=out / "deploy", env=env) as dep:
        for rep in range(a.repeat):
            for t in transports:
                shutil.rmtree(tdir, ignore_errors=True)
                res = out / f"res-{rep}-{len(doc['runs'])}.npz"
                r = dep.run(app, {"transport": t, "model-mib": a.model_mib,
                                  "num-server-rounds": a.rounds, "result-path": str(res)},
                            timeout=600)
                if not r.ok:
                    raise SystemExit(f"{t} failed ({r.status}):\n{r.output[-3000:]}")
                s = json.loads(res.with_suffix(".json").read_text())
                ev = trace.read_events(tdir)
                phases = [c["seconds"] for c in s["calls"]]
                st = s.get("stats") or {}
                rows = [row for ph in ("train", "evaluate") for row in trace.breakdown(ev, ph)]
                run = {"transport": t, "repeat": rep, "total_s": s["total_s"],
                       "per_round_s": s["per_round_s"], "phase_s": phases,
                       "pulls_per_phase": st.get("receive_pulls") or None,
                       "flower_pulls_per_phase": [math.floor(x / 3) + 1 for x in phases],
                       "agg_tail_s": st.get("agg_tail_s"), "agg_train_s": st.get("agg_train_s"),
                       "breakdown": rows}
                doc["runs"].append(run)
                print(f"{t} rep {rep}: total {run['total_s']:.2f} s, pulls/phase "
                      f"{run['pulls_per_phase'] or run['flower_pulls_per_phase']}", flush=True)
    shutil.rmtree(tdir, ignore_errors=True)
    doc["uptime_after"] = _uptime()
    print(doc["uptime_before"], "|", doc["uptime_after"])
    for t in transports:
        runs = [r for r in doc["runs"] if r["transport"] == t]
        tot = [r["total_s"] for r in runs]
        mine = any(r["pulls_per_phase"] for r in runs)
        pulls = [sum(r["pulls_per_phase"] or r["flower_pulls_per_phase"]) / a.rounds
                 for r in runs]
        rows = [row for r in runs for row in r["breakdown"]]
        print(f"{t}: total {_med(tot)} s; pulls per round {_med(pulls)}"
              f"{'' if mine else ' (Flower, derived)'}; aggregation tail per round "
              f"{[r['agg_tail_s'] for r in runs]}")
        for k in ("node_wait", "spawn", "landed_to_reply", "receive"):
            xs = [row[k] for row in rows if isinstance(row.get(k), int | float)]
            if xs:
                print(f"    {k}: {_med(xs)}")
    (out / "receive-loop.json").write_text(json.dumps(doc, indent=1))
    print("json:", out / "receive-loop.json")


if __name__ == "__main__":
    main()
