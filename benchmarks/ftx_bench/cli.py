"""``ftx-bench``: point-to-point and end-to-end benchmarks.

    ftx-bench p2p [--sizes 1MB,10MB,100MB,1GB] [--backends raw-tcp,grpc-unary,...]
                              [--concurrency 1,4] [--repeat 5] [--warmup 1]
                              [--wan lan|geo-proximal|geo-distributed|RTTms/RATEmbit]
                              [--out DIR] [--no-plots]
    ftx-bench e2e [--sizes 10MiB,100MiB] [--transports inband,shm://,tcp://]
                              [--nodes 2] [--rounds 2] [--floor-mib 0.01] [--floor-once]
                              [--wan PROFILE [--topology pair|star] [--server-rate 1gbit]
                               [--client-rate 5gbit]] [--out DIR] [--no-plots]
    ftx-bench wan [--profile geo-distributed]   # bring a WAN up, measure, tear down
                              [--streams 1,4] [--size 64MiB] [--relay auto|c|python]
    ftx-bench wan --cleanup                     # remove namespaces of dead runs
    ftx-bench plot DIR/e2e.json DIR2/e2e.json --out e2e-profiles.png
    ftx-bench reproduce TABLE|all [--repeat 3] [--quick]   # a published table, with repeats
    ftx-bench render [--check]                  # the figure blocks in README.md and docs/
    ftx-bench plot --x nodes N2/e2e.json N4/e2e.json N8/e2e.json --out nodes.png
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from flwr_transports.codec import parse_size


def _sizes(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        n = parse_size(part)
        if n <= 0 or n > 64 * 1024**3:
            raise argparse.ArgumentTypeError(f"size {part!r} out of range (1 B .. 64 GiB)")
        out.append(n)
    if not out:
        raise argparse.ArgumentTypeError("no sizes given")
    return out


def _ints(text: str) -> list[int]:
    try:
        xs = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}")
    if not xs or any(x < 1 or x > 64 for x in xs):
        raise argparse.ArgumentTypeError("values must be integers in 1..64")
    return xs


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _default_out(kind: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("bench-results") / f"{kind}-{stamp}"


def _parser() -> argparse.ArgumentParser:
    from .p2p import ALL_BACKENDS, DEFAULT_BACKENDS
    from .wan import PROFILES

    ap = argparse.ArgumentParser(prog="ftx-bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    profiles = ", ".join(f"{p.describe()}" for p in PROFILES.values())

    def relay_opt(p: argparse.ArgumentParser) -> None:
        p.add_argument("--relay", choices=("auto", "c", "python"), default="auto",
                       help="WAN delay relay: the C one (compiled at first use; auto falls "
                            "back to Python without a compiler) or the Python one")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--wan", metavar="PROFILE", default=None,
                       help=f"emulate a WAN between the two sides (needs root): {profiles}; "
                            f"or RTTms/RATEmbit, e.g. 50ms/500mbit")
        relay_opt(p)
        p.add_argument("--out", type=Path, default=None,
                       help="output directory (default bench-results/<kind>-<time>)")
        p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
        p.add_argument("--repeat", type=int, default=None, help="measured runs per point")

    p = sub.add_parser("p2p", help="point-to-point transfers, one sender to K receivers")
    p.add_argument("--sizes", type=_sizes, default=_sizes("1MB,10MB,100MB,1GB"),
                   help="payload sizes, e.g. 1MB,10MB,100MB,1GB (default)")
    p.add_argument("--backends", type=_names, default=list(DEFAULT_BACKENDS),
                   help=f"comma-separated subset of: {', '.join(ALL_BACKENDS)}. "
                        "torch-rpc (PyTorch RPC over TensorPipe's TCP transport) and "
                        "torch-rpc-shm (TensorPipe's same-host shm/cma) need "
                        "'pip install torch==2.13.0'; link-s3-radosgw starts a one-node "
                        "Ceph radosgw per point (ftx_bench.radosgw; under --wan in "
                        "the sender's namespace; "
                        "'python -m ftx_bench.radosgw fetch' once)")
    p.add_argument("--concurrency", type=_ints, default=[1, 4],
                   help="numbers of concurrent receivers K (default 1,4)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs per point (default 1)")
    common(p)

    e = sub.add_parser("e2e", help="a real Flower deployment (SuperLink + SuperNodes + flwr run)")
    e.add_argument("--sizes", type=_sizes, default=_sizes("10MiB,100MiB"),
                   help="model sizes (default 10MiB,100MiB)")
    e.add_argument("--transports", type=_names, default=["inband", "shm://", "tcp://"],
                   help="inband, shm://, file://, tcp://, rdma:// (e.g. rdma://?ucx_tls=tcp), "
                        "s3:// (an embedded moto server), s3://?store=radosgw (a one-node "
                        "Ceph radosgw, real SigV4; in the store namespace with --topology "
                        "star); default inband,shm://,tcp://")
    e.add_argument("--nodes", type=int, default=2, help="SuperNodes (default 2)")
    e.add_argument("--rounds", type=int, default=2, help="server rounds per run (default 2)")
    e.add_argument("--floor-mib", type=float, default=0.01,
                   help="model size of the control-plane floor run (default 0.01 MiB; 0: skip)")
    e.add_argument("--floor-once", action="store_true",
                   help="one floor run (with the first transport) for all transports: the "
                        "tiny model stays in-band whatever the transport (saves a floor run "
                        "per transport)")
    e.add_argument("--timeout", type=float, default=900, help="seconds per flwr run")
    e.add_argument("--weights", default=None, metavar="DIR|trained",
                   help="trained weights instead of the app's N(0,1) model: a directory "
                        "written by benchmarks/trained_weights.py, or 'trained' (the "
                        "llm-offload example's 125m GPT after 5 rounds, 475 MiB fp32, "
                        "trained once into ~/.cache/ftx-bench/trained-125m; needs torch). "
                        "The server starts from it, each client replies a recorded round of "
                        "real training; --sizes is ignored and no floor run is made")
    e.add_argument("--app", type=Path, default=None,
                   help="Flower app directory (default examples/quickstart-offload)")
    e.add_argument("--topology", choices=("pair", "star"), default="pair",
                   help="with --wan: 'pair' (server side A, all SuperNodes in one namespace B "
                        "behind one shaped link; default) or 'star' (the object store in the "
                        "server's region, one namespace and one shaped link per SuperNode)")
    e.add_argument("--server-rate", default=None, metavar="RATE",
                   help="star: the server's uplink, e.g. 1gbit (default: the profile's rate)")
    e.add_argument("--client-rate", default=None, metavar="RATE",
                   help="star: each SuperNode's link, each way (default: the profile's rate)")
    common(e)

    w = sub.add_parser("wan", help="bring an emulated WAN up, measure RTT and throughput, "
                                   "tear it down")
    w.add_argument("--profile", default="geo-distributed")
    w.add_argument("--streams", type=_ints, default=[1, 4],
                   help="raw TCP stream counts to measure (default 1,4)")
    w.add_argument("--size", type=parse_size, default=parse_size("64MiB"),
                   help="bytes per stream per transfer (default 64MiB)")
    relay_opt(w)
    w.add_argument("--cleanup", action="store_true",
                   help="remove ftxb-* namespaces left by runs whose process is gone")
    sub.add_parser("flood", add_help=False,
                   help="an honest tcp:// transfer while one node floods the payload server "
                        "with idle connections (see: bench flood --help)")
    pl = sub.add_parser("plot", help="one E2E figure from several e2e.json (e.g. one per "
                                     "WAN profile)")
    pl.add_argument("inputs", nargs="+", type=Path, help="e2e.json files")
    pl.add_argument("--out", type=Path, default=Path("e2e-profiles.png"))
    pl.add_argument("--x", choices=("profile", "nodes"), default="profile",
                    help="profile: bars per transport and WAN profile (default); nodes: round "
                         "time vs number of SuperNodes, a line per transport and uplink")
    from .reproduce import TABLES

    r = sub.add_parser("reproduce", help="regenerate one published table with repeats "
                                         "(JSON in docs/bench-data/repro-TABLE.json)")
    r.add_argument("table", choices=[*TABLES, "all"])
    r.add_argument("--repeat", type=int, default=None,
                   help="repeats per point (default 3; 1 with --quick)")
    r.add_argument("--quick", action="store_true",
                   help="tiny sizes, for CI (writes bench-results/repro-TABLE-quick.json)")
    r.add_argument("--out", type=Path, default=None, help="JSON path (one table only)")
    r.add_argument("--max-retries", type=int, default=None,
                   help="re-runs of a repeat whose load before it exceeded the core count "
                        "(default 3; 1 with --quick)")
    r.add_argument("--pause", type=float, default=60.0,
                   help="seconds to wait before such a re-run (default 60)")
    rd = sub.add_parser("render", help="regenerate the figure blocks in README.md and "
                                       "docs/*.md from docs/bench-data")
    rd.add_argument("--check", action="store_true",
                    help="change nothing; exit 1 when a block differs from its data")
    return ap


def cmd_plot(args: argparse.Namespace) -> int:
    import json

    from .report import e2e_nodes_plot, e2e_profiles_plot

    docs = []
    for p in args.inputs:
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            _say(f"cannot read {p}: {exc}")
            return 2
        if not isinstance(doc, dict) or doc.get("kind") != "e2e":
            _say(f"{p} is not an e2e.json written by 'ftx-bench e2e'")
            return 2
        docs.append(doc)
    out = (e2e_nodes_plot if args.x == "nodes" else e2e_profiles_plot)(docs, args.out)
    if out is None:
        _say("nothing to plot (no results, or matplotlib missing: "
             "pip install -e benchmarks)")
        return 1
    print(out)
    return 0


def _with_wan(profile: str | None, relay: str = "auto", **star):
    """(context manager or None, description); None + reason when not possible.
    ``star``: topology, clients, server_rate_mbit, client_rate_mbit (see WanEmulation)."""
    if not profile:
        return None, None
    from .wan import WanEmulation, can_emulate, get_profile

    prof = get_profile(profile)  # validate even when we cannot emulate
    why = can_emulate()
    if why:
        _say(f"WAN emulation '{profile}' unavailable: {why}")
        return None, None
    w = WanEmulation(prof, relay=relay, **star)
    return w, w.describe()


def star_options(args: argparse.Namespace) -> dict[str, Any]:
    """WanEmulation keywords from the e2e options (ValueError on a bad rate / combination)."""
    from .e2e import split_s3_store
    from .wan import parse_rate

    for t in args.transports:
        if t.startswith("s3://"):
            split_s3_store(t)  # validates store=
    if args.topology == "pair":
        if args.server_rate or args.client_rate:
            raise ValueError("--server-rate/--client-rate need --topology star")
        return {}
    return {"topology": "star", "clients": args.nodes,
            "server_rate_mbit": parse_rate(args.server_rate) if args.server_rate else None,
            "client_rate_mbit": parse_rate(args.client_rate) if args.client_rate else None}


def _term_to_interrupt() -> None:
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            signal.signal(sig, handler)
        except ValueError:
            pass


def cmd_p2p(args: argparse.Namespace) -> int:
    from .p2p import ALL_BACKENDS, Placement, run_p2p
    from .report import write_outputs

    bad = [b for b in args.backends if b not in ALL_BACKENDS]
    if bad:
        _say(f"unknown backend(s): {', '.join(bad)} (known: {', '.join(ALL_BACKENDS)})")
        return 2
    repeat = args.repeat or 5
    if repeat < 1 or args.warmup < 0:
        _say("--repeat must be >= 1 and --warmup >= 0")
        return 2
    wan, desc = _with_wan(args.wan, args.relay)
    meta: dict[str, Any] = {
        "sizes": args.sizes, "backends": args.backends, "concurrency": args.concurrency,
        "repeat": repeat, "warmup": args.warmup, "wan": args.wan if wan else None,
        "wan_desc": desc,
    }
    if wan is None:
        rows = run_p2p(args.sizes, args.backends, args.concurrency, repeat, args.warmup,
                       progress=_say)
    else:
        with wan:
            meta["wan_measured_rtt_ms"] = wan.measure_rtt_ms()
            _say(f"WAN up: {desc} (measured TCP connect RTT "
                 f"{meta['wan_measured_rtt_ms']:.2f} ms)")
            place = Placement(host=wan.addr_a, sender_prefix=wan.prefix("a"),
                              receiver_prefix=wan.prefix("b"), wan=True)
            rows = run_p2p(args.sizes, args.backends, args.concurrency, repeat, args.warmup,
                           place=place, progress=_say)
    out = args.out or _default_out("p2p")
    paths = write_outputs("p2p", rows, meta, out, plots=not args.no_plots)
    print((Path(paths["markdown"])).read_text(encoding="utf-8"))
    for k, v in paths.items():
        _say(f"{k}: {v}")
    return 0 if not any("error" in r for r in rows) else 1


TRAINED_DEFAULT = Path("~/.cache/ftx-bench/trained-125m")


def _trained_weights(spec: str) -> tuple[Path, int]:
    """``--weights`` -> (directory, model bytes); 'trained' trains the default set once."""
    import subprocess

    if spec == "trained":
        out = TRAINED_DEFAULT.expanduser().resolve()
        script = Path(__file__).resolve().parents[1] / "trained_weights.py"
        r = subprocess.run([sys.executable, str(script), "--out", str(out)], check=False)
        if r.returncode != 0:
            raise RuntimeError(f"{script.name} failed ({r.returncode})")
    else:
        out = Path(spec).expanduser().resolve()
    try:
        idx = json.loads((out / "index.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{out} holds no trained weights (index.json): run "
                         f"benchmarks/trained_weights.py --out {out}") from None
    return out, int(idx["elements"]) * 4


def cmd_e2e(args: argparse.Namespace) -> int:
    from .e2e import run_e2e
    from .report import write_outputs

    if not 1 <= args.nodes <= 32 or not 1 <= args.rounds <= 100:
        _say("--nodes must be in 1..32 and --rounds in 1..100")
        return 2
    repeat = args.repeat or 1
    try:
        star = star_options(args)
    except ValueError as exc:
        _say(str(exc))
        return 2
    weights_dir = None
    if args.weights:
        try:
            weights_dir, size = _trained_weights(args.weights)
        except (OSError, ValueError, RuntimeError) as exc:
            _say(str(exc))
            return 2
        args.sizes, args.floor_mib = [size], 0.0
        _say(f"trained weights: {weights_dir} ({size / 2**20:.1f} MiB)")
    wan, desc = _with_wan(args.wan, args.relay, **star)
    meta: dict[str, Any] = {
        "sizes_mib": [s / 2**20 for s in args.sizes], "transports": args.transports,
        "nodes": args.nodes, "rounds": args.rounds, "repeat": repeat,
        "floor_mib": args.floor_mib, "floor_once": args.floor_once,
        "wan": args.wan if wan else None, "wan_desc": desc,
        "topology": star.get("topology", "pair") if wan else None,
        "server_rate_mbit": wan.server_rate_mbit if wan else None,
        "client_rate_mbit": wan.client_rate_mbit if wan else None,
        "load_before": os.getloadavg(),
        "weights": str(weights_dir) if weights_dir else None,
    }
    if weights_dir:
        meta["weights_settings"] = json.loads(
            (weights_dir / "index.json").read_text(encoding="utf-8"))["settings"]
    kw = {"sizes_mib": meta["sizes_mib"], "transports": args.transports, "nodes": args.nodes,
              "rounds": args.rounds, "floor_mib": args.floor_mib, "repeat": repeat,
              "timeout": args.timeout, "app": args.app, "progress": _say,
              "floor_once": args.floor_once, "weights_dir": weights_dir}
    if wan is None:
        rows, ratios = run_e2e(**kw)
    else:
        with wan:
            meta["wan_measured_rtt_ms"] = wan.measure_rtt_ms()
            _say(f"WAN up: {desc} (measured RTT {meta['wan_measured_rtt_ms']:.2f} ms)")
            if wan.ns_s:
                meta["wan_store_rtt_ms"] = {"server": wan.measure_rtt_ms(dst="s"),
                                            "client": wan.measure_rtt_ms(src="b", dst="s")}
                _say(f"store RTT: {meta['wan_store_rtt_ms']}")
            rows, ratios = run_e2e(wan=wan, **kw)
    meta["load_after"] = os.getloadavg()
    meta["ratios"] = ratios
    out = args.out or _default_out("e2e")
    paths = write_outputs("e2e", rows, meta, out, plots=not args.no_plots)
    print(Path(paths["markdown"]).read_text(encoding="utf-8"))
    for k, v in paths.items():
        _say(f"{k}: {v}")
    return 0 if not any("error" in r for r in rows) else 1


def cmd_wan(args: argparse.Namespace) -> int:
    from .wan import WanEmulation, can_emulate, cleanup_stale, get_profile

    if args.cleanup:
        for ns in cleanup_stale():
            print(f"removed {ns}")
        return 0
    prof = get_profile(args.profile)
    why = can_emulate()
    if why:
        _say(f"WAN emulation unavailable: {why}")
        return 1
    from .p2p import Placement, run_p2p

    if not 0 < args.size <= 4 * 1024**3:
        _say("--size must be in 1 B .. 4 GiB")
        return 2
    with WanEmulation(prof, relay=args.relay) as wan:
        rtt = wan.measure_rtt_ms()
        print(f"{prof.describe()}: measured TCP connect RTT {rtt:.2f} ms; "
              f"delay: {wan.relay_note}")
        place = Placement(host=wan.addr_a, sender_prefix=wan.prefix("a"),
                          receiver_prefix=wan.prefix("b"), wan=True)
        for k in args.streams:
            cpu0, t0 = wan.relay_cpu_seconds(), time.perf_counter()
            rows = run_p2p([args.size], ["raw-tcp"], [k], 2, 1, place=place, progress=_say)
            cpu1, wall = wan.relay_cpu_seconds(), time.perf_counter() - t0
            cpu = (f", relay CPU {100 * (cpu1 - cpu0) / wall:.0f}% of a core over the "
                   f"{wall:.1f} s run" if cpu0 is not None and cpu1 is not None else "")
            for r in rows:
                if "throughput_Gbps" in r:
                    print(f"raw TCP, {r['k']} stream(s): "
                          f"{r['throughput_Gbps'] * 1000:.0f} Mbit/s{cpu}", flush=True)
        if wan.relay is not None:
            for d, st in zip(("A->B", "B->A"), wan.relay_stats()):
                print(f"relay {d}: {st.get('frames', 0):.0f} frames, "
                      f"{st.get('bytes', 0) / 1e9:.2f} GB, drops {st.get('drops_full', 0):.0f} "
                      f"(queue full) + {st.get('drops_send', 0):.0f} (send), late avg "
                      f"{st.get('late_avg_us', 0):.0f} us max {st.get('late_max_us', 0):.0f} us, "
                      f"queue max {st.get('queue_max_bytes', 0) / 2**20:.1f} MiB")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["flood"]:  # its own options (ftx_bench.flood)
        from .flood import main as flood_main

        return flood_main(argv[1:])
    args = _parser().parse_args(argv)
    _term_to_interrupt()
    try:
        if args.cmd == "p2p":
            return cmd_p2p(args)
        if args.cmd == "e2e":
            return cmd_e2e(args)
        if args.cmd == "plot":
            return cmd_plot(args)
        if args.cmd == "reproduce":
            from .reproduce import main as reproduce_main

            return reproduce_main(args, ["ftx-bench", *argv])
        if args.cmd == "render":
            from .render import main as render_main

            return render_main(check=args.check)
        return cmd_wan(args)
    except ValueError as exc:
        _say(f"ftx-bench: {exc}")
        return 2
    except KeyboardInterrupt:
        _say("interrupted; everything started was removed")
        return 130


if __name__ == "__main__":
    sys.exit(main())
