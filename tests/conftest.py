"""Shared test fixtures (kept small: most helpers live next to the tests using them)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# A bug must fail the tests: with this set, the offload wrapper re-raises an unexpected
# exception type met while handling one reply instead of only rejecting that reply
# (production behaviour). Deployment subprocesses inherit it.
os.environ.setdefault("FLWR_TRANSPORTS_STRICT", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "examples"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def quickstart_app() -> Path:
    """The example Flower app driven by the deployment tests and benchmarks."""
    app = EXAMPLES / "quickstart-offload"
    assert (app / "pyproject.toml").is_file(), f"example app missing at {app}"
    return app


def _ftx_names(root: Path, prefix: str = "ftx-") -> set[str]:
    try:
        names = [p.name for p in root.iterdir()]
    except OSError:
        return set()
    return {n for n in names if n.lstrip(".").startswith(prefix)}


@pytest.fixture(scope="session")
def ftx_names():
    """``ftx_names(dir=/dev/shm)``: names a link created there (hidden temp names too)."""
    return lambda root=Path("/dev/shm"): _ftx_names(Path(root))


@pytest.fixture(scope="session", autouse=True)
def _no_hydra_leftovers():
    """MPICH's mpiexec (Hydra) writes /tmp/hydra_hwloc_xmlfile_* and leaves it behind
    when a job ends through MPI_Abort, which the failure tests do on purpose (a stalled
    or dead rank). Remove the ones this test session created (mpiexec ignores TMPDIR)."""
    import glob
    import os

    pattern = "/tmp/hydra_hwloc_xmlfile_*"
    before = set(glob.glob(pattern))
    yield
    for path in set(glob.glob(pattern)) - before:
        try:
            os.unlink(path)
        except OSError:
            pass
