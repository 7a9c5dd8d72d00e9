"""Structural rules of the library (issue 23), checked on its source: no import circle;
environment variables read only through ``flwr_transports.settings``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import flwr_transports

LIB = Path(flwr_transports.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    mods = {}
    for p in LIB.rglob("*.py"):
        rel = p.relative_to(LIB.parent).with_suffix("")
        name = ".".join(rel.parts)
        mods[name.removesuffix(".__init__")] = p
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(p.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]
            graph[m].update(t for t in targets if t in mods and t != m)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_library_has_no_import_circle():
    mods = _modules()
    assert "flwr_transports.flower.wrapper" in mods  # the walk found the library
    assert _cycles(_imports(mods)) == []


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


_ENV_READ = re.compile(r"os\.environ|os\.getenv|getenv\(")


def test_environment_is_read_only_in_settings():
    """Every FLWR_TRANSPORTS_* variable goes through flwr_transports.settings; other
    environment access is limited to a link handing variables to its engine, the engine's
    own variables, and the test deployment passing the environment on."""
    allowed = {
        "settings.py",
        # a link handing variables to its engine, or the engine's own variable
        "links/rdma.py",  # UCX_*, NIXL_LOG_LEVEL
        "mpi/launcher.py",  # MPIR_CVAR_*
        "aggregation/ray_shards.py",  # RAY_ADDRESS
    }
    # the test harness hands the environment on to the processes it starts
    allowed_dirs = ("testing/",)
    offenders = []
    for p in LIB.rglob("*.py"):
        rel = p.relative_to(LIB).as_posix()
        if rel in allowed or rel.startswith(allowed_dirs):
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if _ENV_READ.search(line):
                offenders.append(f"{rel}:{i}: {line.strip()}")
    assert offenders == []


def test_every_setting_mentioned_in_the_library_is_declared():
    from flwr_transports.settings import SETTINGS

    names = set()
    for p in LIB.rglob("*.py"):
        names.update(re.findall(r"FLWR_TRANSPORTS_[A-Z0-9_]+", p.read_text()))
    assert sorted(names - set(SETTINGS)) == []


def test_a_client_cap_is_never_raised_by_the_server(monkeypatch):
    """Precedence (settings.py): a client-side cap from the environment bounds what a
    server's descriptor asks for, and never raises it."""
    from flwr_transports.links.s3_http import clamp_concurrency
    from flwr_transports.links.tcp import endpoint_from

    monkeypatch.delenv("FLWR_TRANSPORTS_S3_CONCURRENCY", raising=False)
    assert clamp_concurrency(32) == 32
    monkeypatch.setenv("FLWR_TRANSPORTS_S3_CONCURRENCY", "4")
    assert clamp_concurrency(32) == 4  # the server asked for more: the cap wins
    assert clamp_concurrency(2) == 2  # the server asked for less: never raised
    loc = {"host": "127.0.0.1", "port": 9, "id": "a" * 32, "token": "b" * 64,
           "timeout": 600}
    monkeypatch.delenv("FLWR_TRANSPORTS_TCP_TIMEOUT", raising=False)
    assert endpoint_from(loc)[0].timeout == 600
    monkeypatch.setenv("FLWR_TRANSPORTS_TCP_TIMEOUT", "30")
    assert endpoint_from(loc)[0].timeout == 30
    assert endpoint_from({**loc, "timeout": 5})[0].timeout == 5


def test_a_transport_url_is_parsed_once(monkeypatch, tmp_path):
    """offload() parses the URL once; the link (and a second wrapper for a strategy
    with its own loop) receive the parsed value, never the string."""
    from flwr.serverapp.strategy import FedAvg

    from flwr_transports import offload, options
    from flwr_transports.flower.wrapper import _StrategyGrid
    from flwr_transports.options import TransportSpec

    calls = []
    real = options.split_transport

    def counting(url):
        calls.append(url)
        return real(url)

    monkeypatch.setattr(options, "split_transport", counting)
    s = offload(FedAvg(), f"file://{tmp_path}?threshold=1&mode=640", reply_slots=1)
    assert isinstance(s.spec, TransportSpec) and s.spec.link.mode == 0o640
    assert s.spec.source("mode") == "url" and s.spec.source("reply_slots") == "keyword"
    link = s._ensure_link(object())  # a grid without a run: run id 0
    try:
        assert link.spec is s.spec and link.root == str(tmp_path.resolve())
    finally:
        s.close()
    from flwr_transports.flower.wrapper import Offloader

    g = _StrategyGrid.__new__(_StrategyGrid)
    Offloader.__init__(g, s.spec)  # what OffloadStrategy.start hands its grid wrapper
    assert g.spec is s.spec
    assert len(calls) == 1, calls
    with pytest.raises(TypeError, match="parsed TransportSpec"):
        Offloader.__init__(g, s.spec, threshold=5)
    with pytest.raises(TypeError):
        s.spec.link["mode"] = 0o600  # parsed options are immutable
