"""``ftx-bench render``: the published figures, generated from docs/bench-data.

A block in README.md or docs/**.md::

    <!-- figures:begin NAME (generated from docs/bench-data/A.json by ftx-bench render) -->
    ... (replaced on every render) ...
    <!-- figures:end -->

is regenerated from the JSON files its begin marker names (several: space-separated;
``repro-T.json#KEY`` takes one invocation of a reproduce table);
``--check`` (and tests/test_figures.py) fails when a block differs from what the data
gives. The plots in docs/img are drawn from the JSON files ``PLOTS`` names; each PNG
carries the figures it was drawn from, so the check compares them with the data
(matplotlib, an optional dependency of the benchmarks package, is needed to draw only). Both the JSON of ``ftx-bench reproduce`` (median, min-max over repeats) and an
older single ``ftx-bench e2e`` JSON (which says "one run", its commit and its load) render.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .reproduce import FLOOR_DEFINITION, REPO

BLOCK = re.compile(
    r"(<!-- figures:begin (?P<name>[\w.-]+) \(generated from (?P<files>[^)]+?) by "
    r"ftx-bench render\) -->\n)(?P<body>.*?)(<!-- figures:end -->)", re.DOTALL)

DOC_FILES = ("README.md", "docs/*.md", "docs/links/*.md")


def doc_paths(root: Path = REPO) -> list[Path]:
    out: list[Path] = []
    for pat in DOC_FILES:
        out += sorted(root.glob(pat))
    return out


def _label(t: str) -> str:
    return "in-band" if t == "inband" else f"`{t}`"


def _rng(xs: list[float], fmt: str, unit: str = "") -> str:
    med = statistics.median(xs)
    if len(xs) == 1:
        return f"{med:{fmt}}{unit}"
    return f"{med:{fmt}}{unit} ({min(xs):{fmt}}-{max(xs):{fmt}})"


def _load(v: Any) -> str:
    return "/".join(f"{x:.2f}" for x in v) if v else "not recorded"


def _e2e_command(m: dict[str, Any]) -> str:
    parts = ["ftx-bench e2e", "--sizes " + ",".join(f"{s:g}MiB" for s in m["sizes_mib"]),
             "--transports " + ",".join(m["transports"]), f"--nodes {m.get('nodes', 2)}",
             f"--rounds {m.get('rounds', 2)}", f"--repeat {m.get('repeat', 1)}"]
    if m.get("wan"):
        parts.append(f"--wan {m['wan']}")
        if m.get("topology") == "star":
            parts.append("--topology star")
            if m.get("server_rate_mbit") and m.get("server_rate_mbit") != m.get(
                    "client_rate_mbit"):
                parts.append(f"--server-rate {m['server_rate_mbit'] / 1000:g}gbit")
    if m.get("floor_mib") is not None and m["floor_mib"] != 0.01:
        parts.append(f"--floor-mib {m['floor_mib']:g}")
    if m.get("floor_once"):
        parts.append("--floor-once")
    return " ".join(parts)


def _e2e_nrep(doc: dict[str, Any]) -> int:
    return max(len(r.get("round_s_all_repeats") or [r["round_s"]]) for r in doc["results"]
               if "round_s" in r)


def _e2e_header(doc: dict[str, Any], src: str) -> list[str]:
    """Runs, commit, Flower, date, cores, load before/after, command and data file."""
    m, env = doc["meta"], doc.get("environment", {})
    nrep = _e2e_nrep(doc)
    cpus = env.get("cpus")
    lb, la = m.get("load_before"), m.get("load_after") or env.get("loadavg")
    runs = "one run" if nrep == 1 else f"{nrep} runs (median, min-max)"
    return [f"**{runs}**, commit `{env.get('git_commit', '?')}` (older code version), "
            f"Flower {env.get('versions', {}).get('flwr', '?')}, "
            f"{env.get('time_utc', '?')[:10]}, {cpus} cores; load average before "
            f"{_load(lb)}, after {_load(la)}"
            + (" (**above the core count before the run**)"
               if lb and cpus and lb[0] > cpus else "")
            + (" (**above the core count after the run**)"
               if la and cpus and la[0] > cpus and not (lb and lb[0] > cpus) else "")
            + ".",
            f"Command (from the JSON's meta): `{_e2e_command(m)}`; data: `{src}`."]


def _legacy_e2e(doc: dict[str, Any], src: str) -> list[str]:
    """An older ``ftx-bench e2e`` JSON: runs of a point were consecutive, so repeats are
    paired by index; the floor of repeat i is the median of the floor runs' i-th repeat."""
    rows = doc["results"]
    nrep = _e2e_nrep(doc)

    def reps(r: dict[str, Any]) -> list[float]:
        return list(r.get("round_s_all_repeats") or [r["round_s"]])

    floors = [reps(r) for r in rows if r.get("kind") == "floor" and "round_s" in r]
    floor_i = ([statistics.median(f[i] for f in floors if i < len(f)) for i in range(nrep)]
               if floors else None)
    models = [r for r in rows if r.get("kind") != "floor" and "round_s" in r]
    out = _e2e_header(doc, src)
    out.append("")
    out.append("| transport | model | round time | overhead above the floor | "
               "in-band overhead / this | SuperLink peak RSS | ServerApp peak RSS |")
    out.append("|---|---:|---:|---:|---:|---:|---:|")
    base = {r["model_mib"]: reps(r) for r in models if r["transport"] == "inband"}
    for r in models:
        rr = reps(r)
        ov = [x - floor_i[i] for i, x in enumerate(rr)] if floor_i else None
        ratio = "—"
        if ov and r["transport"] != "inband" and r["model_mib"] in base:
            b = [x - floor_i[i] for i, x in enumerate(base[r["model_mib"]])]
            rs = [b[i] / ov[i] for i in range(min(len(b), len(ov))) if ov[i] > 0]
            ratio = _rng(rs, ".2f", "x") if rs else "—"
        out.append(f"| {_label(r['transport'])} | {r['model_mib']:g} MiB | "
                   f"{_rng(rr, '.1f', ' s')} | "
                   f"{_rng(ov, '.1f', ' s') if ov else '—'} | {ratio} | "
                   f"{r.get('superlink_peak_rss_bytes', 0) / 2**20:.0f} MiB | "
                   f"{r.get('serverapp_peak_rss_bytes', 0) / 2**20:.0f} MiB |")
    if floor_i:
        out.append("")
        out.append(f"Floor: {_rng(floor_i, '.1f', ' s')}.")
    return out


_COLUMN = {"round_s": "round time (s)", "overhead_s": "overhead above the floor (s)",
           "superlink_peak_rss_mib": "SuperLink peak RSS (MiB)",
           "serverapp_peak_rss_mib": "ServerApp peak RSS (MiB)",
           "throughput_Gbps": "throughput (Gbit/s)",
           "agg_tail_s": "aggregation tail, mean of the rounds (s)",
           "agg_tail_max_s": "aggregation tail, slowest round (s)",
           "to_server_s": "`to_server` (s)", "landed_to_reply_s": "`landed_to_reply` (s)",
           "server_tx_mib": "server uplink out (MiB, all rounds)",
           "server_rx_mib": "server uplink in (MiB, all rounds)"}
_TRACE_COLS = ["agg_tail_s", "agg_tail_max_s", "to_server_s", "landed_to_reply_s"]


def _reproduce_header(doc: dict[str, Any], src: str) -> list[str]:
    return [f"**{doc['repeat']} repeat(s) per point** (median, min-max), commit "
            f"`{(doc.get('commit') or '?')[:7]}`" + (" (dirty tree)" if doc.get("dirty") else "")
            + f", Flower {doc.get('flwr_version')}, {doc.get('time_utc', '?')[:10]}, "
            f"{doc.get('cpus')} cores"
            + (", **quick mode** (tiny sizes, not a published figure)" if doc.get("quick")
               else "") + ".",
            f"Command: `{doc['command']}`; data: `{src}`."]


def _fda_rows(inv: dict[str, Any]) -> list[str]:
    """fda_bench.py per method over the repeats (seeds): median (min-max); the MB to
    the target and their share of FedAvg's over the repeats that reached it."""
    n = len(inv["repeats"])
    tgt = next(iter(inv["points"].values()))["target_acc"]
    out = [(f"Target accuracy = FedAvg's final accuracy - 0.005 in each repeat: "
           f"{_rng(tgt['values'], '.4f')}."), "",
           ("| method | syncs | final accuracy | MB in total | MB to the target | "
           "of FedAvg's MB to the target | target reached |"),
           "|---|---:|---:|---:|---:|---:|---:|"]
    for name, ms in inv["points"].items():
        def cell(m: str, fmt: str, ms: dict[str, Any] = ms) -> str:
            st = ms.get(m)
            return _rng(st["values"], fmt) if st and st.get("n") else "—"
        reached = (ms.get("mb_to_target") or {}).get("n", 0)
        out.append(f"| {name} | {cell('syncs', '.0f')} | {cell('final_acc', '.4f')} | "
                   f"{cell('mb_total', '.1f')} | {cell('mb_to_target', '.1f')} | "
                   f"{cell('of_fedavg', '.3f')} | {reached} of {n} |")
    out.append("")
    return out


def _mpi_rows(inv: dict[str, Any], dep: dict[str, Any] | None) -> list[str]:
    """The MPI job's round next to the deployment's (the i-th repeats paired)."""
    out = [("| point | MPI round (s) | whole MPI job, start-up included (s) | same app in "
           "one process, no transport (s) |"), "|---|---:|---:|---:|"]
    for pk, ms in inv["points"].items():
        out.append(f"| {pk} | " + " | ".join(
            _rng(ms[c]["values"], ".2f") if (ms.get(c) or {}).get("n") else "—"
            for c in ("round_s", "job_s", "inprocess_round_s")) + " |")
    mpi = [r.get("points", {}) for r in inv["repeats"]]
    deps = [r.get("points", {}) for r in (dep or {}).get("repeats", [])]
    rows = []
    for t in ("inband", "tcp://"):
        xs = []
        for m, d in zip(mpi, deps, strict=False):
            mr = next((p.get("round_s") for p in m.values()), None)
            dr = next((p.get("round_s") for k, p in d.items() if k.split("@")[0] == t), None)
            if mr and dr:
                xs.append(dr / mr)
        if xs:
            rows.append(f"| deployment {_label(t)} round / MPI round | {_rng(xs, '.2f', 'x')} |")
    if rows:
        out += ["", "| ratio (the i-th repeats paired, then the median) | value |",
                "|---|---:|", *rows]
    out.append("")
    return out


def _reproduce(doc: dict[str, Any], src: str) -> list[str]:
    out = [*_reproduce_header(doc, src), ""]
    for key, inv in doc["invocations"].items():
        if "skipped" in inv:
            out.append(f"- {key}: not run ({inv['skipped']})")
            continue
        loads = [r["load_before"][0] for r in inv["repeats"]]
        reruns = len(inv.get("rerun_for_load", []))
        still = sum(1 for r in inv["repeats"] if r.get("load_warning"))
        out.append(f"{key}: load before each repeat {', '.join(f'{x:.2f}' for x in loads)}"
                   + (f"; {reruns} run(s) repeated because the load exceeded the cores"
                      if reruns else "")
                   + (f"; **{still} repeat(s) still above the core count after every "
                      "retry**" if still else "") + ".")
        out.append("")
        if inv["kind"] == "fda":
            out += _fda_rows(inv)
            continue
        if inv["kind"] == "mpi":
            out += _mpi_rows(inv, doc["invocations"].get("deployment"))
            continue
        if inv["kind"] not in ("e2e", "p2p"):
            out.append(f"(driver output kept in the JSON, {len(inv['repeats'])} repeat(s))")
            out.append("")
            continue
        if inv["kind"] == "p2p":
            metric_cols = ["throughput_Gbps"]
        elif doc.get("load_sensitive", True):
            metric_cols = ["round_s", "overhead_s", "superlink_peak_rss_mib",
                           "serverapp_peak_rss_mib"]
        else:  # peaks only: the round times of a table not guarded against load
            metric_cols = ["superlink_peak_rss_mib", "serverapp_peak_rss_mib"]
        if any("server_tx_mib" in ms for ms in inv["points"].values()):
            metric_cols += ["server_tx_mib", "server_rx_mib"]  # bytes: the codecs table
        if not any("overhead_s" in ms for ms in inv["points"].values()):
            metric_cols = [c for c in metric_cols if c != "overhead_s"]  # no floor run
        out.append("| point | " + " | ".join(_COLUMN.get(c, c) for c in metric_cols) + " |")
        out.append("|---|" + "---:|" * len(metric_cols))
        for pk, ms in inv["points"].items():
            cells = []
            for c in metric_cols:
                st = ms.get(c)
                cells.append(_rng(st["values"], ".1f" if "rss" in c else ".2f")
                             if st and st.get("n") else "—")
            out.append(f"| {pk} | " + " | ".join(cells) + " |")
        traced = {pk: ms for pk, ms in inv["points"].items()
                  if any((ms.get(c) or {}).get("n") for c in _TRACE_COLS)}
        if traced and doc.get("load_sensitive", True):
            out.append("")
            out.append("| point (traced train rounds) | "
                       + " | ".join(_COLUMN[c] for c in _TRACE_COLS) + " |")
            out.append("|---|" + "---:|" * len(_TRACE_COLS))
            for pk, ms in traced.items():
                out.append(f"| {pk} | " + " | ".join(
                    _rng(ms[c]["values"], ".2f") if (ms.get(c) or {}).get("n") else "—"
                    for c in _TRACE_COLS) + " |")
        if inv["ratios"]:
            out.append("")
            out.append("| ratio (per repeat, then the median) | value |")
            out.append("|---|---:|")
            for rk, st in inv["ratios"].items():
                out.append(f"| {rk} | {_rng(st['values'], '.2f', 'x')} |")
        out.append("")
    if any("overhead_s" in ms for inv in doc["invocations"].values()
           for ms in inv.get("points", {}).values()):
        out.append(f"Floor definition: {FLOOR_DEFINITION}.")
    while out and out[-1] == "":
        out.pop()
    return out


def _split_aggregation(transport: str) -> tuple[str, str]:
    """``shm://?aggregation=inner`` -> (``shm://``, ``inner``)."""
    link, _, query = transport.partition("?")
    for kv in query.split("&"):
        k, _, v = kv.partition("=")
        if k == "aggregation":
            return link, v
    return link, "streaming (default)"


def _agg_train(r: dict[str, Any]) -> list[float]:
    st = r.get("stats")
    series = st.get("agg_train_s") if isinstance(st, dict) else None
    if isinstance(series, list):
        return [float(x) for x in series]
    return [float(r["agg_train_s"])] if r.get("agg_train_s") is not None else []


def aggregation_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The figures the ``aggregation`` view prints, one dict a model row (also what a
    test compares with the JSON)."""
    nodes = doc["meta"].get("nodes", 2)
    out = []
    for r in doc["results"]:
        if r.get("kind") == "floor" or "round_s" not in r:
            continue
        link, agg = _split_aggregation(r["transport"])
        peak = r.get("serverapp_peak_rss_bytes", 0) / 2**20
        out.append({"model_mib": r["model_mib"], "nodes": nodes, "link": link,
                    "aggregation": agg, "serverapp_peak_mib": peak,
                    "x_model": peak / r["model_mib"], "agg_train_s": _agg_train(r),
                    "agg_tail_s": r.get("agg_tail_s"), "round_s": r["round_s"]})
    return out


def _aggregation(docs: list[tuple[dict[str, Any], str]]) -> list[str]:
    """ServerApp memory and aggregation times of ``ftx-bench e2e --floor-mib 0`` runs
    comparing ``?aggregation=...``: one table over all the files, a provenance line each."""
    _need(docs, lambda d: d.get("kind") == "e2e", "an e2e JSON")
    out: list[str] = []
    for doc, src in docs:
        head = _e2e_header(doc, src)
        out += [f"- {head[0]}", f"  {head[1]}"]
    out.append("")
    out.append("| model | N | link | aggregation | ServerApp peak RSS | x model | "
               "aggregate_train s (per round) | aggregation tail s (mean) | round s |")
    out.append("|---|---:|---|---|---:|---:|---|---:|---:|")
    for doc, _ in docs:
        for row in aggregation_rows(doc):
            tail = "—" if row["agg_tail_s"] is None else f"{row['agg_tail_s']:.2f}"
            train = " / ".join(f"{x:.2f}" for x in row["agg_train_s"]) or "—"
            out.append(f"| {row['model_mib']:g} MiB | {row['nodes']} | `{row['link']}` | "
                       f"{row['aggregation']} | {row['serverapp_peak_mib']:.0f} MiB | "
                       f"{row['x_model']:.1f}x | {train} | {tail} | {row['round_s']:.1f} |")
    return out


def _need(docs: list[tuple[dict[str, Any], str]], ok: Callable[[dict[str, Any]], bool],
          what: str) -> None:
    for doc, src in docs:
        if not ok(doc):
            raise ValueError(f"{src} is not {what}")


def _trace_breakdown(docs: list[tuple[dict[str, Any], str]]) -> list[str]:
    """The mean traced train round of each model row (``breakdown_mean`` of an e2e JSON;
    of a reproduce JSON: the median over the repeats of each repeat's mean)."""
    _need(docs, lambda d: d.get("kind") in ("e2e", "reproduce"), "an e2e or reproduce JSON")
    out: list[str] = []
    for doc, src in docs:
        rows: list[tuple[str, float, dict[str, float], str]] = []
        if doc["kind"] == "reproduce":
            out += _reproduce_header(doc, src)
            for inv in doc["invocations"].values():
                for pk, ms in inv.get("points", {}).items():
                    b = {m[len("trace_"):]: st["median"] for m, st in ms.items()
                         if m.startswith("trace_") and st.get("n")}
                    if {"publish", "fetch", "upload", "to_server", "total"} <= set(b):
                        t, size = pk.split("@")
                        n = max(st["n"] for m, st in ms.items() if m.startswith("trace_"))
                        rows.append((t, float(size.removesuffix("MiB")), b,
                                     (f"the median over {n} repeats of each repeat's mean "
                                     "train round")))
        else:
            out += _e2e_header(doc, src)
            rows = [(r["transport"], r["model_mib"], r["breakdown_mean"], "the mean train round")
                    for r in doc["results"]
                    if r.get("kind") != "floor" and r.get("breakdown_mean")]
        for transport, mib, b, what in rows:
            out += ["", f"{_label(transport)}, {mib:g} MiB, {what}:", "", "```",
                    (f"publish {b['publish']:.2f}, to_clients {b['to_clients']:.2f}, fetch "
                    f"{b['fetch']:.2f} (slowest {b['fetch_max']:.2f} s, "
                    f"{b['fetch_mib_s']:.0f} MiB/s), app {b['app']:.2f},"),
                    (f"upload {b['upload']:.2f}, to_server {b['to_server']:.2f}, aggregate "
                    f"{b['aggregate']:.2f}, total {b['total']:.2f} s"), "```", "",
                    (f"So of a {b['total']:.1f} s train round, "
                    f"{b['fetch'] + b['upload']:.1f} s are the payload crossing the link "
                    f"(fetch + upload), {b['to_clients'] + b['to_server']:.1f} s Flower's "
                    f"delivery of the messages (to_clients + to_server: its polling) and "
                    f"{b['app']:.1f} s the app's own compute.")]
    return out


def _uptime_load(line: str) -> str:
    m = re.search(r"load average: ([\d.]+), ([\d.]+), ([\d.]+)", line or "")
    return "/".join(m.groups()) if m else "not recorded"


def _receive_sets(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """issue24-receive-loop.json: the two sets of 2 MiB runs, as A and B."""
    return {"A": doc["m2mib"], "B": doc["m2mib_b"]}


def _set_loads(st: dict[str, Any]) -> tuple[str, str]:
    if "uptime" in st:
        return _uptime_load(st["uptime"][0]), _uptime_load(st["uptime"][-1])
    return _uptime_load(st.get("uptime_before", "")), _uptime_load(st.get("uptime_after", ""))


def _med_rng(xs: list[float], fmt: str = ".1f", unit: str = " s") -> str:
    return (f"{statistics.median(xs):{fmt}}{unit} ({min(xs):{fmt}}-{max(xs):{fmt}}), "
            f"n = {len(xs)}")


def receive_loop_polls(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per set (A, B) and transport: total run seconds, pulls per round, and the traced
    phases of the offloaded runs (what the ``receive-loop-polls`` view prints)."""
    out: dict[str, dict[str, Any]] = {}
    for name, st in _receive_sets(doc).items():
        sets: dict[str, Any] = {}
        for r in st["runs"]:
            t = "inband" if r["transport"] == "inband" else "tcp"
            e = sets.setdefault(t, {"total_s": [], "pulls_per_round": [],
                                    "pulls_per_phase": [], "landed_to_reply": [],
                                    "node_wait": [], "spawn": []})
            e["total_s"].append(r["total_s"])
            phases = r["pulls_per_phase"] or r["flower_pulls_per_phase"]
            e["pulls_per_phase"] += phases
            e["pulls_per_round"] += [sum(phases[i:i + 2]) for i in range(0, len(phases), 2)]
            for b in r.get("breakdown") or []:
                for k in ("landed_to_reply", "node_wait", "spawn"):
                    if b.get(k) is not None:
                        e[k].append(b[k])
        out[name] = sets
    return out


def _receive_loop_polls(docs: list[tuple[dict[str, Any], str]]) -> list[str]:
    """Plain Flower's 3-second pull against offload's receive loop, 2 MiB model."""
    _need(docs, lambda d: d.get("issue") == 24 and "m2mib" in d,
          "issue24-receive-loop.json")
    (doc, src), = docs
    data = receive_loop_polls(doc)
    out = []
    for name, st in _receive_sets(doc).items():
        nrun = len(st["runs"])
        lb, la = _set_loads(st)
        out.append(f"- set {name}: **{nrun} runs** ({nrun // 2} per transport, interleaved), "
                   f"commit not recorded in the JSON (older code version), load average "
                   f"before {lb}, after {la}; command: `{st['command']}`.")
    out.append(f"  Data: `{src}`.")
    out += ["", ("| set | transport | total run, median (min-max) | pulls per round | "
                "pulls per phase |"), "|---|---|---|---|---|"]
    for name, sets in data.items():
        for t, e in sets.items():
            label = ("plain Flower (`inband`, its own pull: counted from its phases)"
                     if t == "inband" else '`offload(FedAvg(), "tcp://127.0.0.1:0")`')
            out.append(f"| {name} | {label} | {_med_rng(e['total_s'])} | "
                       f"{min(e['pulls_per_round'])}-{max(e['pulls_per_round'])} | "
                       f"{min(e['pulls_per_phase'])}-{max(e['pulls_per_phase'])} |")
    out.append("")
    diff = ", ".join(f"{statistics.median(s['inband']['total_s']) - statistics.median(s['tcp']['total_s']):.1f} s ({n})"
                     for n, s in data.items())
    out.append(f"Offload's run is shorter in the median by {diff}. Traced phases of the "
               "offloaded runs (median (min-max), n phases):")
    out.append("")
    out += ["| set | `landed_to_reply` | `node_wait` | `spawn` |", "|---|---|---|---|"]
    for name, sets in data.items():
        e = sets["tcp"]
        out.append(f"| {name} | {_med_rng(e['landed_to_reply'], '.2f')} | "
                   f"{_med_rng(e['node_wait'], '.2f')} | {_med_rng(e['spawn'], '.2f')} |")
    sx = doc.get("superexec_poll_0_1")
    if sx:
        nw = [b["node_wait"] for r in sx["runs"] for b in r.get("breakdown") or []
              if b.get("node_wait") is not None]
        out += ["", (f"**{len(sx['runs'])} run** with the SuperExec polling faster "
                    f"(`{sx['command']}`; commit and load not recorded): `node_wait` "
                    f"median {_med_rng(nw, '.2f')}.")]
    return out


#: issue 24's goal for the aggregation tail (last upload landed -> aggregate_train done)
TAIL_GOAL_S = 0.5


def _commit_in(command: str) -> str:
    m = re.search(r"\bat ([0-9a-f]{7,40})\b", command)
    return f"`{m.group(1)[:7]}`" if m else "not recorded"


def receive_loop_tails(doc: dict[str, Any]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Per side (before / after the receive loop) and link: every round's aggregation
    tail, aggregate_train and (after) landed_to_reply, over the 128 MiB runs."""
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for side in ("before", "after"):
        runs = list(doc[f"tail128_{side}"]["runs"])
        for pair in doc["tail128_pairs"]["runs"]:
            runs += pair[side]["runs"]
        for r in runs:
            link = r["transport"].split(":", 1)[0] + "://"
            e = out.setdefault(side, {}).setdefault(link, {"agg_tail_s": [], "agg_train_s": [],
                                                           "landed_to_reply": [], "runs": []})
            e["runs"].append(1.0)
            e["agg_tail_s"] += r["agg_tail_s"]
            e["agg_train_s"] += r["agg_train_s"] or []
            e["landed_to_reply"] += [b["landed_to_reply"] for b in r.get("breakdown") or []
                                     if b.get("landed_to_reply") is not None]
    return out


def _receive_loop_tails(docs: list[tuple[dict[str, Any], str]]) -> list[str]:
    """The aggregation tail at 128 MiB before and after offload's receive loop."""
    _need(docs, lambda d: d.get("issue") == 24 and "tail128_pairs" in d,
          "issue24-receive-loop.json")
    (doc, src), = docs
    data = receive_loop_tails(doc)
    first, pairs = doc["tail128_after"], doc["tail128_pairs"]
    loads = [_uptime_load(x) for x in doc.get("tail128_uptime", [])]
    loads += [_uptime_load(p[s].get(k, "")) for p in pairs["runs"] for s in ("after", "before")
              for k in ("uptime_before",)]
    nruns = {side: len(next(iter(d.values()))["runs"]) for side, d in data.items()}
    out = [(f"**{nruns['before']} runs before and {nruns['after']} after** per link (one "
           f"deployment per run, alternating), commits: before "
           f"{_commit_in(doc['tail128_before']['command'] + ' ' + pairs['command'].split('before:')[-1])}, after "
           f"{_commit_in(first['command'])} and {_commit_in(pairs['command'])} (older code "
           f"versions); load averages recorded around the runs: {', '.join(loads)}."),
           f"Commands: `{first['command']}`; `{pairs['command']}`; data: `{src}`.", "",
           "| link | before (Flower's pull), every round's tail | after (receive loop) |",
           "|---|---|---|"]
    for link in data["after"]:
        out.append(f"| `{link}` | median {_med_rng(data['before'][link]['agg_tail_s'], '.2f')} | "
                   f"median {_med_rng(data['after'][link]['agg_tail_s'], '.2f')} |")
    met = []
    for side in ("before", "after"):
        tails = [x for e in data[side].values() for x in e["agg_tail_s"]]
        met.append(f"{sum(x <= TAIL_GOAL_S for x in tails)} of {len(tails)}")
    out.append(f"| rounds whose tail met issue 24's goal (at most {TAIL_GOAL_S} seconds) | "
               f"{met[0]} | {met[1]} |")
    lt = [x for e in data["after"].values() for x in e["landed_to_reply"]]
    out += ["", f"After: `landed_to_reply` median {_med_rng(lt, '.2f')}; `aggregate_train` "
            + ", ".join(f"{min(e['agg_train_s']):.2f}-{max(e['agg_train_s']):.2f} s "
                        f"({link})" for link, e in data["after"].items()) + "."]
    return out


#: Block views other than the default (a table per e2e / reproduce JSON): a block whose
#: name starts with a key here renders all its files through that function.
def memory_links_rows(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``ftx-bench reproduce memory-links``: per link, the ServerApp's peak RSS (MiB,
    every repeat) at the smallest and the largest N, and the model size (MiB)."""
    if doc.get("kind") != "reproduce" or not str(doc.get("table")).startswith("memory-links"):
        raise ValueError("not a reproduce memory-links JSON")
    by_n: dict[int, dict[str, Any]] = {}
    for key, inv in doc["invocations"].items():
        mib, n = key.split("-N")
        by_n[int(n)] = {"mib": float(mib.removesuffix("MiB")), "points": inv["points"]}
    lo, hi = min(by_n), max(by_n)
    rows: dict[str, dict[str, Any]] = {}
    for pk, ms in by_n[lo]["points"].items():
        link = pk.split("@")[0]
        other = by_n[hi]["points"].get(pk)
        if other is None:
            continue
        rows[link] = {"n": (lo, hi), "model_mib": by_n[lo]["mib"],
                      "lo": ms["serverapp_peak_rss_mib"]["values"],
                      "hi": other["serverapp_peak_rss_mib"]["values"],
                      "tail_hi": (other.get("agg_tail_s") or {}).get("values", [])}
    return rows


def _memory_links(docs: list[tuple[dict[str, Any], str]]) -> list[str]:
    """Issue 24's table: the ServerApp's peak RSS at N = 2 and N = 8 on every link."""
    (doc, src), = docs
    rows = memory_links_rows(doc)
    first = next(iter(rows.values()))
    lo, hi = first["n"]
    half = first["model_mib"] / 2
    loads = [f"{r['load_before'][0]:.2f}" for inv in doc["invocations"].values()
             for r in inv["repeats"]]
    failed = {k: sum(1 for r in inv["repeats"] if r.get("rc")) for k, inv in
              doc["invocations"].items()}
    out = [f"**{doc['repeat']} repeat(s) per point** (median, min-max), commit "
           f"`{(doc.get('commit') or '?')[:7]}`" + (" (dirty tree)" if doc.get("dirty") else "")
           + f", Flower {doc.get('flwr_version')}, {doc.get('time_utc', '?')[:10]}, "
           f"{doc.get('cpus')} cores; 1-minute load before each run: {', '.join(loads)}.",
           f"Command: `{doc['command']}`; data: `{src}`."
           + "".join(f" **{n} repeat(s) of {k} failed** (their output is in the JSON); "
                     "its figures come from the others." for k, n in failed.items() if n),
           "",
           (f"| link | ServerApp peak RSS, N = {lo} | N = {hi} | N = {hi} minus N = {lo} "
            f"(medians) | within half a model ({half:g} MiB) |"),
           "|---|---:|---:|---:|---|"]
    for link, r in rows.items():
        d = statistics.median(r["hi"]) - statistics.median(r["lo"])
        out.append(f"| `{link}` | {_rng(r['lo'], '.0f', ' MiB')}, n = {len(r['lo'])} | "
                   f"{_rng(r['hi'], '.0f', ' MiB')}, n = {len(r['hi'])} | {d:+.1f} MiB | "
                   f"{'yes' if d <= half else '**no**'} |")
    return out


#: the codecs of this package (the other rows of codec_bench.py are reference coders)
_OWN_CODECS = ("lossless", "delta", "q8")


def codec_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """benchmarks/codec_bench.py: the rows of this package's codecs."""
    if "rows" not in doc or "args" not in doc:
        raise ValueError("not a codec_bench.py JSON")
    return [r for r in doc["rows"] if r["codec"] in _OWN_CODECS]


def _gbps(st: dict[str, Any] | None) -> str:
    if not st:
        return "—"
    return f"{st['cpu_gbps']:.2f} ({st['cpu_min']:.2f}-{st['cpu_max']:.2f})"


def _codec_bench(docs: list[tuple[dict[str, Any], str]]) -> list[str]:
    """Size and speed of lossless / delta / q8 (benchmarks/codec_bench.py)."""
    (doc, src), = docs
    a = doc["args"]
    commit = doc.get("commit")
    out = [f"**{a['repeat']} repeat(s)** per speed (median, min-max), "
           + (f"commit `{commit[:7]}`" + (" (dirty tree)" if doc.get("dirty") else "")
              if commit else "commit not recorded")
           + (f"; load average {_uptime_load(doc['load_before'])} before and "
              if doc.get("load_before") else "; load average ")
           + f"{_uptime_load(doc['load'])} after the run.",
           (f"Command: `{doc.get('command') or 'benchmarks/codec_bench.py'}` (size "
            f"{a['size']}, preset {a['preset']}, {a['pretrain_rounds']} training rounds "
            f"first, {a['local_steps']} AdamW steps at lr {a['lr']:g} per round); data: "
            f"`{src}`."), "",
           "| data | codec | size (of raw) | encode GB/s | decode GB/s | decode -> arrays |",
           "|---|---|---:|---|---|---|"]
    for r in codec_rows(doc):
        size = f"{100 * r['ratio']:.1f}%" + (" of fp32" if r["ratio_of"] != "raw" else "")
        out.append(f"| {r['data']} | `{r['codec']}` | {size} | {_gbps(r['encode'])} | "
                   f"{_gbps(r['decode'])} | {_gbps(r.get('decode_record'))} |")
    return out


def ray_step_rows(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """benchmarks/ray_step_bench.py: per row (``flower``, ``K=1``, ...), every round's
    step seconds over the repeats (``rounds[i]``: round i + 1's values) and whether the
    model was bit-identical to Flower's class in every repeat (None for ``flower``)."""
    if doc.get("kind") != "ray-step" or not doc.get("runs"):
        raise ValueError("not a benchmarks/ray_step_bench.py JSON (ray-step)")
    rows: dict[str, dict[str, Any]] = {}
    for label in doc["runs"][0]["step_s"]:
        rounds = [[run["step_s"][label][i] for run in doc["runs"]]
                  for i in range(doc["rounds"])]
        same = None if label == "flower" else all(run["bit_identical"][label]
                                                  for run in doc["runs"])
        rows[label] = {"rounds": rounds, "bit_identical": same}
    return rows


def _ray_step(docs: list[tuple[dict[str, Any], str]]) -> list[str]:
    """A server optimiser's step on the shard owners vs Flower's class in the ServerApp."""
    (doc, src), = docs
    rows = ray_step_rows(doc)
    runs = doc["runs"]
    loads = "; ".join(f"{_load(r['load_before'])} before, {_load(r['load_after'])} after"
                      for r in runs)
    out = [f"**{len(runs)} repeat(s)** (median, min-max), commit `{doc['commit'][:7]}`"
           + (" (changed files: " + ", ".join(f"`{f}`" for f in doc["dirty"]) + ")"
              if doc.get("dirty") else "")
           + f", Flower {doc.get('flwr_version')}, Ray {doc.get('ray_version')}, NumPy "
           f"{doc.get('numpy_version')}, {doc['time_utc'][:10]}, {doc.get('cpus')} cores "
           f"(shared with other sessions); local Ray with {doc['ray_num_cpus']} CPUs and a "
           f"{doc['object_store_bytes'] / (1 << 30):g} GiB object store. Load average "
           f"(1/5/15 min) per repeat: {loads}.",
           f"Command: `{doc['command']}`; data: `{src}`.", "",
           f"| {doc['strategy']}, {doc['mib']} MiB float32 model | "
           + " | ".join(f"round {i}" for i in range(1, doc["rounds"] + 1))
           + " | same model as Flower's class |",
           "|---|" + "---:|" * doc["rounds"] + "---|"]
    for label, r in rows.items():
        name = (f"Flower's {doc['strategy']} in the ServerApp (the step only)"
                if label == "flower" else f"shard owners, {label}")
        same = ("(reference)" if r["bit_identical"] is None else
                "bit-identical in every repeat" if r["bit_identical"] else "**differs**")
        out.append(f"| {name} | " + " | ".join(_rng(v, ".2f", " s") for v in r["rounds"])
                   + f" | {same} |")
    return out


def _pct(x: float, base: float) -> str:
    return f"{100 * x / base:.1f}%" if base else "—"


def _codec_training(docs: list[tuple[dict[str, Any], str]]) -> list[str]:
    """benchmarks/codec_training.py: held-out loss and bytes per codec (and, over a
    network link, what the clients fetched: full models, downlink deltas, cache hits)."""
    (doc, src), = docs
    if "rows" not in doc or "eval_loss" not in doc["rows"][0]:
        raise ValueError("not a codec_training.py JSON")
    a, rows = doc["args"], doc["rows"]
    raw = next((r for r in rows if r["codec"] == "raw"), None)
    commit = doc.get("commit")
    lb, la = doc.get("load_before"), doc.get("load_after")
    out = [("**one run** (deterministic: the bytes and losses do not depend on the load), "
            + (f"commit `{commit[:7]}`" + (" (dirty tree)" if doc.get("dirty") else "")
               if commit else "commit not recorded")
            + (f", {doc['time_utc']} UTC" if doc.get("time_utc") else "")
            + (f"; 1-minute load {lb[0]:.2f} before, {la[0]:.2f} after" if lb and la
               else "") + "."),
           (f"Command: `{doc.get('command') or 'benchmarks/codec_training.py'}` (preset "
            f"{a['preset']}, {a['rounds']} rounds of {a['local_steps']} AdamW steps at lr "
            f"{a['lr']:g}, over `{a.get('transport', 'shm://')}`); data: `{src}`."), ""]
    out += [("| codec | held-out loss, rounds 1-5 | round 5 vs raw | uploaded (of raw) | "
            "downloaded (of raw) |"), "|---|---|---:|---:|---:|"]
    for r in rows:
        same = raw is not None and r is not raw and r["eval_loss"] == raw["eval_loss"]
        loss = "identical to raw" if same else " ".join(f"{x:.4f}" for x in r["eval_loss"])
        rel = ("-" if raw is None or r is raw else
               f"{100 * (r['eval_loss'][-1] / raw['eval_loss'][-1] - 1):+.3f}%")
        out.append(f"| `{r['codec']}` | {loss} | {rel} | {r['uploaded'] / 1e6:.2f} MB "
                   f"({_pct(r['uploaded'], raw['uploaded'] if raw else 0)}) | "
                   f"{r['downloaded'] / 1e6:.2f} MB "
                   f"({_pct(r['downloaded'], raw['downloaded'] if raw else 0)}) |")
    if any("fetched" in r for r in rows):
        out += ["", ("| codec | fetched by the clients | of raw | fetches: full / downlink "
                "delta / cache hit |"), "|---|---:|---:|---|"]
        for r in rows:
            full = r["fetches"] - r["deltas"] - r["hits"]
            out.append(f"| `{r['codec']}` | {r['fetched'] / 1e6:.2f} MB | "
                       f"{_pct(r['fetched'], raw['fetched'] if raw else 0)} | "
                       f"{full} / {r['deltas']} / {r['hits']} |")
    return out


VIEWS = {"codec-bench": _codec_bench, "codec-training": _codec_training, "aggregation": _aggregation, "trace-breakdown": _trace_breakdown,
         "receive-loop-polls": _receive_loop_polls,
         "receive-loop-tails": _receive_loop_tails, "memory-links": _memory_links,
         "ray-step": _ray_step}


def render_block(name: str, files: list[str], root: Path = REPO) -> str:
    parts: list[str] = []
    view = next((fn for key, fn in VIEWS.items()
                 if name == key or name.startswith(key + "-")), None)
    if view is not None:
        docs = [(json.loads((root / f).read_text(encoding="utf-8")), f) for f in files]
        try:
            return "\n".join(view(docs)) + "\n"
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"block {name}: {exc}") from exc
    for f in files:
        # "repro-T.json#KEY": only invocation KEY of that reproduce table
        path, _, key = f.partition("#")
        doc = json.loads((root / path).read_text(encoding="utf-8"))
        if key:
            if doc.get("kind") != "reproduce" or key not in doc.get("invocations", {}):
                raise ValueError(f"block {name}: {path} has no reproduce invocation {key!r}")
            doc = {**doc, "invocations": {key: doc["invocations"][key]}}
        if doc.get("kind") == "reproduce":
            parts += _reproduce(doc, path)
        elif doc.get("kind") == "e2e":
            parts += _legacy_e2e(doc, f)
        else:
            raise ValueError(f"block {name}: {f} is neither an e2e nor a reproduce JSON")
        parts.append("")
    while parts and parts[-1] == "":
        parts.pop()
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------- plots (docs/img)
#
# Each plot in docs/img is drawn from the JSON files listed here. The PNG carries the
# exact figures it was drawn from (PNG text chunk ``ftx-bench-inputs``), so the check
# compares those with what the data gives now: no pixel comparison, and no matplotlib
# needed to check. ``ftx-bench render`` redraws a plot that is missing or stale.

_STAR64 = [f"docs/bench-data/star-{r}-n{n}-64MiB{sfx}.json"
           for r, n, sfx in (("1gbit", 2, "-rerun"), ("1gbit", 4, ""), ("1gbit", 8, ""),
                             ("5gbit", 2, ""), ("5gbit", 2, "-s3only"), ("5gbit", 4, ""),
                             ("5gbit", 8, ""))]

#: image -> (kind, data files, options)
PLOTS: dict[str, tuple[str, list[str], dict[str, Any]]] = {
    "docs/img/bench-e2e-star-nodes.png": ("e2e-nodes", _STAR64, {}),
    "docs/img/bench-e2e-star-nodes-s5.png": (
        "e2e-nodes", [f"docs/bench-data/star-1gbit-n{n}-64MiB-s5.json" for n in (2, 4, 8)],
        {}),
    "docs/img/bench-e2e-profiles.png": (
        "e2e-profiles", [f"docs/bench-data/{f}.json" for f in ("e2e-lo2", "e2e-geo16",
                                                              "e2e-200")], {}),
    "docs/img/bench-p2p-loopback-k1.png": ("p2p", ["docs/bench-data/p2p-lo-s2.json"], {"k": 1}),
    "docs/img/bench-p2p-loopback-k4.png": ("p2p", ["docs/bench-data/p2p-lo-s2.json"], {"k": 4}),
    "docs/img/bench-p2p-geo-distributed-k1.png": ("p2p", ["docs/bench-data/p2p-geo.json"],
                                                  {"k": 1}),
}

PNG_KEY = "ftx-bench-inputs"


def _commit_of(doc: dict[str, Any]) -> str:
    return (doc.get("environment") or {}).get("git_commit") or doc.get("commit") or "?"


def _provenance(docs: list[tuple[dict[str, Any], str]]) -> str:
    commits = list(dict.fromkeys(_commit_of(d)[:7] for d, _ in docs))
    names = ", ".join(Path(src).stem for _, src in docs)
    return (f"data: {names}; commit{'s' if len(commits) > 1 else ''} "
            f"{', '.join(commits)} (older code version{'s' if len(commits) > 1 else ''})")


def _e2e_nodes_inputs(docs: list[tuple[dict[str, Any], str]], opts: dict[str, Any]) -> dict:
    series: dict[str, dict[str, Any]] = {}
    for d, _ in docs:
        meta = d.get("meta") or {}
        n, rate, rounds = meta.get("nodes"), meta.get("server_rate_mbit"), meta.get("rounds") or 1
        up = f"{rate / 1000:g} Gbit/s uplink" if rate else (meta.get("wan") or "loopback")
        for r in d.get("results", []):
            if r.get("kind") == "model" and "round_s" in r and n:
                t = r["transport"].split("?")[0]
                label = f"{t} {up}, {r['model_mib']:g} MiB"
                tx = r.get("server_tx_bytes")
                series.setdefault(label, {"transport": t, "uplink": up, "points": []})
                series[label]["points"].append(
                    [n, r["round_s"], r.get("overhead_s"),
                     tx / 2**20 / rounds if tx is not None else None])
    for e in series.values():
        e["points"].sort()
    return {"kind": "e2e-nodes", "series": dict(sorted(series.items())),
            "title": "Round time vs number of clients per link (emulated WAN, star topology)",
            "provenance": _provenance(docs)}


def _e2e_profiles_inputs(docs: list[tuple[dict[str, Any], str]], opts: dict[str, Any]) -> dict:
    groups = []
    for d, _ in docs:
        meta = d.get("meta") or {}
        prof = meta.get("wan") or "loopback"
        desc = (meta.get("wan_desc") or "").partition(": ")[2]
        by_size: dict[float, list[dict[str, Any]]] = {}
        for r in d.get("results", []):
            if r.get("kind") == "model" and "round_s" in r:
                by_size.setdefault(r["model_mib"], []).append(r)
        for size, rs in sorted(by_size.items()):
            groups.append({"label": f"{prof}\n{desc + chr(10) if desc else ''}{size:g} MiB",
                           "bars": [[r["transport"], r["round_s"], r.get("floor_s") or 0]
                                    for r in rs]})
    return {"kind": "e2e-profiles", "groups": groups,
            "title": "End-to-end round time per transport and WAN profile",
            "provenance": _provenance(docs)}


def _p2p_inputs(docs: list[tuple[dict[str, Any], str]], opts: dict[str, Any]) -> dict:
    k = opts["k"]
    series: dict[str, list[list[float]]] = {}
    where = "loopback"
    for d, _ in docs:
        meta = d.get("meta") or {}
        where = meta.get("wan_desc") or where
        for r in d.get("results", []):
            if r.get("k") == k and "latency_median_s" in r:
                series.setdefault(r["backend"], []).append(
                    [r["size_bytes"] / 2**20, r["throughput_MBps"]])
    for pts in series.values():
        pts.sort()
    return {"kind": "p2p", "k": k, "series": dict(sorted(series.items())),
            "title": f"p2p ({where}), K={k} receiver{'s' if k > 1 else ''}",
            "provenance": _provenance(docs)}


_PLOT_INPUTS = {"e2e-nodes": _e2e_nodes_inputs, "e2e-profiles": _e2e_profiles_inputs,
                "p2p": _p2p_inputs}


def plot_inputs(image: str, root: Path = REPO) -> dict[str, Any]:
    """What the plot ``image`` shows, computed from its data files now (JSON-normal)."""
    kind, files, opts = PLOTS[image]
    docs = [(json.loads((root / f).read_text(encoding="utf-8")), f) for f in files]
    return json.loads(json.dumps(_PLOT_INPUTS[kind](docs, opts)))


def png_inputs(path: Path) -> dict[str, Any] | None:
    """The inputs a PNG drawn by this module carries (its ``tEXt`` chunk), or None."""
    import struct

    try:
        data = path.read_bytes()
    except OSError:
        return None
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    pos = 8
    while pos + 8 <= len(data):
        (length,), ctype = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if ctype == b"tEXt":
            key, _, text = body.partition(b"\0")
            if key == PNG_KEY.encode():
                try:
                    return json.loads(text.decode("latin-1"))
                except ValueError:
                    return None
        if ctype == b"IEND":
            break
    return None


def _draw(inputs: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("drawing docs/img needs matplotlib: pip install -e benchmarks "
                           "(or pip install matplotlib)") from exc
    kind = inputs["kind"]
    if kind == "e2e-nodes":
        fig, axes = plt.subplots(1, 3, figsize=(15, 5.1))
        colors = {"inband": "tab:gray", "tcp://": "tab:blue", "s3://": "tab:orange"}
        styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]
        ups = sorted({e["uplink"] for e in inputs["series"].values()})
        for label, e in inputs["series"].items():
            ls, mk = styles[ups.index(e["uplink"]) % len(styles)]
            for ax, idx in zip(axes, (1, 2, 3), strict=True):
                xy = [(p[0], p[idx]) for p in e["points"] if p[idx] is not None]
                if xy:
                    ax.plot([x for x, _ in xy], [y for _, y in xy], ls, marker=mk,
                            color=colors.get(e["transport"]), label=label)
        whats = ("round time (s)", "payload overhead above the floor (s)",
                 "MiB through the server's uplink per round")
        for a, what in zip(axes, whats, strict=True):
            a.set_xlabel("SuperNodes (N)")
            a.set_ylabel(what)
            a.set_xticks(sorted({p[0] for e in inputs["series"].values()
                                 for p in e["points"]}))
            a.grid(True, alpha=0.3)
        axes[1].axhline(0, color="black", lw=0.5)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{inputs['title']}\n{textwrap.fill(inputs['provenance'], 160)}",
                     fontsize=10)
    elif kind == "e2e-profiles":
        groups = inputs["groups"]
        transports = list(dict.fromkeys(b[0] for g in groups for b in g["bars"]))
        width = 0.8 / max(1, len(transports))
        fig, ax = plt.subplots(figsize=(max(6, 2.4 * len(groups)), 5))
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, t in enumerate(transports):
            xs, ys, floors = [], [], []
            for j, g in enumerate(groups):
                m = [b for b in g["bars"] if b[0] == t]
                if m:
                    xs.append(j + i * width)
                    ys.append(m[0][1])
                    floors.append(m[0][2])
            c = colors[i % len(colors)]
            ax.bar(xs, ys, width, label=t, color=c)
            ax.bar(xs, floors, width, color="white", alpha=0.45, hatch="//", edgecolor=c)
        ax.set_xticks([j + width * (len(transports) - 1) / 2 for j in range(len(groups))])
        ax.set_xticklabels([g["label"] for g in groups], fontsize=8)
        ax.set_ylabel("round time (s); hatched: control-plane floor")
        ax.set_title(f"{inputs['title']}\n{textwrap.fill(inputs['provenance'], 90)}",
                     fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    elif kind == "p2p":
        fig, ax = plt.subplots(figsize=(8.5, 4.8))
        for name, pts in inputs["series"].items():
            ax.plot([q[0] for q in pts], [q[1] for q in pts], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("payload size (MiB)")
        ax.set_ylabel("aggregate throughput (MB/s)")
        ax.set_title(f"{inputs['title']}\n{textwrap.fill(inputs['provenance'], 90)}",
                     fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        raise ValueError(f"unknown plot kind {kind!r}")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={PNG_KEY: json.dumps(inputs, sort_keys=True),
                                         "Software": None})
    plt.close(fig)


def stale_plots(root: Path = REPO) -> list[str]:
    """Plots in docs/img whose embedded inputs differ from what their data gives now, or
    that no entry of PLOTS generates."""
    bad = [img for img in PLOTS if png_inputs(root / img) != plot_inputs(img, root)]
    bad += [str(p.relative_to(root)) for p in sorted((root / "docs" / "img").glob("*.png"))
            if str(p.relative_to(root)) not in PLOTS]
    return bad


def render_text(text: str, root: Path = REPO) -> str:
    def sub(mo: re.Match) -> str:
        body = render_block(mo["name"], mo["files"].split(), root)
        return mo.group(1) + body + mo.group(5)

    return BLOCK.sub(sub, text)


def stale(root: Path = REPO) -> list[str]:
    """Documents whose generated blocks differ from what docs/bench-data gives."""
    bad = []
    for p in doc_paths(root):
        text = p.read_text(encoding="utf-8")
        if "figures:begin" in text and render_text(text, root) != text:
            bad.append(str(p.relative_to(root)))
    return bad


def main(check: bool = False) -> int:
    if check:
        bad = stale()
        for b in bad:
            print(f"{b}: a generated figure block differs from docs/bench-data "
                  f"(run: ftx-bench render)", file=sys.stderr)
        plots = stale_plots()
        for b in plots:
            print(f"{b}: " + ("not drawn from docs/bench-data by ftx-bench render (add it "
                              "to render.PLOTS or remove it)" if b not in PLOTS else
                              "the plot's inputs differ from docs/bench-data (run: "
                              "ftx-bench render)"), file=sys.stderr)
        return 1 if bad or plots else 0
    rc = 0
    for img in stale_plots():
        if img not in PLOTS:
            print(f"{img}: not drawn from docs/bench-data (add it to render.PLOTS)",
                  file=sys.stderr)
            rc = 1
            continue
        try:
            _draw(plot_inputs(img), REPO / img)
        except RuntimeError as exc:
            print(f"{img}: stale, not redrawn: {exc}", file=sys.stderr)
            rc = 1
            continue
        print(f"drew {img}")
    for p in doc_paths():
        text = p.read_text(encoding="utf-8")
        if "figures:begin" in text:
            new = render_text(text)
            if new != text:
                p.write_text(new, encoding="utf-8")
                print(f"updated {p.relative_to(REPO)}")
    return rc
