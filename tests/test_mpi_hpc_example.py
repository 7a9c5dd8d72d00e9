"""examples/mpi-hpc: the llm-offload app as one MPI job, through the example's run.sh.

``N_CLIENTS=2 examples/mpi-hpc/run.sh ...`` under a real ``mpiexec`` (3 ranks), tiny
model, 2 rounds (~20 s on a 2-core machine). Checked: the job succeeds, the loss goes
down, and every transfer over MPI was bit-exact (tests/llm_checks.py: clients got
exactly the previous global model; each global model is FedAvg of exactly what the
clients sent, computed here).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the llm-offload example needs torch")

from llm_checks import TINY, check_loss_goes_down, check_transfers_bit_exact

RUN_SH = Path(__file__).resolve().parent.parent / "examples" / "mpi-hpc" / "run.sh"
BIN = Path(sys.executable).parent
MPIEXEC = str(BIN / "mpiexec") if (BIN / "mpiexec").exists() else shutil.which("mpiexec")
pytestmark = [
    pytest.mark.mpi,
    pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found: pip install "
                       "flwr-transports[mpi]"),
    pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None,
                       reason="mpi4py not installed: pip install flwr-transports[mpi]"),
]
ROUNDS = 2


def _toml(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    return f"'{v}'" if isinstance(v, str) else str(v)


def test_llm_example_under_mpiexec(tmp_path):
    cfg = {**TINY, "num-server-rounds": ROUNDS, "result-dir": str(tmp_path)}
    overrides = " ".join(f"{k}={_toml(v)}" for k, v in cfg.items())
    env = {**os.environ, "N_CLIENTS": "2", "MPIEXEC": MPIEXEC, "PYTHONUNBUFFERED": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(["bash", str(RUN_SH), overrides], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"run.sh did not finish within 240 s:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    assert "llm-offload: round 2" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    check_loss_goes_down(summary, ROUNDS)
    check_transfers_bit_exact(tmp_path, summary, ROUNDS)
