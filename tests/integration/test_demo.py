"""`flwr-transports demo` end to end (the README's first command runs it)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.integration
def test_demo_runs_and_reports_identical_models(tmp_path):
    before = {e for e in os.listdir("/dev/shm") if e.lstrip(".").startswith("ftx-")}
    proc = subprocess.run(
        [sys.executable, "-m", "flwr_transports.cli", "demo", "--model-mib", "2",
         "--rounds", "1", "--transports", "shm,inband"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    rows = [line for line in out.splitlines() if line.startswith("| shm://") or
            line.startswith("| inband")]
    assert len(rows) == 2, out[-3000:]
    assert all(r.rstrip(" |").endswith("yes") for r in rows), rows
    after = {e for e in os.listdir("/dev/shm") if e.lstrip(".").startswith("ftx-")}
    assert after <= before
