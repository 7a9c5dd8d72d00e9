"""What the library package holds and what it no longer holds (issue 22): the benchmark
harness lives in benchmarks/ (the ftx-bench project), LocalDeployment in the library's
testing package, importable without pytest, moto or the harness."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import flwr_transports
from flwr_transports import cli

REPO = Path(__file__).resolve().parents[1]
PKG = Path(flwr_transports.__file__).resolve().parent


def test_library_package_holds_no_harness():
    assert not (PKG / "bench").exists()
    assert not list(PKG.rglob("*.c"))
    assert (REPO / "benchmarks" / "ftx_bench" / "delay_relay.c").is_file()
    assert (REPO / "benchmarks" / "pyproject.toml").is_file()


def test_bench_command_points_at_ftx_bench(capsys):
    rc = cli.main(["bench", "e2e", "--sizes", "1MiB"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "pip install -e benchmarks" in err
    assert "ftx-bench e2e --sizes 1MiB" in err
    assert "bench" not in cli.COMMANDS
    for kept in ("doctor", "cleanup", "inspect", "demo"):
        assert kept in cli.COMMANDS


def test_testing_imports_without_pytest_moto_or_harness():
    code = (
        "import sys\n"
        "from flwr_transports.testing import (InProcessGrid, LocalDeployment,\n"
        "    set_task_identity, DeploymentError, RunResult)\n"
        "import flwr_transports.testing as t\n"
        "assert set(t.__all__) >= {'InProcessGrid', 'LocalDeployment', 'set_task_identity'}\n"
        "bad = [m for m in ('pytest', 'moto', 'ftx_bench', 'hypothesis') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd="/", check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"

