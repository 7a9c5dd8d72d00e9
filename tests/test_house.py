"""Structural rules of the library (issue 23), checked on its source: no import circle;
every environment variable declared in ``flwr_transports.settings``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

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


def test_every_setting_mentioned_in_the_library_is_declared():
    from flwr_transports.settings import SETTINGS

    names = set()
    for p in LIB.rglob("*.py"):
        names.update(re.findall(r"FLWR_TRANSPORTS_[A-Z0-9_]+", p.read_text()))
    assert sorted(names - set(SETTINGS)) == []
