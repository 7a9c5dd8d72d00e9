"""Round times of the llm-offload example, in-band vs links, in ONE local deployment.

    python examples/llm-offload/measure.py --model-size 125m --rounds 3 \
        --transports "shm://,tcp://127.0.0.1:0,inband"

Starts a SuperLink and 2 SuperNodes on 127.0.0.1 (flwr_transports.testing.deploy),
runs the example once per transport (same seed, so the same training), and prints per
round: wall time, the train and evaluate send-and-receive times, the losses, the
SuperLink's peak RSS and the bytes that went over the link. In-band goes last so its
memory high-water mark does not inflate the others' SuperLink figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

from flwr_transports.testing import LocalDeployment

APP = Path(__file__).resolve().parent
MIB = 1 << 20


def _checks():
    """tests/llm_checks.py (the checks the test suite runs on the tiny model)."""
    spec = importlib.util.spec_from_file_location(
        "llm_checks", APP.parent.parent / "tests" / "llm_checks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-size", default="125m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--transports", default="shm://,tcp://127.0.0.1:0,inband")
    ap.add_argument("--local-steps", type=int, default=None)
    ap.add_argument("--json", default="", help="also write the figures here")
    ap.add_argument("--verify", action="store_true",
                    help="clients and server dump every model; check every transfer was "
                         "bit-exact (tests/llm_checks.py; needs disk for 4 models a round)")
    args = ap.parse_args()

    rows = []
    tmp = tempfile.mkdtemp(prefix="ftx-llm-measure-")
    try:
        with LocalDeployment(n_supernodes=2, workdir=Path(tmp) / "deploy") as dep:
            for transport in [t.strip() for t in args.transports.split(",") if t.strip()]:
                out = Path(tmp) / f"result-{len(rows)}"
                out.mkdir()
                cfg = {"model-size": args.model_size, "num-server-rounds": args.rounds,
                       "transport": transport, "result-dir": str(out)}
                if args.local_steps is not None:
                    cfg["local-steps"] = args.local_steps
                if args.verify:
                    cfg["dump-clients"] = True
                res = dep.run(APP, cfg, timeout=3600)
                if not res.ok:
                    raise SystemExit(f"{transport}: run failed ({res.status})\n"
                                     f"{res.output[-3000:]}")
                s = json.loads((out / "summary.json").read_text())
                s["superlink_peak_rss"] = res.superlink_peak_rss
                s["wall_s"] = res.wall_s
                if args.verify:
                    _checks().check_transfers_bit_exact(out, s, args.rounds)
                    print(f"{transport}: every transfer bit-exact (digests and FedAvg "
                          "recomputed from the clients' dumps)", flush=True)
                    for f in out.glob("*.pt"):
                        f.unlink()
                rows.append(s)
                print(f"done: {transport} in {res.wall_s:.0f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    first = rows[0]
    print(f"\nmodel-size {first['model_size']}: {first['n_params'] / 1e6:.1f} M parameters, "
          f"{first['model_bytes'] / MIB:.1f} MiB of bf16 weights, 2 SuperNodes, "
          f"{first['num_rounds']} rounds")
    print(f"{'transport':<22}{'round':>6}{'round s':>9}{'train s':>9}{'eval s':>8}"
          f"{'train-loss':>11}{'eval-loss':>10}")
    for s in rows:
        for r in range(1, s["num_rounds"] + 1):
            tm = s["train_metrics"].get(str(r), {})
            em = s["evaluate_metrics"].get(str(r), {})
            print(f"{s['transport']:<22}{r:>6}{s['round_s'][r - 1]:>9.1f}"
                  f"{s['train_call_s'][r - 1]:>9.1f}{s['evaluate_call_s'][r - 1]:>8.1f}"
                  f"{tm.get('train-loss', float('nan')):>11.3f}"
                  f"{em.get('eval-loss', float('nan')):>10.3f}")
    print(f"\n{'transport':<22}{'mean round s':>13}{'SuperLink peak RSS':>20}"
          f"{'link MiB sent/recv':>20}")
    for s in rows:
        st = s["stats"]
        mean = sum(s["round_s"]) / len(s["round_s"])
        print(f"{s['transport']:<22}{mean:>13.1f}{s['superlink_peak_rss'] / MIB:>16.0f} MiB"
              f"{st['link_bytes_sent'] / MIB:>11.0f} / {st['link_bytes_received'] / MIB:.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=float))


if __name__ == "__main__":
    main()
