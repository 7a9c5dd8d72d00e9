"""``ftx-bench render``: the published figures, generated from docs/bench-data.

A block in README.md or docs/**.md::

    <!-- figures:begin NAME (generated from docs/bench-data/A.json by ftx-bench render) -->
    ... (replaced on every render) ...
    <!-- figures:end -->

is regenerated from the JSON files its begin marker names (several: space-separated);
``--check`` (and tests/test_figures.py) fails when a block differs from what the data
gives. Both the JSON of ``ftx-bench reproduce`` (median, min-max over repeats) and an
older single ``ftx-bench e2e`` JSON (which says "one run", its commit and its load) render.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
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
    if m.get("floor_once"):
        parts.append("--floor-once")
    return " ".join(parts)


def _legacy_e2e(doc: dict[str, Any], src: str) -> list[str]:
    """An older ``ftx-bench e2e`` JSON: runs of a point were consecutive, so repeats are
    paired by index; the floor of repeat i is the median of the floor runs' i-th repeat."""
    m, env = doc["meta"], doc.get("environment", {})
    rows = doc["results"]
    nrep = max(len(r.get("round_s_all_repeats") or [r["round_s"]]) for r in rows
               if "round_s" in r)

    def reps(r: dict[str, Any]) -> list[float]:
        return list(r.get("round_s_all_repeats") or [r["round_s"]])

    floors = [reps(r) for r in rows if r.get("kind") == "floor" and "round_s" in r]
    floor_i = ([statistics.median(f[i] for f in floors if i < len(f)) for i in range(nrep)]
               if floors else None)
    models = [r for r in rows if r.get("kind") != "floor" and "round_s" in r]
    out = []
    cpus = env.get("cpus")
    lb, la = m.get("load_before"), m.get("load_after") or env.get("loadavg")
    runs = "one run" if nrep == 1 else f"{nrep} runs (median, min-max)"
    out.append(f"**{runs}**, commit `{env.get('git_commit', '?')}` (older code version), "
               f"Flower {env.get('versions', {}).get('flwr', '?')}, "
               f"{env.get('time_utc', '?')[:10]}, {cpus} cores; load average before "
               f"{_load(lb)}, after {_load(la)}"
               + (" (**above the core count before the run**)"
                  if lb and cpus and lb[0] > cpus else "")
               + (" (**above the core count after the run**)"
                  if la and cpus and la[0] > cpus and not (lb and lb[0] > cpus) else "")
               + ".")
    out.append(f"Command (from the JSON's meta): `{_e2e_command(m)}`; "
               f"data: `{src}`.")
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


def _reproduce(doc: dict[str, Any], src: str) -> list[str]:
    out = [f"**{doc['repeat']} repeat(s) per point** (median, min-max), commit "
           f"`{(doc.get('commit') or '?')[:7]}`" + (" (dirty tree)" if doc.get("dirty") else "")
           + f", Flower {doc.get('flwr_version')}, {doc.get('time_utc', '?')[:10]}, "
           f"{doc.get('cpus')} cores"
           + (", **quick mode** (tiny sizes, not a published figure)" if doc.get("quick")
              else "") + ".",
           f"Command: `{doc['command']}`; data: `{src}`.", ""]
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
        if inv["kind"] not in ("e2e", "p2p"):
            out.append(f"(driver output kept in the JSON, {len(inv['repeats'])} repeat(s))")
            out.append("")
            continue
        metric_cols = (["round_s", "overhead_s", "superlink_peak_rss_mib"]
                       if inv["kind"] == "e2e" else ["throughput_Gbps"])
        out.append("| point | " + " | ".join(metric_cols) + " |")
        out.append("|---|" + "---:|" * len(metric_cols))
        for pk, ms in inv["points"].items():
            cells = []
            for c in metric_cols:
                st = ms.get(c)
                cells.append(_rng(st["values"], ".1f" if "rss" in c else ".2f")
                             if st and st.get("n") else "—")
            out.append(f"| {pk} | " + " | ".join(cells) + " |")
        if inv["ratios"]:
            out.append("")
            out.append("| ratio (per repeat, then the median) | value |")
            out.append("|---|---:|")
            for rk, st in inv["ratios"].items():
                out.append(f"| {rk} | {_rng(st['values'], '.2f', 'x')} |")
        out.append("")
    out.append(f"Floor definition: {FLOOR_DEFINITION}.")
    return out


def render_block(name: str, files: list[str], root: Path = REPO) -> str:
    parts: list[str] = []
    for f in files:
        doc = json.loads((root / f).read_text(encoding="utf-8"))
        if doc.get("kind") == "reproduce":
            parts += _reproduce(doc, f)
        elif doc.get("kind") == "e2e":
            parts += _legacy_e2e(doc, f)
        else:
            raise ValueError(f"block {name}: {f} is neither an e2e nor a reproduce JSON")
        parts.append("")
    while parts and parts[-1] == "":
        parts.pop()
    return "\n".join(parts) + "\n"


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
        return 1 if bad else 0
    for p in doc_paths():
        text = p.read_text(encoding="utf-8")
        if "figures:begin" in text:
            new = render_text(text)
            if new != text:
                p.write_text(new, encoding="utf-8")
                print(f"updated {p.relative_to(REPO)}")
    return 0
