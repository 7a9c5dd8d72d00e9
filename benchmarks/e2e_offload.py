"""End-to-end benchmark: a real Flower deployment, in-band vs out-of-band payloads.

For each transport it starts a fresh local deployment (``flower-superlink`` + N
``flower-supernode`` on 127.0.0.1), then runs examples/quickstart-offload twice:

* with a tiny model (``--floor-mib``, default 0.5 MiB, below the offload threshold so
  it stays in-band): Flower's control-plane floor for a train + evaluate round;
* with the big model (``--size-mib``, default 500 MiB).

Payload overhead = round time (big) - round time (floor), per transport; the headline
figure is in-band overhead / link overhead. A fresh deployment per transport keeps
one transport's SuperLink memory high-water mark out of the next one's figures.

Round time is measured inside the ServerApp (from the end of one round's evaluate
replies to the next's); the figure reported is the median over rounds 2..N (round 1
also pays for ClientApp start-up). Flower's SuperNodes poll every 3 s, so expect
+-1.5 s of noise per round on top of whatever else the machine is doing.

    python benchmarks/e2e_offload.py --size-mib 500 --transports inband,shm://
    python benchmarks/e2e_offload.py --size-mib 128 --json /tmp/e2e.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
APP = REPO / "examples" / "quickstart-offload"
MIB = 1 << 20


def _mib(n: float) -> str:
    return f"{n / MIB:,.0f} MiB"


def _steady_round_s(per_round: list[float]) -> float:
    """Median round time, leaving out round 1 (ClientApp/FAB start-up) when possible."""
    rounds = sorted(per_round[1:] if len(per_round) > 1 else per_round)
    mid = len(rounds) // 2
    return rounds[mid] if len(rounds) % 2 else (rounds[mid - 1] + rounds[mid]) / 2


def _run_one(
    dep, app: Path, transport: str, model_mib: float, rounds: int, out: Path, timeout: float
) -> dict[str, Any]:
    res = dep.run(
        app,
        {
            "transport": transport,
            "model-mib": float(model_mib),
            "num-server-rounds": int(rounds),
            "result-path": str(out),
        },
        timeout=timeout,
    )
    if not res.ok:
        raise RuntimeError(
            f"run transport={transport} model={model_mib} MiB failed "
            f"(rc={res.returncode}, status={res.status}, timed_out={res.timed_out}); "
            f"log: {res.log_path}\n{res.output[-3000:]}"
        )
    summary = json.loads(out.with_suffix(".json").read_text())
    for call in summary["calls"]:
        if call["replies"] != call["sent"] or call["errors"]:
            raise RuntimeError(f"transport={transport}: incomplete round {call}")
    out.unlink(missing_ok=True)  # the final model itself is not needed here
    return {
        "transport": transport,
        "model_mib": model_mib,
        "model_bytes": summary["model_bytes"],
        "round_s": _steady_round_s(summary["per_round_s"]),
        "round_s_mean_all": summary["round_s_mean"],
        "per_round_s": summary["per_round_s"],
        "flwr_run_wall_s": res.wall_s,
        "superlink_rss_before": res.superlink_rss_before,
        "superlink_peak_rss": res.superlink_peak_rss,
        "superlink_children_peak_rss": res.children_peak_rss,
        "supernodes_peak_rss": res.supernodes_peak_rss,
        "stats": summary["stats"],
    }


def run_benchmark(
    transports: list[str],
    size_mib: float,
    floor_mib: float,
    rounds: int,
    supernodes: int,
    workdir: Path,
    timeout: float,
    log=print,
) -> list[dict[str, Any]]:
    from flwr_transports.testing import LocalDeployment

    rows = []
    for i, transport in enumerate(transports):
        tdir = workdir / f"t{i}"
        log(f"[{transport}] starting SuperLink + {supernodes} SuperNodes ...")
        with LocalDeployment(n_supernodes=supernodes, workdir=tdir / "deploy") as dep:
            row: dict[str, Any] = {"transport": transport}
            for label, mib in (("floor", floor_mib), ("payload", size_mib)):
                t0 = time.perf_counter()
                log(f"[{transport}] {rounds} rounds with a {mib:g} MiB model ...")
                row[label] = _run_one(
                    dep, APP, transport, mib, rounds, tdir / f"{label}.npz", timeout
                )
                log(
                    f"[{transport}]   round {row[label]['round_s']:.2f} s, SuperLink peak "
                    f"{_mib(row[label]['superlink_peak_rss'])} "
                    f"({time.perf_counter() - t0:.0f} s)"
                )
            row["overhead_s"] = row["payload"]["round_s"] - row["floor"]["round_s"]
            rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], size_mib: float, floor_mib: float) -> str:
    head = (
        f"{'transport':<22} {'round (floor)':>13} {'round (' + f'{size_mib:g}' + ' MiB)':>15} "
        f"{'overhead':>9} {'SuperLink peak':>15} {'serverapp peak':>15} "
        f"{'via Flower':>11} {'via link':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        p, f = r["payload"], r["floor"]
        st = p["stats"]
        via_flower = st.get("inband_bytes_sent", 0) + st.get("inband_bytes_received", 0)
        via_link = st.get("link_bytes_sent", 0) + st.get("link_bytes_received", 0)
        lines.append(
            f"{r['transport']:<22} {f['round_s']:>12.2f}s {p['round_s']:>14.2f}s "
            f"{r['overhead_s']:>8.2f}s {_mib(p['superlink_peak_rss']):>15} "
            f"{_mib(p['superlink_children_peak_rss'].get('flwr-serverapp', 0)):>15} "
            f"{_mib(via_flower):>11} {_mib(via_link):>11}"
        )
    lines.append(
        f"(floor: {floor_mib:g} MiB model, always in-band; overhead = round time minus "
        "floor; round = median of rounds 2..N; bytes summed over all rounds, both directions)"
    )
    base = next((r for r in rows if r["transport"] == "inband"), None)
    if base is not None:
        for r in rows:
            if r is base:
                continue
            if r["overhead_s"] > 0:
                ratio = base["overhead_s"] / r["overhead_s"]
                lines.append(
                    f"in-band overhead / {r['transport']} overhead = "
                    f"{base['overhead_s']:.2f} / {r['overhead_s']:.2f} = {ratio:.1f}x"
                )
            else:
                lines.append(
                    f"in-band overhead / {r['transport']} overhead: {r['transport']} "
                    f"overhead {r['overhead_s']:.2f} s is within the floor's noise"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=float, default=500.0, help="big model size (MiB)")
    ap.add_argument("--floor-mib", type=float, default=0.5, help="tiny model size (MiB)")
    ap.add_argument(
        "--transports",
        default="inband,shm://",
        help="comma-separated transport URLs ('inband', 'shm://', 'file:///dir', ...)",
    )
    ap.add_argument("--rounds", type=int, default=3, help="round 1 is a warm-up")
    ap.add_argument("--supernodes", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1200.0, help="per flwr run (s)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep logs here")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)

    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    if not transports:
        ap.error("--transports is empty")
    if not (0 < args.floor_mib < args.size_mib):
        ap.error("need 0 < --floor-mib < --size-mib")
    if args.rounds < 1 or args.supernodes < 2:
        ap.error("need --rounds >= 1 and --supernodes >= 2 (the app's FedAvg wants 2)")

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="ftx-e2e-")
        workdir = Path(tmp.name)
    else:
        workdir = args.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    try:
        rows = run_benchmark(
            transports,
            args.size_mib,
            args.floor_mib,
            args.rounds,
            args.supernodes,
            workdir,
            args.timeout,
            log=lambda m: print(m, file=sys.stderr, flush=True),
        )
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(format_table(rows, args.size_mib, args.floor_mib))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": vars(args) | {"json": str(args.json), "workdir": str(args.workdir)},
                    "rows": rows,
                },
                indent=2,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
