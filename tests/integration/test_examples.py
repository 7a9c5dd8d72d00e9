"""Every example runs as its README says (issue 22).

Each example's README has a ``<!-- ci:setup -->`` block (the pip lines a user runs) and
a ``<!-- ci:run -->`` block (the commands). This test checks that what the setup block
installs is installed here (scripts/test.sh installs the same), then runs the run block
AS WRITTEN with bash from the repository root, with this environment's ``bin`` first
on PATH (what activating it does), and checks that it succeeds.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
_BLOCK = re.compile(r"^<!-- ci:(setup|run) -->\n```bash\n(.*?)^```\s*$",
                    re.DOTALL | re.MULTILINE)

EXAMPLES = [
    # (example, marks, timeout s, a line its output must have)
    ("quickstart-offload", (), 600, r"run finished in"),
    ("llm-offload", (), 900, r"run finished in"),
    ("mpi-hpc", (pytest.mark.mpi,), 600, r"llm-offload: round 2"),
    ("s3-radosgw", (pytest.mark.radosgw,), 1200, r"bucket empty after the run"),
]


def readme_blocks(example: str) -> dict[str, str]:
    blocks = dict(_BLOCK.findall((ROOT / "examples" / example / "README.md").read_text()))
    assert set(blocks) == {"setup", "run"}, f"{example}/README.md: {sorted(blocks)}"
    return blocks


def _installed(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def check_setup_installed(block: str) -> None:
    """Every requirement of the setup block's ``pip install`` lines is installed here."""
    from packaging.requirements import Requirement

    for line in block.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        args = shlex.split(line)
        assert args[:2] == ["pip", "install"], line
        for arg in (a for a in args[2:] if a != "-e"):
            if arg == "benchmarks":
                assert _installed("ftx-bench"), "pip install -e benchmarks"
                continue
            req = Requirement(arg.replace(".[", "flwr-transports[") if arg.startswith(".")
                              else arg)
            got = _installed(req.name)
            assert got and (not req.specifier or got.split("+")[0] in req.specifier), (
                f"{arg}: installed {got}")
            for extra in req.extras:
                for dep in md.requires(req.name) or []:
                    dreq = Requirement(dep)
                    if dreq.marker and dreq.marker.evaluate({"extra": extra}):
                        assert _installed(dreq.name), f"{req.name}[{extra}] needs {dreq.name}"


@pytest.mark.parametrize("example", [e[0] for e in EXAMPLES])
def test_readme_has_setup_and_run_blocks(example):
    blocks = readme_blocks(example)
    assert "~/.flwr" not in blocks["run"] and "config.toml" not in blocks["run"]
    check_setup_installed(blocks["setup"])


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("example, timeout, expect", [
    pytest.param(name, t, exp, marks=marks, id=name) for name, marks, t, exp in EXAMPLES])
def test_example_runs_as_its_readme_says(example, timeout, expect, tmp_path):
    blocks = readme_blocks(example)
    check_setup_installed(blocks["setup"])
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "VIRTUAL_ENV": str(BIN.parent), "PYTHONUNBUFFERED": "1",
           # a user's Flower CLI home: the examples must not need (or change) it
           "FLWR_HOME": str(tmp_path / "user-flwr-home")}
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", blocks["run"]], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        pytest.fail(f"{example}: the README's commands ran over {timeout} s:\n{out[-4000:]}")
    assert proc.returncode == 0, f"{example}:\n{out[-5000:]}"
    n_cmds = len([ln for ln in blocks["run"].splitlines() if ln.strip()])
    assert len(re.findall(expect, out)) >= n_cmds if expect.startswith("run finished") \
        else re.search(expect, out), out[-4000:]
    assert not (tmp_path / "user-flwr-home").exists()
