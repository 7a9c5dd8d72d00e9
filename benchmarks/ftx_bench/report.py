"""Benchmark outputs: JSON (with environment info), a markdown table and PNG plots.

matplotlib is imported only when plots are drawn; without it the JSON and markdown
are still written and the plots are skipped with a hint.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as md
import json
import os
import platform
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

MiB = 1024 * 1024


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5, check=False)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, Any]:
    """Where the figures come from (so they can be compared honestly)."""
    mem = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            mem = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {
        "time_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "kernel": platform.release(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "mem_total_bytes": mem,
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "git_commit": _git_commit(),
        "versions": {
            d: _version(d)
            for d in ("flwr-transports", "flwr", "grpcio", "numpy", "mpi4py", "mpich",
                      "moto", "boto3", "torch", "psutil")
        },
    }


def _fmt_ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.2f}"


def _fmt(v: float | None, nd: int = 1) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def human_size(n: int) -> str:
    for unit, f in (("GB", 10**9), ("MB", 10**6)):  # decimal sizes stay decimal
        if n >= f and n % f == 0:
            return f"{n // f} {unit}"
    for unit, f in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= f:
            v = n / f
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"


# --------------------------------------------------------------------------------------
# p2p


def p2p_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"### Point to point ({meta.get('wan_desc') or 'loopback'})",
        "",
        (f"{meta.get('repeat')} runs after {meta.get('warmup')} warm-up(s); median and p95 "
        "latency of one transfer (sender start to last receiver done); throughput = "
        "K x size / median; receiver peak RSS = max over receivers of their VmHWM."),
        "",
        ("| backend | size | K | median ms | p95 ms | MB/s | Gbit/s | rx peak RSS MiB "
        "| rx peak over base MiB |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        head = f"| {r['backend']} | {human_size(r['size_bytes'])} | {r['k']} "
        if "skipped" in r or "error" in r:
            why = r.get("skipped") or f"error: {r.get('error')}"
            lines.append(head + f"| {why} | | | | | | |")
            continue
        lines.append(
            head
            + f"| {_fmt_ms(r['latency_median_s'])} | {_fmt_ms(r['latency_p95_s'])} "
            f"| {_fmt(r['throughput_MBps'])} | {_fmt(r['throughput_Gbps'], 2)} "
            f"| {_fmt(r['receiver_peak_rss_bytes'] / MiB)} "
            f"| {_fmt(r['receiver_peak_over_base_bytes'] / MiB)} |"
        )
    return "\n".join(lines) + "\n"


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def p2p_plots(rows: list[dict[str, Any]], out: Path, title: str) -> list[str]:
    plt = _plt()
    if plt is None:
        return []
    ok = [r for r in rows if "latency_median_s" in r]
    files = []
    for k in sorted({r["k"] for r in ok}):
        series: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for r in ok:
            if r["k"] == k:
                series[r["backend"]].append((r["size_bytes"], r["throughput_MBps"]))
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(8.5, 4.5))
        for name, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] / MiB for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("payload size (MiB)")
        ax.set_ylabel("aggregate throughput (MB/s)")
        ax.set_title(f"{title}, K={k} receiver{'s' if k > 1 else ''}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        path = out / f"p2p-throughput-k{k}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path.name)
    return files


# --------------------------------------------------------------------------------------
# e2e


def e2e_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        (f"### End to end ({meta.get('wan_desc') or 'loopback'}, {meta.get('nodes')} SuperNodes, "
        f"{meta.get('rounds')} rounds)"),
        "",
        ("Round time = mean of the ServerApp's per-round times (train + evaluate); floor = "
        "the same transport with a tiny model; overhead = round - floor. Bytes are the "
        "offload wrapper's counters (through Flower vs through the link). Aggregation "
        "tail = time from the last upload landing on the link to aggregate_train "
        "returning (mean over rounds; includes Flower delivering the replies), of which "
        "aggregate_train s is the call itself."),
        "",
        ("| transport | model | round s | floor s | overhead s | wall s | Flower bytes "
        "| link bytes | server uplink tx | server rx | SuperLink peak RSS MiB "
        "| ServerApp peak RSS MiB | aggregation tail s | aggregate_train s |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        head = f"| {r['transport']} | {r['model_mib']:g} MiB "
        if "skipped" in r or "error" in r:
            why = r.get("skipped") or f"error: {r.get('error')}"
            lines.append(head + f"| {why} | | | | | | | | | |")
            continue
        st = r.get("stats") or {}
        inband = st.get("inband_bytes_sent", 0) + st.get("inband_bytes_received", 0)
        link = st.get("link_bytes_sent", 0) + st.get("link_bytes_received", 0)
        lines.append(
            head
            + f"| {_fmt(r.get('round_s'), 2)} | {_fmt(r.get('floor_s'), 2)} "
            f"| {_fmt(r.get('overhead_s'), 2)} | {_fmt(r.get('wall_s'), 1)} "
            f"| {human_size(inband) if st else '-'} | {human_size(link) if st else '-'} "
            f"| {human_size(r['server_tx_bytes']) if 'server_tx_bytes' in r else '-'} "
            f"| {human_size(r['server_rx_bytes']) if 'server_rx_bytes' in r else '-'} "
            f"| {_fmt(r['superlink_peak_rss_bytes'] / MiB)} "
            f"| {_fmt((r.get('serverapp_peak_rss_bytes') or 0) / MiB)} "
            f"| {_fmt(r.get('agg_tail_s'), 2)} | {_fmt(r.get('agg_train_s'), 2)} |"
        )
    ratios = meta.get("ratios")
    if ratios:
        lines += ["", "Overhead ratios (in-band / transport, same model size):", ""]
        for k, v in ratios.items():
            lines.append(f"- {k}: {v:.2f}x")
    return "\n".join(lines) + "\n"


def e2e_plots(rows: list[dict[str, Any]], out: Path, title: str) -> list[str]:
    plt = _plt()
    if plt is None:
        return []
    ok = [r for r in rows if "round_s" in r]
    if not ok:
        return []
    sizes = sorted({r["model_mib"] for r in ok})
    transports = list(dict.fromkeys(r["transport"] for r in ok))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / max(1, len(transports))
    for i, t in enumerate(transports):
        ys = []
        for s in sizes:
            m = [r["round_s"] for r in ok if r["transport"] == t and r["model_mib"] == s]
            ys.append(m[0] if m else 0)
        ax.bar([j + i * width for j in range(len(sizes))], ys, width, label=t)
    ax.set_xticks([j + width * (len(transports) - 1) / 2 for j in range(len(sizes))])
    ax.set_xticklabels([f"{s:g} MiB" for s in sizes])
    ax.set_ylabel("round time (s)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / "e2e-round-time.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path.name]


# --------------------------------------------------------------------------------------


def write_outputs(kind: str, rows: list[dict[str, Any]], meta: dict[str, Any],
                  out: str | os.PathLike[str], plots: bool = True) -> dict[str, str]:
    """Write ``<kind>.json``, ``<kind>.md`` and the plots into ``out``; return their paths."""
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    doc = {"kind": kind, "meta": meta, "environment": environment(), "results": rows}
    paths: dict[str, str] = {}
    jp = outdir / f"{kind}.json"
    jp.write_text(json.dumps(doc, indent=2, default=str), encoding="utf-8")
    paths["json"] = str(jp)
    md_text = (p2p_markdown if kind == "p2p" else e2e_markdown)(rows, meta)
    mp = outdir / f"{kind}.md"
    mp.write_text(md_text, encoding="utf-8")
    paths["markdown"] = str(mp)
    if plots:
        title = f"{kind} ({meta.get('wan_desc') or 'loopback'})"
        files = (p2p_plots if kind == "p2p" else e2e_plots)(rows, outdir, title)
        if files:
            paths["plots"] = ", ".join(str(outdir / f) for f in files)
        else:
            paths["plots"] = "skipped (pip install -e benchmarks for matplotlib)"
    return paths


def e2e_profiles_plot(docs: list[dict[str, Any]], path: str | os.PathLike[str]) -> str | None:
    """One figure from several ``e2e.json`` documents: round time per transport, grouped
    by WAN profile (and model size), the floor drawn as a lighter bar behind."""
    plt = _plt()
    if plt is None:
        return None
    groups: list[tuple[str, list[dict[str, Any]]]] = []
    for d in docs:
        prof = (d.get("meta") or {}).get("wan") or "loopback"
        by_size: dict[float, list[dict[str, Any]]] = defaultdict(list)
        for r in d.get("results", []):
            if r.get("kind") == "model" and "round_s" in r:
                by_size[r["model_mib"]].append(r)
        for size, rs in sorted(by_size.items()):
            groups.append((f"{prof}\n{size:g} MiB", rs))
    if not groups:
        return None
    transports = list(dict.fromkeys(r["transport"] for _, rs in groups for r in rs))
    width = 0.8 / max(1, len(transports))
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(groups)), 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, t in enumerate(transports):
        xs, ys, floors = [], [], []
        for j, (_, rs) in enumerate(groups):
            m = [r for r in rs if r["transport"] == t]
            if m:
                xs.append(j + i * width)
                ys.append(m[0]["round_s"])
                floors.append(m[0].get("floor_s") or 0)
        c = colors[i % len(colors)]
        ax.bar(xs, ys, width, label=t, color=c)
        ax.bar(xs, floors, width, color="white", alpha=0.45, hatch="//", edgecolor=c)
    ax.set_xticks([j + width * (len(transports) - 1) / 2 for j in range(len(groups))])
    ax.set_xticklabels([g for g, _ in groups])
    ax.set_ylabel("round time (s); hatched: control-plane floor")
    ax.set_title("End-to-end round time per transport and WAN profile")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def e2e_nodes_plot(docs: list[dict[str, Any]], path: str | os.PathLike[str]) -> str | None:
    """Round time vs number of SuperNodes, one line per (transport, server uplink, model
    size), from several ``e2e.json`` documents (one per N). Panels: round time, payload
    overhead (round - floor), MiB through the server's uplink per round (when recorded)."""
    plt = _plt()
    if plt is None:
        return None
    Pt = tuple[int, float, float | None, float | None]
    series: dict[tuple[str, str, float], list[Pt]] = defaultdict(list)
    for d in docs:
        meta = d.get("meta") or {}
        n = meta.get("nodes")
        rate = meta.get("server_rate_mbit")
        rounds = meta.get("rounds") or 1
        up = f"{rate / 1000:g} Gbit/s uplink" if rate else (meta.get("wan") or "loopback")
        for r in d.get("results", []):
            if r.get("kind") == "model" and "round_s" in r and n:
                tx = r.get("server_tx_bytes")
                series[(r["transport"].split("?")[0], up, r["model_mib"])].append(
                    (n, r["round_s"], r.get("overhead_s"),
                     tx / MiB / rounds if tx is not None else None))
    if not series:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    colors = {"inband": "tab:gray", "tcp://": "tab:blue", "s3://": "tab:orange"}
    styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]
    ups = sorted({k[1] for k in series})
    for (t, up, size), pts in sorted(series.items()):
        pts.sort()
        ls, mk = styles[ups.index(up) % len(styles)]
        label = f"{t} {up}, {size:g} MiB"
        for ax, idx in zip(axes, (1, 2, 3)):
            xy = [(p[0], p[idx]) for p in pts if p[idx] is not None]
            if xy:
                ax.plot([x for x, _ in xy], [y for _, y in xy], ls, marker=mk,
                        color=colors.get(t), label=label)
    whats = ("round time (s)", "payload overhead above the floor (s)",
             "MiB through the server's uplink per round")
    for a, what in zip(axes, whats):
        a.set_xlabel("SuperNodes (N)")
        a.set_ylabel(what)
        a.set_xticks(sorted({p[0] for pts in series.values() for p in pts}))
        a.grid(True, alpha=0.3)
    axes[1].axhline(0, color="black", lw=0.5)
    axes[0].legend(fontsize=7)
    fig.suptitle("Round time vs number of clients per link (emulated WAN, star topology)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
