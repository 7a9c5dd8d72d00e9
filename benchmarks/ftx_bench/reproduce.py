"""``ftx-bench reproduce TABLE``: regenerate one published table, with repeats.

Every table is a list of driver invocations (``ftx-bench e2e``, ``ftx-bench p2p``, the
standalone scripts). Each repeat runs the whole invocation once, so the in-band run and
the link runs of one repeat happen back to back; ratios are computed per repeat and the
table reports their median with min-max, next to the median (min-max) of every point.

Each JSON records the code's commit (and whether the tree was dirty), Flower's version,
the command line, and the load average before and after every run. A run whose
1-minute load before it already exceeded the core count is run again (at most
``--max-retries`` times, after a pause); the discarded attempts stay in the JSON.

    ftx-bench reproduce loopback-e2e [--repeat 3] [--quick] [--out FILE]
    ftx-bench reproduce all
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The one floor definition, used by every table and stated once in docs/benchmarks.md.
FLOOR_DEFINITION = (
    "floor = the round time of a 0.01 MiB model (it stays in-band whatever the "
    "transport), measured once per repeat right before that repeat's model runs; "
    "overhead = round time - floor; ratio = in-band overhead / transport overhead of "
    "the same repeat; a figure is the median over the repeats, with min-max")

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"


@dataclass
class Invocation:
    """One driver command (without --out); ``key`` names its points in the JSON."""

    key: str
    argv: list[str]
    kind: str  # "e2e" | "p2p" | "fda" | "text" | "json"; "{repeat}" in argv: 0, 1, ...
    needs_root: bool = False


@dataclass
class Table:
    name: str
    title: str
    full: list[Invocation]
    quick: list[Invocation]
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: False for a table whose figures do not depend on the machine's load (peak RSS,
    #: byte counts, accuracy): its runs do not wait for the load to fall and are not
    #: repeated for it (the load is still recorded before and after each run)
    load_sensitive: bool = True


def _e2e(*args: str) -> list[str]:
    return [sys.executable, "-m", "ftx_bench", "e2e", "--floor-once", "--repeat", "1",
            "--no-plots", *args]


def _p2p(*args: str) -> list[str]:
    return [sys.executable, "-m", "ftx_bench", "p2p", "--repeat", "1", "--warmup", "1",
            "--no-plots", *args]


def _memory_links(name: str, which: str, transports: str, quick: str, notes: str) -> Table:
    """The ServerApp's peak RSS at N = 2 and N = 8 (128 MiB, streaming aggregation) on
    ``transports`` (quick: 4 MiB, N = 2 and 3, on ``quick``)."""
    return Table(name, f"ServerApp memory, N = 2 vs N = 8, {which}, streaming "
                 "aggregation, 128 MiB",
                 [Invocation(f"128MiB-N{n}", _e2e("--sizes", "128MiB", "--transports",
                                                  transports, "--nodes", str(n), "--rounds",
                                                  "2", "--floor-mib", "0"), "e2e")
                  for n in (2, 8)],
                 [Invocation(f"4MiB-N{n}", _e2e("--sizes", "4MiB", "--transports", quick,
                                                "--nodes", str(n), "--rounds", "1",
                                                "--floor-mib", "0"), "e2e")
                  for n in (2, 3)],
                 notes=notes, load_sensitive=False)


_STAR = ("--wan", "geo-distributed", "--topology", "star")
_RGW = "inband,tcp://,s3://?store=radosgw"
_CODECS = ("tcp://,tcp://?codec=delta,s3://?store=radosgw,s3://?store=radosgw&codec=delta,"
           "s3://?store=radosgw&segment=64MiB")

TABLES: dict[str, Table] = {t.name: t for t in [
    Table("loopback-e2e", "End to end, loopback, 500 MiB, 2 SuperNodes",
          [Invocation("500MiB", _e2e("--sizes", "500MiB", "--transports",
                                     "inband,shm://,tcp://", "--rounds", "2"), "e2e")],
          [Invocation("4MiB", _e2e("--sizes", "4MiB", "--transports", "inband,shm://",
                                   "--rounds", "1"), "e2e")]),
    Table("wan-e2e", "End to end across 100 ms RTT, 5 Gbit/s (star: radosgw in the "
                     "server's region)",
          [Invocation("500MiB", _e2e(*_STAR, "--sizes", "500MiB", "--transports", _RGW,
                                     "--nodes", "2", "--rounds", "2"), "e2e", True)],
          [Invocation("8MiB", _e2e(*_STAR, "--sizes", "8MiB", "--transports",
                                   "inband,tcp://", "--nodes", "2", "--rounds", "1"),
                      "e2e", True)]),
    Table("wan-codecs", "Codecs (and segmented s3:// replies) across 100 ms RTT, 5 Gbit/s "
                        "(star, radosgw), trained weights (475 MiB fp32 GPT), 2 SuperNodes",
          [Invocation("trained", _e2e(*_STAR, "--weights", "trained", "--transports",
                                      _CODECS, "--nodes", "2", "--rounds", "2"), "e2e", True)],
          [Invocation("8MiB", _e2e(*_STAR, "--sizes", "8MiB", "--transports",
                                   "tcp://,tcp://?codec=delta", "--nodes", "2", "--rounds",
                                   "1", "--floor-mib", "0"), "e2e", True)],
          notes="each client replies the model it received plus a recorded round of real "
                "training (benchmarks/trained_weights.py: the llm-offload example's 125m GPT "
                "after 5 rounds of 2 AdamW steps at lr 1e-3; fp32); no floor run: the "
                "ratios are raw round / codec round on the same link, per repeat; "
                "s3://...&segment=64MiB: raw replies uploaded as segments folded as they "
                "land (issue 24), compared with s3:// by its aggregation tail"),
    Table("n-sweep", "N SuperNodes behind a 1 Gbit/s server uplink, 64 MiB",
          [Invocation(f"N{n}", _e2e(*_STAR, "--server-rate", "1gbit", "--sizes", "64MiB",
                                    "--transports", _RGW, "--nodes", str(n),
                                    "--rounds", "2"), "e2e", True) for n in (2, 4, 8)],
          [Invocation(f"N{n}", _e2e(*_STAR, "--server-rate", "1gbit", "--sizes", "2MiB",
                                    "--transports", "inband,tcp://", "--nodes", str(n),
                                    "--rounds", "1"), "e2e", True) for n in (2, 4)]),
    Table("p2p-link", "Point to point: link throughput vs raw TCP",
          [Invocation("lo", _p2p("--sizes", "1MB,10MB,100MB", "--backends",
                                 "raw-tcp,link-tcp,link-shm,link-file,link-s3",
                                 "--concurrency", "1,4"), "p2p"),
           Invocation("geo-distributed", _p2p("--wan", "geo-distributed", "--sizes",
                                              "100MB,1GB", "--backends",
                                              "raw-tcp,link-tcp", "--concurrency", "1"),
                      "p2p", True)],
          [Invocation("lo", _p2p("--sizes", "1MB", "--backends", "raw-tcp,link-tcp",
                                 "--concurrency", "1"), "p2p")]),
    Table("memory", "Memory vs N: streaming vs inner aggregation (shm://)",
          [Invocation(f"{mib}MiB-N{n}", _e2e("--sizes", f"{mib}MiB", "--transports",
                                             "shm://?aggregation=streaming,"
                                             "shm://?aggregation=inner",
                                             "--nodes", str(n), "--rounds", "2",
                                             "--floor-mib", "0"), "e2e")
           for mib, n in ((500, 2), (256, 4), (128, 8))],
          [Invocation("4MiB-N2", _e2e("--sizes", "4MiB", "--transports",
                                      "shm://?aggregation=streaming,"
                                      "shm://?aggregation=inner",
                                      "--nodes", "2", "--rounds", "1", "--floor-mib", "0"),
                      "e2e")],
          notes="peak RSS does not depend on the load: runs are not repeated for it",
          load_sensitive=False),
    _memory_links("memory-links", "every link", "shm://,file://,tcp://,rdma://,s3://",
                  "tcp://,shm://", "issue 24's target: the ServerApp's peak RSS at N = 8 "
                  "within half a model (64 MiB) of N = 2 on every link"),
    _memory_links("memory-links-chunked", "the chunked links (tcp://, rdma://) only",
                  "tcp://,rdma://", "tcp://",
                  "memory-links for the two links whose receive path changed last"),
    _memory_links("memory-links-tcp", "tcp:// only", "tcp://", "tcp://",
                  "memory-links for tcp:// alone (its receive path changed last)"),
    Table("mpi", "MPI runtime vs a Flower deployment (in-band and tcp://), 500 MiB",
          [Invocation("mpi", [sys.executable, str(BENCH / "mpi_bench.py"), "--mib", "500",
                              "--rounds", "2", "--reps", "1", "--skip-p2p"], "mpi"),
           Invocation("deployment", _e2e("--sizes", "500MiB", "--transports",
                                         "inband,tcp://", "--rounds", "2"), "e2e")],
          [Invocation("mpi", [sys.executable, str(BENCH / "mpi_bench.py"), "--mib", "4",
                              "--rounds", "1", "--reps", "1", "--skip-p2p"], "mpi")],
          notes="mpi: benchmarks/mpi_bench.py (tests/apps/mpi_app, clients echo the model; "
                "the same ServerApp/ClientApp also run in one process without a transport); "
                "deployment: ftx-bench e2e's app on loopback (2 SuperNodes). Each point's "
                "repeats run one after another; ratios pair the i-th repeats"),
    Table("fda-bytes", "FDA: accuracy vs bytes (8 clients, 400 steps; each repeat "
                       "another seed: another data set, split and initial model)",
          [Invocation("alpha1.0", [sys.executable, str(BENCH / "fda_bench.py"), "--steps",
                                   "400", "--lr", "0.1", "--alpha", "1.0", "--theta", "0.5",
                                   "1", "2", "--seed", "{repeat}"], "fda"),
           Invocation("alpha0.5", [sys.executable, str(BENCH / "fda_bench.py"), "--steps",
                                   "400", "--lr", "0.1", "--alpha", "0.5", "--theta", "0.5",
                                   "1", "--seed", "{repeat}"], "fda")],
          [Invocation("fda", [sys.executable, str(BENCH / "fda_bench.py"), "--steps", "10",
                              "--clients", "2", "--per-client", "100", "--theta", "1",
                              "--variants", "naive", "--seed", "{repeat}"], "fda")],
          notes="bytes and accuracy do not depend on the load: runs are not repeated "
                "for it; a repeat is another seed (fda_bench.py --seed)",
          load_sensitive=False),
]}


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], check=False, cwd=REPO, capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def provenance(argv: list[str]) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        flwr = version("flwr")
    except PackageNotFoundError:
        flwr = None
    return {
        "commit": _git("rev-parse", "HEAD") or None,
        # edits to the docs (README.md, *.md, docs/: where the figures go) change no
        # measurement; any other uncommitted change to a tracked file does
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".",
                           ":(exclude)docs", ":(exclude)*.md")),
        "flwr_version": flwr,
        "command": " ".join(shlex.quote(a) for a in argv),
        "cpus": os.cpu_count(),
        "time_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "floor_definition": FLOOR_DEFINITION,
    }


def _stats(xs: list[float]) -> dict[str, Any]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs),
            "values": xs}


def e2e_points(doc: dict[str, Any]) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Per point (``transport@size``): round, overhead above this run's floor, peak
    RSS; and in-band/transport overhead ratios (and, for a transport with a codec, the
    same link's raw round / its round). One e2e.json = one repeat."""
    from .e2e import without_codec

    rows = doc.get("results", [])
    floors = [r["round_s"] for r in rows if r.get("kind") == "floor" and "round_s" in r]
    floor = statistics.median(floors) if floors else None
    pts: dict[str, dict[str, float]] = {}
    for r in rows:
        if r.get("kind") == "floor" or "round_s" not in r:
            continue
        key = f"{r['transport']}@{r['model_mib']:g}MiB"
        pts[key] = {"round_s": r["round_s"],
                    "superlink_peak_rss_mib": r.get("superlink_peak_rss_bytes", 0) / 2**20,
                    "serverapp_peak_rss_mib": r.get("serverapp_peak_rss_bytes", 0) / 2**20}
        if r.get("agg_tail_s") is not None:  # last upload landed -> aggregate_train returned
            pts[key]["agg_tail_s"] = r["agg_tail_s"]
        if r.get("agg_tail_max_s") is not None:
            pts[key]["agg_tail_max_s"] = r["agg_tail_max_s"]
        bm = r.get("breakdown_mean") or {}
        for m in ("to_server", "landed_to_reply"):  # the traced train rounds' mean
            if isinstance(bm.get(m), int | float):
                pts[key][f"{m}_s"] = float(bm[m])
        for m, v in bm.items():  # the whole mean train round (docs/trace.md)
            if isinstance(v, int | float) and not isinstance(v, bool):
                pts[key][f"trace_{m}"] = float(v)
        for m in ("server_tx_bytes", "server_rx_bytes"):  # the server's WAN uplink
            if isinstance(r.get(m), int | float):
                pts[key][m.replace("_bytes", "_mib")] = r[m] / 2**20
        if floor is not None:
            pts[key]["floor_s"] = floor
            pts[key]["overhead_s"] = r["round_s"] - floor
    ratios: dict[str, float] = {}
    for key, p in pts.items():
        t, size = key.split("@")
        raw_t = without_codec(t)  # a codec: the same link's raw round / this round
        if raw_t is not None and f"{raw_t}@{size}" in pts and p["round_s"] > 0:
            ratios[f"{raw_t}/{t}@{size} round"] = pts[f"{raw_t}@{size}"]["round_s"] / p["round_s"]
        base = pts.get(f"inband@{size}")
        if t == "inband" or base is None or "overhead_s" not in p:
            continue
        if p["overhead_s"] > 0:
            ratios[f"inband/{t}@{size} overhead"] = base["overhead_s"] / p["overhead_s"]
        ratios[f"inband/{t}@{size} round"] = base["round_s"] / p["round_s"]
    return pts, ratios


def p2p_points(doc: dict[str, Any]) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    pts: dict[str, dict[str, float]] = {}
    for r in doc.get("results", []):
        if "throughput_Gbps" in r:
            pts[f"{r['backend']}@{r['size_bytes']}B/k{r['k']}"] = {
                "throughput_Gbps": r["throughput_Gbps"]}
    ratios = {}
    for key, p in pts.items():
        b, rest = key.split("@")
        raw = pts.get(f"raw-tcp@{rest}")
        if b != "raw-tcp" and raw and raw["throughput_Gbps"] > 0:
            ratios[f"{b}/raw-tcp@{rest} throughput"] = p["throughput_Gbps"] / raw["throughput_Gbps"]
    return pts, ratios


def fda_points(doc: dict[str, Any]) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Per method of one fda_bench.py run: syncs, final accuracy, MB in total and to the
    target (FedAvg's final accuracy minus the tolerance), and those MB over FedAvg's
    (absent where the target was not reached)."""
    runs = doc["runs"]
    target = float(doc["target"])

    def to_target(r: dict[str, Any]) -> float | None:
        return next((float(b) for b, acc in r["curve"] if acc >= target), None)

    fedavg = to_target(runs[0])
    pts: dict[str, dict[str, float]] = {}
    for r in runs:
        p = {"syncs": float(r["syncs"]), "final_acc": float(r["curve"][-1][1]),
             "mb_total": r["curve"][-1][0] / 1e6, "target_acc": target}
        b = to_target(r)
        if b is not None:
            p["mb_to_target"] = b / 1e6
            if fedavg:
                p["of_fedavg"] = b / fedavg
        pts[r["name"]] = p
    return pts, {}


_MPI_LINES = {
    "round_s": re.compile(r"median ([0-9.]+) s/round, whole job"),
    "job_s": re.compile(r"whole job ([0-9.]+) s incl\. startup"),
    "inprocess_round_s": re.compile(r"same app in one process, no transport: rounds (.*) s"),
}


def mpi_points(out: str, mib: str) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """mpi_bench.py's printed figures: the MPI job's median round and whole job, and the
    median round of the same app in one process (no transport)."""
    p: dict[str, float] = {}
    for m, rx in _MPI_LINES.items():
        hit = rx.search(out)
        if not hit:
            continue
        if m == "inprocess_round_s":
            xs = [float(x) for x in re.findall(r"[0-9]+\.[0-9]+", hit.group(1))]
            if xs:
                p[m] = statistics.median(xs)
        else:
            p[m] = float(hit.group(1))
    return ({f"mpi@{mib}MiB": p} if p else {}), {}


def run_once(inv: Invocation, out_dir: Path, timeout: float,
             repeat: int = 0) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    argv = [a.replace("{repeat}", str(repeat)) for a in inv.argv]
    if inv.kind in ("e2e", "p2p"):
        argv += ["--out", str(out_dir)]
    elif inv.kind in ("json", "fda"):
        argv += ["--json", str(out_dir / "out.json")]
    rec: dict[str, Any] = {"argv": argv, "load_before": list(os.getloadavg())}
    t0 = time.perf_counter()
    # SIGTERM, not SIGKILL, on a timeout or an interrupt: the drivers turn it into
    # their own clean-up (SuperLink, SuperNodes, namespaces, /dev/shm segments)
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        rec["rc"] = proc.returncode
    except (subprocess.TimeoutExpired, KeyboardInterrupt) as exc:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        if isinstance(exc, KeyboardInterrupt):
            raise
        rec["rc"], out = "timeout", f"{out}\ntimed out after {timeout} s"
    rec["wall_s"] = time.perf_counter() - t0
    rec["load_after"] = list(os.getloadavg())
    rec["output_tail"] = out[-2000:]
    if inv.kind in ("e2e", "p2p"):
        path = out_dir / f"{inv.kind}.json"
        if path.exists():
            doc = json.loads(path.read_text(encoding="utf-8"))
            pts, ratios = (e2e_points if inv.kind == "e2e" else p2p_points)(doc)
            rec.update(points=pts, ratios=ratios, driver_json=str(path))
    elif inv.kind == "mpi":
        mib = argv[argv.index("--mib") + 1] if "--mib" in argv else "?"
        rec["points"], rec["ratios"] = mpi_points(out, mib)
    elif inv.kind in ("json", "fda") and (out_dir / "out.json").exists():
        rec["driver_json"] = str(out_dir / "out.json")
        if inv.kind == "fda":
            rec["points"], rec["ratios"] = fda_points(
                json.loads((out_dir / "out.json").read_text(encoding="utf-8")))
    return rec


def aggregate(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    pts: dict[str, dict[str, list[float]]] = {}
    rat: dict[str, list[float]] = {}
    for rep in repeats:
        for key, p in rep.get("points", {}).items():
            for m, v in p.items():
                pts.setdefault(key, {}).setdefault(m, []).append(v)
        for key, v in rep.get("ratios", {}).items():
            rat.setdefault(key, []).append(v)
    return {"points": {k: {m: _stats(v) for m, v in ms.items()} for k, ms in pts.items()},
            "ratios": {k: _stats(v) for k, v in rat.items()}}


def wait_for_load(cores: int, limit_s: float, poll_s: float = 5.0) -> float:
    """Wait (at most ``limit_s``) until the 1-minute load is below the core count, so
    a repeat does not start in the load its predecessor left behind (and get discarded
    after running); returns the seconds waited."""
    t0 = time.monotonic()
    while os.getloadavg()[0] > cores and time.monotonic() - t0 < limit_s:
        time.sleep(poll_s)
    return time.monotonic() - t0


def reproduce(table: Table, repeat: int, quick: bool, out: Path, argv: list[str],
              max_retries: int = 3, pause_s: float = 60.0, timeout: float = 3600.0,
              progress: Callable[[str], None] = print) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    if not table.load_sensitive:
        max_retries = 0
    doc: dict[str, Any] = {"kind": "reproduce", "table": table.name, "title": table.title,
                           "quick": quick, "repeat": repeat, "notes": table.notes,
                           "load_sensitive": table.load_sensitive,
                           **provenance(argv), "invocations": {}}
    work = out.with_suffix("")
    ok = True
    for inv in (table.quick if quick else table.full):
        if inv.needs_root and os.geteuid() != 0:
            doc["invocations"][inv.key] = {"skipped": "needs root (network namespaces)"}
            progress(f"{table.name}/{inv.key}: skipped, needs root")
            ok = False
            continue
        reps, discarded = [], []
        for i in range(repeat):
            for attempt in range(max_retries + 1):
                progress(f"{table.name}/{inv.key}: repeat {i + 1}/{repeat}"
                         + (f" (retry {attempt})" if attempt else ""))
                waited = wait_for_load(cores, 3 * pause_s) if max_retries else 0.0
                rec = run_once(inv, work / inv.key / f"rep{i}-try{attempt}", timeout, i)
                rec["waited_for_load_s"] = round(waited, 1)
                rec["repeat"], rec["attempt"] = i, attempt
                if rec["load_before"][0] > cores and attempt < max_retries:
                    rec["discarded"] = (f"1-min load {rec['load_before'][0]:.2f} > "
                                        f"{cores} cores before the run")
                    discarded.append(rec)
                    time.sleep(pause_s)
                    continue
                if rec["load_before"][0] > cores and table.load_sensitive:
                    rec["load_warning"] = "load above the core count after every retry"
                reps.append(rec)
                break
            ok = ok and reps[-1].get("rc") == 0
        doc["invocations"][inv.key] = {"command": " ".join(shlex.quote(a) for a in inv.argv),
                                       "kind": inv.kind, "repeats": reps,
                                       "rerun_for_load": discarded, **aggregate(reps)}
    doc["ok"] = ok
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return doc


def default_out(name: str, quick: bool) -> Path:
    if quick:
        return REPO / "bench-results" / f"repro-{name}-quick.json"
    return REPO / "docs" / "bench-data" / f"repro-{name}.json"


def main(args, argv: list[str]) -> int:
    names = list(TABLES) if args.table == "all" else [args.table]
    if args.repeat is not None and args.repeat < 1:
        print("--repeat must be >= 1", file=sys.stderr)
        return 2
    repeat = args.repeat or (1 if args.quick else 3)
    rc = 0
    for name in names:
        out = args.out if (args.out and len(names) == 1) else default_out(name, args.quick)
        doc = reproduce(TABLES[name], repeat, args.quick, out, argv,
                        max_retries=(args.max_retries if args.max_retries is not None
                                     else 1 if args.quick else 3),
                        pause_s=5.0 if args.quick else args.pause,
                        progress=lambda m: print(m, file=sys.stderr, flush=True))
        print(out)
        rc = rc or (0 if doc["ok"] else 1)
    return rc
