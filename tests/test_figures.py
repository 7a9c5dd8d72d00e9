"""Published figures are generated from docs/bench-data, not typed (issue 27).

* every ``<!-- figures:begin NAME (generated from FILE.json by ftx-bench render) -->``
  block in README.md and docs/ equals what ``ftx-bench render`` makes of its JSON;
* README.md and docs/benchmarks.md quote no ratio (``4.8x``) or time (``12.3 s``)
  outside a generated block or the History section, except the short allow-list
  (tests/figures-allowlist.txt, each entry with its reason);
* the other docs pages are not converted yet: their count of such figures may only go
  down (PENDING below), so no new hand-typed figure gets in.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

render = pytest.importorskip("ftx_bench.render", reason="pip install -e benchmarks")
from ftx_bench.reproduce import FLOOR_DEFINITION

ROOT = Path(__file__).resolve().parent.parent
FIGURE = re.compile(r"\b\d+(?:\.\d+)?x\b|\b\d+(?:\.\d+)? s\b")
BLOCK = re.compile(r"<!-- figures:begin .*?<!-- figures:end -->", re.DOTALL)
HISTORY = re.compile(r"<!-- figures:history-begin -->.*?<!-- figures:history-end -->",
                     re.DOTALL)
STRICT = ("README.md", "docs/benchmarks.md")
#: pages not converted yet (figures outside blocks/History when issue 27's tooling
#: landed); lower a number when you generate or relabel figures, never raise it.
PENDING = {
    "docs/aggregation.md": 0, "docs/codecs.md": 4, "docs/fda.md": 2, "docs/mpi.md": 0,
    "docs/offload.md": 14, "docs/security.md": 22, "docs/trace.md": 0,
    "docs/links/rdma.md": 4, "docs/links/s3.md": 28, "docs/links/tcp.md": 31,
}


def loose_figures(text: str) -> list[tuple[int, str, str]]:
    """(line number, figure, line) outside generated blocks and History sections."""
    def blank(mo: re.Match) -> str:
        return "\n" * mo.group().count("\n")

    text = HISTORY.sub(blank, BLOCK.sub(blank, text))
    return [(i, m.group(), line) for i, line in enumerate(text.splitlines(), 1)
            for m in FIGURE.finditer(line)]


def allowlist() -> list[tuple[str, str, str]]:
    out = []
    for raw in (ROOT / "tests" / "figures-allowlist.txt").read_text("utf-8").splitlines():
        if raw.strip() and not raw.startswith("#"):
            path, text, reason = (p.strip() for p in raw.split("::"))
            assert reason, f"allow-list entry without a reason: {raw!r}"
            out.append((path, text, reason))
    return out


def test_generated_blocks_match_their_data():
    assert render.stale(ROOT) == [], "run: ftx-bench render"


def test_a_changed_figure_in_a_block_is_caught():
    text = (ROOT / "README.md").read_text("utf-8")
    assert "figures:begin readme-loopback" in text
    good = render.render_text(text, ROOT)
    assert good == text
    head, tail = good.split("figures:begin readme-loopback", 1)
    tampered = head + "figures:begin readme-loopback" + tail.replace(" s |", " s  |", 1)
    assert render.render_text(tampered, ROOT) != tampered


def test_block_says_one_run_commit_and_load_for_a_single_old_run():
    text = (ROOT / "README.md").read_text("utf-8")
    block = text.split("figures:begin readme-loopback", 1)[1].split("figures:end", 1)[0]
    assert "**one run**" in block and "commit `f743704`" in block
    assert "load average before 0.29/" in block


def test_floor_is_defined_once():
    text = (ROOT / "docs" / "benchmarks.md").read_text("utf-8")
    stated = FLOOR_DEFINITION[0].upper() + FLOOR_DEFINITION[1:]
    assert text.count(stated) == 1


@pytest.mark.parametrize("rel", STRICT)
def test_no_hand_typed_figures(rel):
    allowed = [(t, r) for p, t, r in allowlist() if p == rel]
    bad = [f"{rel}:{i}: {fig!r} in: {line.strip()}" for i, fig, line in
           loose_figures((ROOT / rel).read_text("utf-8"))
           if not any(t in line for t, _ in allowed)]
    assert not bad, ("figures outside generated blocks / the History section (generate "
                     "them with ftx-bench render, or move them to History with their "
                     "commit):\n" + "\n".join(bad))


def test_allowlist_entries_are_used():
    for path, text, _ in allowlist():
        lines = [line for _, _, line in loose_figures((ROOT / path).read_text("utf-8"))]
        assert any(text in line for line in lines), f"stale allow-list entry: {path} :: {text}"


@pytest.mark.parametrize("rel", sorted(PENDING))
def test_pending_pages_do_not_gain_figures(rel):
    n = len(loose_figures((ROOT / rel).read_text("utf-8")))
    assert n <= PENDING[rel], (f"{rel} gained hand-typed figures ({n} > {PENDING[rel]}): "
                               "generate them from docs/bench-data (ftx-bench render) or "
                               "label them in a History section")


def test_every_doc_page_is_checked():
    pages = {str(p.relative_to(ROOT)) for p in render.doc_paths(ROOT)}
    unchecked = {p for p in pages - set(STRICT) - set(PENDING)
                 if loose_figures((ROOT / p).read_text("utf-8"))}
    assert not unchecked, f"figures in pages no test covers: {sorted(unchecked)}"
