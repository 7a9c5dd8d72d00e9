"""``ftx-bench reproduce loopback-e2e --quick`` (issue 27): a real loopback Flower
deployment (in-band, then shm://, a few MiB), its JSON and the block rendered from it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

render = pytest.importorskip("ftx_bench.render", reason="pip install -e benchmarks")
from ftx_bench.reproduce import FLOOR_DEFINITION, TABLES

pytestmark = pytest.mark.slow


def test_every_published_table_has_a_command():
    assert {"loopback-e2e", "wan-e2e", "n-sweep", "p2p-link", "memory", "mpi",
            "fda-bytes"} <= set(TABLES)
    for t in TABLES.values():
        assert t.full and t.quick, t.name


def test_quick_loopback_records_everything_and_renders(tmp_path: Path):
    out = tmp_path / "repro.json"
    cp = subprocess.run([sys.executable, "-m", "ftx_bench", "reproduce", "loopback-e2e",
                         "--quick", "--out", str(out)], capture_output=True, text=True,
                        timeout=600, check=False)
    assert out.exists(), cp.stderr[-3000:]
    doc = json.loads(out.read_text("utf-8"))
    for key in ("commit", "dirty", "flwr_version", "command", "cpus", "time_utc",
                "floor_definition", "repeat", "quick", "invocations", "ok"):
        assert key in doc, key
    assert len(doc["commit"]) == 40 and doc["flwr_version"]
    assert doc["command"].endswith("reproduce loopback-e2e --quick --out " + str(out))
    assert doc["floor_definition"] == FLOOR_DEFINITION
    inv = doc["invocations"]["4MiB"]
    assert "rerun_for_load" in inv and len(inv["repeats"]) == doc["repeat"] == 1
    for rec in inv["repeats"] + inv["rerun_for_load"]:
        assert len(rec["load_before"]) == 3 and len(rec["load_after"]) == 3
        assert "--out" in rec["argv"]
    for rec in inv["rerun_for_load"]:  # re-run only when the load exceeded the cores
        assert rec["load_before"][0] > doc["cpus"] and rec["discarded"]
    rep = inv["repeats"][0]
    assert rep["rc"] == 0, rep["output_tail"]
    assert {"inband@4MiB", "shm://@4MiB"} <= set(rep["points"])
    assert inv["points"]["inband@4MiB"]["round_s"]["n"] == 1
    assert "inband/shm://@4MiB round" in inv["ratios"]
    block = render.render_block("t", [str(out)], tmp_path)
    assert "1 repeat(s) per point" in block and doc["commit"][:7] in block
    assert "inband/shm://@4MiB round" in block and FLOOR_DEFINITION in block
    assert doc["ok"] is True


@pytest.mark.parametrize("sensitive", [True, False])
def test_only_a_load_sensitive_table_waits_and_repeats_for_the_load(tmp_path, monkeypatch,
                                                                    sensitive):
    """A table of peaks or byte counts neither waits for the load nor reruns for it;
    a timing table reruns a repeat that started above the core count (load faked
    high; the driver is a real, trivial subprocess)."""
    from ftx_bench import reproduce as rp

    monkeypatch.setattr(rp.os, "getloadavg", lambda: (99.0, 99.0, 99.0))
    table = rp.Table("t", "t", [rp.Invocation("x", [sys.executable, "-c", "print(1)"],
                                              "text")], [], load_sensitive=sensitive)
    doc = rp.reproduce(table, 2, False, tmp_path / "t.json", ["test"], max_retries=1,
                       pause_s=0.0, progress=lambda m: None)
    inv = doc["invocations"]["x"]
    assert [r["rc"] for r in inv["repeats"]] == [0, 0]
    assert doc["load_sensitive"] is sensitive
    assert len(inv["rerun_for_load"]) == (2 if sensitive else 0)
    assert all(bool(r.get("load_warning")) is sensitive for r in inv["repeats"])
    assert all(r["load_before"] == [99.0] * 3 for r in inv["repeats"])
