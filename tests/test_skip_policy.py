"""The suite fails on a skip outside the allowed list (tests/conftest.py): a pytest run
of a throw-away test file with this conftest, in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import skip_allowed

CONFTEST = Path(__file__).with_name("conftest.py")


@pytest.mark.parametrize("reason, env, allowed", [
    ("needs an RDMA NIC (none here)", {}, True),
    ("Ceph radosgw packages unavailable here: apt-get/dpkg not found: ...", {}, True),
    ("Ceph radosgw packages unavailable here: apt-get download failed", {}, False),
    ("flwr_transports.torch needs torch", {}, False),
    ("flwr_transports.torch needs torch", {"FTX_TORCH": "0"}, True),
    ("flwr_transports.torch needs torch", {"FTX_RDMA": "0"}, False),
    ("NIXL is not installed: No module named 'nixl'", {}, False),
    ("NIXL is not installed: No module named 'nixl'", {"FTX_RDMA": "0"}, True),
    ("the deployment harness needs psutil", {"FTX_TORCH": "0", "FTX_RDMA": "0"}, False),
    ("mpiexec not found: pip install flwr-transports[mpi]", {}, False),
])
def test_allowed_list(reason, env, allowed):
    assert (skip_allowed(reason, env) is not None) is allowed


def _run(tmp_path, body: str, **env) -> subprocess.CompletedProcess:
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_x.py").write_text(body)
    full = {k: v for k, v in os.environ.items()
            if k not in {"FTX_TORCH", "FTX_RDMA", "FTX_RADOSGW", "FTX_MPI", "FTX_DOCS", "FTX_RAY",
                         "FTX_ALLOW_SKIPS", "PYTEST_ADDOPTS"}}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-p", "no:randomly", str(tmp_path)], capture_output=True,
                          text=True, cwd=tmp_path, env=full, timeout=120, check=False)


def test_a_missing_dependency_fails_the_run(tmp_path):
    out = _run(tmp_path, "import pytest\n"
                         "pytest.importorskip('no_such_module_ftx', reason='needs torch')\n"
                         "def test_a():\n    pass\n")
    assert out.returncode == 1, out.stdout
    assert "skips outside the allowed list" in out.stdout
    assert "needs torch" in out.stdout


def test_an_opt_out_or_hardware_skip_passes(tmp_path):
    body = ("import pytest\n"
            "@pytest.mark.skip(reason='needs torch')\n"
            "def test_a():\n    pass\n"
            "@pytest.mark.skip(reason='needs an RDMA NIC')\n"
            "def test_b():\n    pass\n"
            "def test_c():\n    pass\n")
    assert _run(tmp_path, body, FTX_TORCH="0").returncode == 0
    assert _run(tmp_path, body).returncode == 1
    assert _run(tmp_path, body, FTX_ALLOW_SKIPS="1").returncode == 0


def test_a_failure_keeps_its_exit_status(tmp_path):
    out = _run(tmp_path, "def test_a():\n    assert False\n")
    assert out.returncode == 1
