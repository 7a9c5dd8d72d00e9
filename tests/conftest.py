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


def radosgw_cannot_install(exc: BaseException) -> bool:
    """True for the one radosgw failure that skips: a host without apt-get/dpkg (it
    cannot install the Ceph packages; ALLOWED_SKIPS below). Any other failure to
    fetch, unpack or start radosgw fails the test."""
    return "apt-get/dpkg not found" in str(exc)


@pytest.fixture(scope="session")
def rgw_server():
    """One Ceph radosgw (real SigV4 auth) for the whole session: state dict with
    endpoint, access_key, secret_key, a boto3 client ``s3`` and a ``bucket``.
    Skipped only on a host that cannot install the Ceph packages (no apt-get/dpkg);
    any other failure fails the test."""
    import uuid

    if os.environ.get("FTX_RADOSGW") == "0":
        pytest.skip("radosgw: not downloaded (FTX_RADOSGW=0)")
    from ftx_bench import radosgw as script

    try:
        script.fetch(quiet=True)
    except script.RadosgwError as exc:
        if not radosgw_cannot_install(exc):
            raise  # a download or unpack that broke is a failure, not a skip
        pytest.skip(f"Ceph radosgw cannot be installed here: {exc}")
    # A one-node Ceph occasionally fails to come up on a loaded 2-core machine (seen:
    # the OSD exiting during start-up); try a fresh cluster up to 3 times.
    for attempt in range(3):
        try:
            state = script.start(mem_bytes=2 << 30)
            break
        except script.RadosgwError as exc:
            if attempt == 2:
                raise
            print(f"radosgw start attempt {attempt + 1} failed, retrying: {exc}")
    try:
        import boto3
        from botocore.config import Config

        # a fresh session with explicit keys: boto3's default session caches the first
        # credentials it resolved in this process (another test module's, for instance)
        s3 = boto3.session.Session(
            aws_access_key_id=state["access_key"], aws_secret_access_key=state["secret_key"],
            region_name="us-east-1",
        ).client("s3", endpoint_url=state["endpoint"], config=Config(
            s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
            response_checksum_validation="when_required"))
        bucket = f"ftx-{uuid.uuid4().hex[:10]}"
        script.create_bucket(s3, bucket)
        yield {**state, "s3": s3, "bucket": bucket}
    finally:
        script.stop(state["dir"])


# -- skips that fail the run ---------------------------------------------------------------
# scripts/test.sh installs everything the tests need. A test may skip only for a reason on
# this list: something the script cannot give a machine (hardware, privileges, the OS), or
# an opt-out the user chose explicitly (FTX_X=0). Any other skip is a failure of the run:
# a dependency the script should have installed, a fixture that broke, a typo.
# FTX_ALLOW_SKIPS=1 turns the check off (ad-hoc runs in a partial environment).
ALLOWED_SKIPS: list[tuple[str, str]] = [
    # (regex on the skip reason, why it is allowed)
    (r"needs an RDMA NIC|this machine has RDMA", "RDMA hardware"),
    (r"\b(GPU|CUDA device)", "a GPU"),
    (r"apt-get/dpkg not found", "a host without apt-get/dpkg (radosgw)"),
    (r"needs root|network namespace|\(iproute2\) not found|cannot create /var/run/netns",
     "network namespaces need root and iproute2"),
    (r"no /proc here", "no /proc on the host"),
    (r"no C compiler", "no C compiler on the host"),
    (r"no IPv6 loopback", "no IPv6 loopback on the host"),
]
# opt-outs: allowed only while the variable is set to 0
OPT_OUTS: dict[str, str] = {
    "FTX_TORCH": r"\btorch\b",
    "FTX_RDMA": r"NIXL|nixl|rdma engine not installed",
    "FTX_RADOSGW": r"radosgw|Ceph",
    "FTX_MPI": r"mpiexec|mpi4py|MPI not available",
    "FTX_DOCS": r"docs extra",
    "FTX_RAY": r"\b[Rr]ay\b",
}


def skip_allowed(reason: str, env: dict[str, str] | None = None) -> str | None:
    """Why ``reason`` is an allowed skip (None: it is not)."""
    import re

    env = os.environ if env is None else env
    for pattern, why in ALLOWED_SKIPS:
        if re.search(pattern, reason):
            return why
    for var, pattern in OPT_OUTS.items():
        if env.get(var) == "0" and re.search(pattern, reason):
            return f"opt-out {var}=0"
    return None


_SKIPS: list[tuple[str, str]] = []


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _SKIPS.append((report.nodeid, _skip_reason(report)))


def pytest_collectreport(report):
    if report.skipped:
        _SKIPS.append((report.nodeid, _skip_reason(report)))


def _bad_skips() -> list[tuple[str, str]]:
    if os.environ.get("FTX_ALLOW_SKIPS") == "1":
        return []
    return [(node, reason) for node, reason in _SKIPS if skip_allowed(reason) is None]


def pytest_sessionfinish(session, exitstatus):
    if _bad_skips() and exitstatus in (0, 5):  # 5: every module skipped at collection
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bad = _bad_skips()
    if not bad:
        return
    tr = terminalreporter
    tr.section("skips outside the allowed list (tests/conftest.py ALLOWED_SKIPS)", red=True)
    for node, reason in bad:
        tr.line(f"{node}: {reason}", red=True)
    tr.line("scripts/test.sh installs what these need; an explicit opt-out is FTX_TORCH=0, "
            "FTX_RDMA=0, FTX_RADOSGW=0, FTX_MPI=0, FTX_DOCS=0 or FTX_RAY=0 "
            "(FTX_ALLOW_SKIPS=1: no check)")
