"""Opt-in timing trace of the payload work, to see where a round's seconds go.

Set ``FLWR_TRANSPORTS_TRACE=DIR`` in the environment of the ServerApp and of the
ClientApps (SuperNodes pass their environment on). Each process then appends one JSON
line per event to ``DIR/ftx-trace-<pid>.jsonl``::

    {"ev": "fetch", "role": "client", "round": 3, "phase": "train", "t0": 1764...,
     "t1": 1764..., "bytes": 524288123, "scheme": "tcp", "pid": 4242}

Times are wall-clock seconds (``time.time()``): comparable between processes of one
host, and between hosts only as far as their clocks agree. Events:

* server: ``publish`` (encode + put one outgoing payload on the link), ``receive``
  (offload's receive loop: push done -> every reply pulled or the timeout; with
  ``pulls``, ``replies``, ``missing`` and ``landed_to_reply``, the seconds from the
  last upload landing on the link to the pull that brought the last reply), ``resolve``
  (checking, fetching and decoding one phase's replies), ``aggregate`` (the inner
  strategy's ``aggregate_train``/``aggregate_evaluate``, streaming folds included);
* client: ``fetch`` (open + read + verify + decode one payload), ``app`` (the
  ClientApp's own function), ``upload`` (encode + upload one reply payload). Client
  events carry ``proc_t0``, when their ClientApp process started (Flower starts one
  per message), where /proc tells it.

:func:`breakdown` turns the events of a run into a per-round critical path
(``ftx-bench e2e --trace`` prints it). Tracing off costs one environment
lookup per event; nothing is written and no file is created.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ENV = "FLWR_TRANSPORTS_TRACE"
_lock = threading.Lock()


def trace_dir() -> str | None:
    """The trace directory, or None when tracing is off."""
    from .settings import raw

    return raw(ENV)


@functools.cache
def _proc_start() -> float | None:
    """Wall-clock time this process started (Linux /proc, ~10 ms), else None."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read(4096).rpartition(b")")[2].split()
        with open("/proc/uptime", "rb") as f:
            up = float(f.read(64).split()[0])
        ticks = int(fields[19])  # field 22 of stat: starttime, clock ticks after boot
        return time.time() - (up - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def record(ev: str, t0: float, t1: float, **fields: Any) -> None:
    """Append one event (no-op when tracing is off; never raises)."""
    d = trace_dir()
    if d is None:
        return
    if fields.get("role") == "client" and "proc_t0" not in fields:
        fields["proc_t0"] = _proc_start()
    line = json.dumps({"ev": ev, "t0": t0, "t1": t1, "pid": os.getpid(), **fields},
                      default=str)
    try:
        os.makedirs(d, exist_ok=True)
        with _lock, open(os.path.join(d, f"ftx-trace-{os.getpid()}.jsonl"), "a",
                         encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError:
        pass  # a trace must never break a run


@contextmanager
def span(ev: str, **fields: Any) -> Iterator[dict[str, Any]]:
    """Time the block as event ``ev``; the yielded dict takes fields known only later
    (e.g. ``bytes``). Failed blocks are recorded with ``"error": True``."""
    extra: dict[str, Any] = {}
    if trace_dir() is None:
        yield extra
        return
    t0 = time.time()
    ok = False
    try:
        yield extra
        ok = True
    finally:
        record(ev, t0, time.time(), **fields, **extra, **({} if ok else {"error": True}))


def message_fields(msg: Any) -> dict[str, Any]:
    """``phase`` (the message type: train, evaluate, ...) and ``round`` of a Flower
    message, as far as known. The round is the ``server-round`` config value Flower's
    strategies put in every instruction, else the message's group id if it is a
    number."""
    out: dict[str, Any] = {}
    md = getattr(msg, "metadata", None)
    if md is None:
        return out
    try:
        out["phase"] = str(md.message_type).split(".")[0]
    except (AttributeError, TypeError, ValueError):
        pass
    r: Any = None
    try:
        if msg.has_content():
            for cfg in msg.content.config_records.values():
                if "server-round" in cfg:
                    r = cfg["server-round"]
                    break
    except Exception:  # noqa: BLE001 - a trace never fails a message
        r = None
    if r is None:
        r = getattr(md, "group_id", None)
    try:
        if not isinstance(r, bool):
            out["round"] = int(r)
    except (TypeError, ValueError):
        pass
    return out


def read_events(d: str | os.PathLike) -> list[dict[str, Any]]:
    """Every event under ``d`` (lines that do not parse are skipped), by start time."""
    out: list[dict[str, Any]] = []
    for p in sorted(Path(d).glob("ftx-trace-*.jsonl")):
        for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if isinstance(e, dict) and isinstance(e.get("t0"), int | float) and isinstance(
                    e.get("t1"), int | float):
                out.append(e)
    out.sort(key=lambda e: e["t0"])
    return out


def breakdown(events: list[dict[str, Any]], phase: str = "train") -> list[dict[str, Any]]:
    """Per server round of ``phase``, the critical path in seconds:

    * ``publish``: the server encoding + publishing the outgoing payload(s);
    * ``to_clients``: publish done -> the first client starts fetching (Flower
      delivering the instructions: its polls);
    * ``node_wait``: push done -> the slowest node's ClientApp process started (the
      SuperNode's idle poll, every 3 s, and the SuperExec's task poll, every 1 s);
      ``spawn``: that process's start -> its first payload event (interpreter and
      ClientApp start-up, the message handed over); both need offload's receive loop
      (the push time) and client events with ``proc_t0``;
    * ``fetch``: first fetch start -> last fetch end over all clients, with
      ``fetch_max`` (the slowest single fetch) and ``fetch_mib_s`` (bytes over the
      slowest fetch's time, per client);
    * ``app``: the longest ClientApp function; ``upload``: the longest reply upload;
    * ``to_server``: the last upload done -> the server starts resolving the replies
      (Flower carrying the replies back: its polls);
    * ``receive``: offload's receive loop (push done -> replies in), with ``pulls``
      (SuperLink pulls it made) and ``landed_to_reply`` (last upload landed -> the
      pull that brought the last reply);
    * ``resolve``: the server's reply checking/fetching/decoding; ``aggregate``: the
      inner strategy's aggregation;
    * ``total``: first publish start -> aggregation end.
    """
    rounds: dict[int, dict[str, list[dict[str, Any]]]] = {}
    for e in events:
        r = e.get("round")
        if isinstance(r, int) and e.get("phase") == phase:
            rounds.setdefault(r, {}).setdefault(e["ev"], []).append(e)
    out = []
    for r in sorted(rounds):
        ev = rounds[r]
        row: dict[str, Any] = {"round": r}
        first = functools.partial(_first, ev)
        last = functools.partial(_last, ev)
        longest = functools.partial(_longest, ev)
        if ev.get("publish"):
            row["publish"] = sum(e["t1"] - e["t0"] for e in ev["publish"])
        pub_end, f0, f1 = last("publish"), first("fetch"), last("fetch")
        if pub_end is not None and f0 is not None:
            row["to_clients"] = f0 - pub_end
        if f0 is not None and f1 is not None:
            row["fetch"] = f1 - f0
            row["fetch_max"] = longest("fetch")
            big = max(ev["fetch"], key=lambda e: e["t1"] - e["t0"])
            if big.get("bytes") and big["t1"] > big["t0"]:
                row["fetch_mib_s"] = big["bytes"] / (big["t1"] - big["t0"]) / 2**20
        for name in ("app", "upload"):
            if ev.get(name):
                row[name] = longest(name)
        up_end = last("upload")
        res0 = min((t for t in (first("resolve"), first("aggregate")) if t is not None),
                   default=None)
        if up_end is not None and res0 is not None:
            row["to_server"] = res0 - up_end
        rcv = ev.get("receive") or []
        if rcv:
            push = min(e["t0"] for e in rcv)
            row["receive"] = sum(e["t1"] - e["t0"] for e in rcv)
            row["pulls"] = sum(int(e.get("pulls") or 0) for e in rcv)
            lr = [e["landed_to_reply"] for e in rcv
                  if isinstance(e.get("landed_to_reply"), int | float)]
            if lr:
                row["landed_to_reply"] = max(lr)
            # per ClientApp process: when it started, when its first payload event began
            procs: dict[Any, tuple[float, float]] = {}
            for name in ("fetch", "app", "upload"):
                for e in ev.get(name) or []:
                    p0 = e.get("proc_t0")
                    if isinstance(p0, int | float) and p0 >= push - 1.0:
                        first_ev = min(e["t0"], procs.get(e.get("pid"), (p0, e["t0"]))[1])
                        procs[e.get("pid")] = (p0, first_ev)
            if procs:
                row["node_wait"] = max(max(p0 - push, 0.0) for p0, _ in procs.values())
                row["spawn"] = max(t - p0 for p0, t in procs.values())
        if ev.get("resolve"):
            row["resolve"] = sum(e["t1"] - e["t0"] for e in ev["resolve"])
        if ev.get("aggregate"):
            row["aggregate"] = sum(e["t1"] - e["t0"] for e in ev["aggregate"])
        start = first("publish")
        end = last("aggregate") or last("resolve")
        if start is not None and end is not None:
            row["total"] = end - start
        out.append(row)
    return out


def _first(ev: dict[str, list[dict[str, Any]]], name: str) -> float | None:
    xs = ev.get(name) or []
    return min(e["t0"] for e in xs) if xs else None


def _last(ev: dict[str, list[dict[str, Any]]], name: str) -> float | None:
    xs = ev.get(name) or []
    return max(e["t1"] for e in xs) if xs else None


def _longest(ev: dict[str, list[dict[str, Any]]], name: str) -> float | None:
    xs = ev.get(name) or []
    return max(e["t1"] - e["t0"] for e in xs) if xs else None


def format_breakdown(rows: list[dict[str, Any]]) -> str:
    """A table of :func:`breakdown` rows (seconds; fetch rate in MiB/s)."""
    cols = ["publish", "to_clients", "node_wait", "spawn", "fetch", "app", "upload",
            "to_server", "receive", "pulls", "resolve", "aggregate", "total", "fetch_mib_s"]
    lines = ["round " + " ".join(f"{c:>11}" for c in cols)]
    for row in rows:
        cells = []
        for c in cols:
            v = row.get(c)
            cells.append(f"{v:>11.2f}" if isinstance(v, int | float) else f"{'-':>11}")
        lines.append(f"{row['round']:>5} " + " ".join(cells))
    return "\n".join(lines)
